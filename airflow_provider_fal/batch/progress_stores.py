"""Where a batch's progress records live (:class:`~airflow_provider_fal.batch.progress.ProgressStore`).

* :class:`DirectoryProgressStore`: with ``output_path``, beside the results: one small JSON
  file per input in ``<output_path>/fal-batch-progress/<task>[__m<map index>]__<run>/``, written
  in place (a local file is written to a temporary name and renamed; an object store upload
  appears whole). Any size of batch; works on every Airflow version and on S3, GCS... Local
  records are not fsynced (that doubled their cost): they survive the death of the process
  (``kill -9``, OOM), while an operating-system crash may lose the last records written.
* :class:`SnapshotProgressStore`: without ``output_path``, one JSON value in the task's request
  store (``task_state_store`` on Airflow 3.3+, an Airflow Variable before), for batches of up to
  :data:`SNAPSHOT_MAX_INPUTS` inputs: every change rewrites the whole value (the writes of
  concurrent threads are grouped into one save), which larger batches should not put on the
  metadata DB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from airflow_provider_fal.media.files import file_prefix
from airflow_provider_fal.media.storage import LocalStore, ObjectStore

if TYPE_CHECKING:
    from airflow_provider_fal.operators.request_store import RequestStore

#: The folder under ``output_path`` that holds the progress of every batch task writing there.
PROGRESS_FOLDER = "fal-batch-progress"
#: Without ``output_path``, progress is kept in the metadata DB for batches up to this size.
SNAPSHOT_MAX_INPUTS = 1000
_RECORD_NAME = re.compile(r"^(\d+)\.json$")


def progress_folder_name(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """``<task>[__m<map index>]__<digest of dag, run, task, map index>``: one folder per task instance."""
    identity = f"{dag_id}\x00{run_id}\x00{task_id}\x00{map_index if map_index is not None else -1}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{file_prefix(task_id, map_index=map_index)}__{digest}"


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


class DirectoryProgressStore:
    """One JSON file per input in a folder of ``output_path`` (local or object storage)."""

    def __init__(self, output_store: LocalStore | ObjectStore, folder_name: str) -> None:
        self.root = output_store.root / PROGRESS_FOLDER / folder_name
        self._local = isinstance(output_store, LocalStore)
        self._store = LocalStore(self.root) if self._local else ObjectStore(self.root)
        self.where = str(self.root)
        self._prepared = False
        self._prepare_lock = threading.Lock()

    def _prepare(self) -> None:
        with self._prepare_lock:
            if not self._prepared:
                self._store.prepare()
                self._prepared = True

    def load(self) -> dict[int, dict[str, Any]]:
        if self._local:
            if not self.root.is_dir():
                return {}
            names = [entry.name for entry in os.scandir(self.root)]
        else:
            try:
                listed = self.root.fs.ls(self.root.path, detail=False)
                names = [str(path).rstrip("/").rsplit("/", 1)[-1] for path in listed]
            except (FileNotFoundError, NotADirectoryError):  # nothing recorded yet
                return {}
        indexed = [(int(match.group(1)), name) for name in names if (match := _RECORD_NAME.match(name))]

        def read(item: tuple[int, str]) -> tuple[int, dict[str, Any] | None]:
            index, name = item
            try:
                record = json.loads((self.root / name).read_bytes())
            except (OSError, ValueError):
                return index, None  # a torn or unreadable record counts as none
            return index, record if isinstance(record, dict) else None

        with ThreadPoolExecutor(max_workers=1 if self._local else 16) as pool:
            pairs = list(pool.map(read, indexed))
        return {index: record for index, record in pairs if record is not None}

    def write(self, index: int, record: dict[str, Any]) -> None:
        self._prepare()
        data = _encode(record)
        name = f"{int(index)}.json"
        if not self._local:
            self._store.write(name, [data])
            return
        # Not LocalStore.write: its clean-up of leftovers scans the folder, too slow per record.
        target = self.root / name
        temporary = self.root / f".{name}.{uuid.uuid4().hex[:8]}.part"
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

    Concurrent writes are grouped: a thread that finds a save under way waits for it, and the
    next save carries every change made meanwhile; :meth:`write` returns once a save that holds
    its record is done.
    """

    def __init__(self, store: RequestStore) -> None:
        self._store = store
        self.where = store.where
        self._records: dict[int, dict[str, Any]] = {}
        self._changes = threading.Lock()
        self._saving = threading.Lock()
        self._version = 0
        self._saved = 0
        self._loaded = False

    def load(self) -> dict[int, dict[str, Any]]:
        value = self._store.load() or {}
        stored = value.get("inputs") if isinstance(value, dict) else None
        records = {
            int(key): record
            for key, record in (stored or {}).items()
            if isinstance(key, str) and key.isdigit() and isinstance(record, dict)
        }
        with self._changes:
            # Records written here meanwhile are newer than the stored ones: they win.
            self._records = {**records, **self._records}
            self._loaded = True
        return records

    def write(self, index: int, record: dict[str, Any]) -> None:
        if not self._loaded:  # a new process adds to what is stored, never replaces it
            with self._saving:
                if not self._loaded:
                    self.load()
        with self._changes:
            self._records[int(index)] = record
            self._version += 1
            mine = self._version
        with self._saving:
            if self._saved >= mine:
                return  # a save made while this thread waited already holds its record
            with self._changes:
                snapshot = {"inputs": {str(key): value for key, value in self._records.items()}}
                version = self._version
            self._store.save(snapshot)
            self._saved = version

    def clear(self) -> None:
        self._store.clear()
