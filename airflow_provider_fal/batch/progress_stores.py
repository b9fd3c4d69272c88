"""Where a batch's progress records live (:class:`~airflow_provider_fal.batch.progress.ProgressStore`).

* :class:`DirectoryProgressStore`: with ``output_path``, beside the results, in
  ``<output_path>/fal-batch-progress/<task>[__m<map index>]__<run>/``. Records are group
  committed (:mod:`~airflow_provider_fal.batch.group_commit`): the records the batch's threads
  write at the same time are saved together, as one group. On S3, GCS... (through Airflow's
  ObjectStoragePath) each group is a new object ``g<sequence>-<writer>.json``, never appended
  to (an upload appears whole); on a local or mounted disk, each writer appends its groups to
  a log of its own (:mod:`~airflow_provider_fal.batch.progress_log`), a line per group. A later
  group's record of an input replaces an earlier one. Reading the progress back (at the start
  of a try, and between the rounds of a deferrable batch) folds many groups into one checkpoint
  ``c<number>-<writer>.json`` that names the objects it holds, and deletes those (and records
  how much of each log it holds: logs are not deleted), so the folder stays small; a group it
  does not hold (one a still-running earlier try wrote late) is read after it, whatever its
  number.
  Records of earlier versions (one ``<index>.json`` per input) are still read. Local records
  are not fsynced (that doubled their cost): they survive the death of the process (``kill -9``,
  OOM), while an operating-system crash may lose the last records written.
* :class:`SnapshotProgressStore`: without ``output_path``, one JSON value in the task's request
  store (``task_state_store`` on Airflow 3.3+, an Airflow Variable before), for batches of up to
  :data:`SNAPSHOT_MAX_INPUTS` inputs: every change rewrites the whole value (the writes of
  concurrent threads are group committed too), which larger batches should not put on the
  metadata DB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_fal.batch.group_commit import GroupCommit
from airflow_provider_fal.batch.progress_log import LOG_NAME, append_line, encode, encode_line, log_name, read_log
from airflow_provider_fal.media.files import file_prefix
from airflow_provider_fal.media.storage import LocalStore, ObjectStore

if TYPE_CHECKING:
    from airflow_provider_fal.operators.request_store import RequestStore

#: The folder under ``output_path`` that holds the progress of every batch task writing there.
PROGRESS_FOLDER = "fal-batch-progress"
#: Without ``output_path``, progress is kept in the metadata DB for batches up to this size.
SNAPSHOT_MAX_INPUTS = 1000
#: Groups (and old per-input records) read at once beyond which reading writes a checkpoint.
COMPACT_AFTER = 32
#: The object holding what describes the whole batch (its model, every input's fingerprint).
BATCH_NAME = "batch.json"
_LEGACY_NAME = re.compile(r"^(\d+)\.json$")
_GROUP_NAME = re.compile(r"^([gc])(\d{10})-[0-9a-f]{8}\.json$")

log = logging.getLogger(__name__)


def progress_folder_name(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """``<task>[__m<map index>]__<digest of dag, run, task, map index>``: one folder per task instance."""
    identity = f"{dag_id}\x00{run_id}\x00{task_id}\x00{map_index if map_index is not None else -1}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{file_prefix(task_id, map_index=map_index)}__{digest}"


@dataclass
class _Loaded:
    """What :meth:`DirectoryProgressStore.load` saw, for the checkpoint that ``compact`` writes."""

    records: dict[int, dict[str, Any]]
    #: every object listed (old records, groups, checkpoints): what the checkpoint replaces
    names: list[str]
    #: of each local log, the bytes read: where the next read starts
    log_ends: dict[str, int]
    #: objects and log lines read beyond the newest checkpoint
    read: int
    #: the number of the next checkpoint
    checkpoint: int


class DirectoryProgressStore:
    """Group-committed records in a folder of ``output_path`` (local or object storage)."""

    def __init__(self, output_store: LocalStore | ObjectStore, folder_name: str) -> None:
        self.root = output_store.root / PROGRESS_FOLDER / folder_name
        self._local = isinstance(output_store, LocalStore)
        self._store = LocalStore(self.root) if self._local else ObjectStore(self.root)
        self.where = str(self.root)
        self._writer = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._prepared = False
        #: the highest group sequence number seen or written (``None``: the folder not listed yet)
        self._sequence: int | None = None
        self._groups = GroupCommit(self._save_group)
        #: what the last :meth:`load` saw, for :meth:`compact`
        self._last_load: _Loaded | None = None
        #: logs given up after a failed append (local folders only)
        self._log_part = 0

    @property
    def saves(self) -> int:
        """Groups written by this store."""
        return self._groups.saves

    def _names(self) -> list[str]:
        if self._local:
            if not self.root.is_dir():
                return []
            return [entry.name for entry in os.scandir(self.root)]
        try:
            listed = self.root.fs.ls(self.root.path, detail=False)
        except (FileNotFoundError, NotADirectoryError):  # nothing recorded yet
            return []
        return [str(path).rstrip("/").rsplit("/", 1)[-1] for path in listed]

    def _read(self, name: str) -> Any:
        try:
            return json.loads((self.root / name).read_bytes())
        except (OSError, ValueError):
            return None  # a torn or unreadable object counts as none

    def load(self) -> dict[int, dict[str, Any]]:
        """The newest checkpoint, then every object it does not hold, in order: old per-input
        records, then groups (objects, and lines of the local logs after the bytes the checkpoint
        holds) by sequence number.

        A checkpoint names the objects it folded in; any other group is read after it, also one
        numbered lower (written late by another process), so that no record is ever skipped.
        """
        legacy: list[tuple[int, str]] = []
        checkpoints: list[tuple[int, str]] = []
        groups: list[tuple[int, str]] = []
        logs: list[str] = []
        for name in self._names():
            if match := _LEGACY_NAME.match(name):
                legacy.append((int(match.group(1)), name))
            elif match := _GROUP_NAME.match(name):
                (checkpoints if match.group(1) == "c" else groups).append((int(match.group(2)), name))
            elif self._local and LOG_NAME.match(name):
                logs.append(name)
        every_name = sorted(name for _, name in legacy + checkpoints + groups)
        checkpoint = max(checkpoints, default=None)
        content = self._read(checkpoint[1]) if checkpoint else None
        content = content if isinstance(content, dict) else {}
        folded = set(content.get("folded") or ()) if checkpoint else set()
        held = content.get("logs") if isinstance(content.get("logs"), dict) else {}
        legacy = [item for item in legacy if item[1] not in folded]
        later = sorted(group for group in groups if group[1] not in folded)
        with ThreadPoolExecutor(max_workers=1 if self._local else 16) as pool:
            contents = list(pool.map(self._read, [name for _, name in legacy + later]))
        records: dict[int, dict[str, Any]] = {}
        for (index, _), record in zip(legacy, contents[: len(legacy)], strict=True):
            if isinstance(record, dict):
                records[index] = record
        ordered = [
            (sequence, name, group) for (sequence, name), group in zip(later, contents[len(legacy) :], strict=True)
        ]
        log_ends: dict[str, int] = {}
        for name in sorted(logs):
            start = held.get(name) if isinstance(held.get(name), int) else 0
            tail = read_log(os.path.join(self.root, name), start)
            ordered += [(sequence, name, {"records": group}) for sequence, group in tail.groups]
            log_ends[name] = tail.end
        ordered.sort(key=lambda item: item[:2])
        for group in [content, *(group for _, _, group in ordered)]:
            stored = group.get("records") if isinstance(group, dict) else None
            for key, record in (stored or {}).items():
                if isinstance(key, str) and key.isdigit() and isinstance(record, dict):
                    records[int(key)] = record
        last = max([-1] + [sequence for sequence, _, _ in ordered] + [sequence for sequence, _ in groups])
        with self._lock:
            self._sequence = max(last, self._sequence if self._sequence is not None else -1)
        next_checkpoint = checkpoint[0] + 1 if checkpoint else 0
        read = len(legacy) + len(ordered)
        self._last_load = _Loaded(records, every_name, log_ends, read, next_checkpoint)
        return dict(records)

    def compact(self) -> None:
        """After :meth:`load`: when it read many objects, fold them into one checkpoint; best effort.

        The checkpoint holds exactly what that load read and names every object it folded in;
        only those are deleted, so groups written since (by any process) are still read after it.
        """
        if self._last_load is None:
            return
        loaded, self._last_load = self._last_load, None
        if loaded.read <= COMPACT_AFTER:
            return
        checkpoint = {"records": loaded.records, "folded": loaded.names, "logs": loaded.log_ends}
        try:
            self._prepare()
            self._put(f"c{loaded.checkpoint:010d}-{self._writer}.json", encode(checkpoint))
            for name in loaded.names:  # never a log: its writer may still append to it
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
        except Exception as error:  # the groups stay; the next read tries again
            log.info("fal batch: could not fold the progress records of %s into one: %s", self.where, error)

    def write_many(self, records: dict[int, dict[str, Any]]) -> None:
        """Several inputs' records in one group; durable once this returns."""
        self._groups.write_many(records)

    def save_batch(self, value: dict[str, Any]) -> None:
        self._prepare()
        self._put(BATCH_NAME, encode(value))

    def load_batch(self) -> dict[str, Any] | None:
        value = self._read(BATCH_NAME)
        return value if isinstance(value, dict) else None

    def _save_group(self, group: dict[int, dict[str, Any]]) -> None:
        self._prepare()
        with self._lock:
            if self._sequence is None:  # numbered after every group an earlier process wrote
                self._sequence = self._last_sequence()
            self._sequence += 1
            sequence = self._sequence
        if not self._local:
            self._put(f"g{sequence:010d}-{self._writer}.json", encode({"records": group}))
            return
        path = os.path.join(self.root, log_name(self._writer, self._log_part))
        try:
            append_line(path, encode_line(sequence, group))
        except BaseException:
            self._log_part += 1  # never append after a line that may be partial
            raise

    def _last_sequence(self) -> int:
        names = self._names()
        numbers = [int(m.group(2)) for name in names if (m := _GROUP_NAME.match(name))]
        for name in names if self._local else ():
            if LOG_NAME.match(name):
                numbers += [sequence for sequence, _ in read_log(os.path.join(self.root, name), 0).groups]
        return max([-1, *numbers])

    def _prepare(self) -> None:
        with self._lock:
            if not self._prepared:
                self._store.prepare()
                self._prepared = True

    def _put(self, name: str, data: bytes) -> None:
        if not self._local:
            self._store.write(name, [data])
            return
        # Not LocalStore.write: its clean-up of leftovers scans the folder, too slow per group.
        target = self.root / name
        temporary = self.root / f".{name}.{self._writer}.part"  # one writer per name and store
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise


class SnapshotProgressStore:
    """Every record in one JSON value of a :class:`RequestStore`, rewritten on each change.

    Concurrent writes are group committed: a thread that finds a save under way waits for it,
    and the next save carries every change made meanwhile; :meth:`write` returns once a save
    that holds its record is done.
    """

    def __init__(self, store: RequestStore) -> None:
        self._store = store
        self.where = store.where
        self._records: dict[int, dict[str, Any]] = {}
        self._changes = threading.Lock()
        self._loading = threading.Lock()
        self._loaded = False
        self._batch: dict[str, Any] | None = None
        self._groups = GroupCommit(self._save_group)

    def load(self) -> dict[int, dict[str, Any]]:
        value = self._store.load() or {}
        stored = value.get("inputs") if isinstance(value, dict) else None
        batch = value.get("batch") if isinstance(value, dict) else None
        records = {
            int(key): record
            for key, record in (stored or {}).items()
            if isinstance(key, str) and key.isdigit() and isinstance(record, dict)
        }
        with self._changes:
            # Records written here meanwhile are newer than the stored ones: they win.
            self._records = {**records, **self._records}
            if self._batch is None and isinstance(batch, dict):
                self._batch = batch
            self._loaded = True
        return records

    def _load_once(self) -> None:
        if not self._loaded:  # a new process adds to what is stored, never replaces it
            with self._loading:
                if not self._loaded:
                    self.load()

    def write_many(self, records: dict[int, dict[str, Any]]) -> None:
        self._load_once()
        self._groups.write_many(records)

    def save_batch(self, value: dict[str, Any]) -> None:
        self._load_once()
        with self._changes:
            self._batch = value
        self._groups.save_now()

    def load_batch(self) -> dict[str, Any] | None:
        self.load()
        return self._batch

    def _save_group(self, group: dict[int, dict[str, Any]]) -> None:
        with self._changes:
            self._records.update(group)
            snapshot: dict[str, Any] = {"inputs": {str(key): value for key, value in self._records.items()}}
            if self._batch is not None:
                snapshot["batch"] = self._batch
        self._store.save(snapshot)

    def clear(self) -> None:
        self._store.clear()
