"""Where a batch task's results go, input by input: stored media, durable progress, the manifest.

:class:`BatchDelivery` is what :class:`~airflow_provider_fal.operators.batch.FalBatchRunOperator`
hands the batch runner as its ``finish`` hook and ``progress``:

* as each input finishes, its media are stored under ``output_path`` (so a short object
  lifecycle cannot expire them while the rest of the batch runs), stored ``data:`` URIs are
  dropped from the entry (the file is at ``stored_path``), and the entry is recorded in the
  batch's durable progress;
* a paid result whose media could not be stored is kept as such: a retry stores it again
  instead of generating it again;
* at the end, with ``output_path``, the manifest is written beside the media.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_fal.batch.manifest import manifest_name, write_manifest
from airflow_provider_fal.batch.progress import BatchProgress, ProgressStore, remembered_batch
from airflow_provider_fal.batch.progress_stores import (
    SNAPSHOT_MAX_INPUTS,
    DirectoryProgressStore,
    SnapshotProgressStore,
    progress_folder_name,
)
from airflow_provider_fal.exceptions import FalError
from airflow_provider_fal.media.download import FalDownloadError, MediaPersister
from airflow_provider_fal.media.files import STORED_PATH_KEY, file_prefix
from airflow_provider_fal.media.storage import LocalStore, ObjectStore
from airflow_provider_fal.operators.request_store import request_store

#: Task state key (and Variable name prefix) of a batch's progress kept in the metadata DB.
PROGRESS_STATE_KEY = "fal_batch_progress"


def _map_index(ti: Any) -> int | None:
    value = getattr(ti, "map_index", None)
    return None if value is None or int(value) < 0 else int(value)


def drop_stored_data_uris(value: Any) -> Any:
    """``value`` without the ``url`` of file objects whose ``data:`` URI was stored (at ``stored_path``)."""
    if isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str) and url.startswith("data:") and value.get(STORED_PATH_KEY):
            return {key: item for key, item in value.items() if key != "url"}
        return {key: drop_stored_data_uris(item) for key, item in value.items()}
    if isinstance(value, list):
        return [drop_stored_data_uris(item) for item in value]
    return value


class BatchDelivery:
    """The per-input ``finish`` hook and the durable progress of one batch try.

    :param fingerprints: every input's fingerprint; ``None`` in a later round of a deferrable
        batch: those its first round remembered (see :meth:`BatchProgress.remember`), with its
        model in :attr:`model_id`; ``progress`` is ``None`` when nothing was remembered.
    :param store: the ``output_path`` store, or ``None``.
    :param persister: stores media under ``output_path`` (``None`` without one).
    :param durable: keep progress across tries.
    """

    def __init__(
        self,
        context: Any,
        fingerprints: list[str] | None,
        *,
        store: LocalStore | ObjectStore | None,
        persister: MediaPersister | None,
        durable: bool,
        log: Any,
    ) -> None:
        self.context = context
        self.store = store
        self.persister = persister
        self.log = log
        ti = context["ti"]
        self.task_id, self.map_index = ti.task_id, _map_index(ti)
        self.attempt = int(getattr(ti, "try_number", 0) or 0)
        self.snapshot: SnapshotProgressStore | None = None
        #: the progress folder's name under ``output_path`` (``None``: progress is not kept there)
        self.progress_folder: str | None = None
        #: the batch's model, when the fingerprints were remembered
        self.model_id: str | None = None
        self.progress = self._progress(ti, fingerprints) if durable else None
        self.fingerprints = self.progress.fingerprints if self.progress is not None else list(fingerprints or [])

    def _progress(self, ti: Any, fingerprints: list[str] | None) -> BatchProgress | None:
        where = self._progress_store(ti, fingerprints)
        if where is None:
            return None
        if fingerprints is None:
            remembered = remembered_batch(where, self.attempt)
            if remembered is None:
                return None
            self.model_id, fingerprints = remembered
        return BatchProgress(where, fingerprints, self.log, self.attempt)

    def _progress_store(self, ti: Any, fingerprints: list[str] | None) -> ProgressStore | None:
        if self.store is not None:
            self.progress_folder = progress_folder_name(ti.dag_id, ti.run_id, ti.task_id, self.map_index)
            return DirectoryProgressStore(self.store, self.progress_folder)
        if fingerprints is not None and len(fingerprints) > SNAPSHOT_MAX_INPUTS:
            self.log.warning(
                "fal batch: %d inputs and no output_path: the batch's progress is not kept (more than %d inputs "
                "would rewrite a large value in the metadata DB on every step), so a retry of this task sends "
                "every input again. Set output_path to keep it beside the results.",
                len(fingerprints),
                SNAPSHOT_MAX_INPUTS,
            )
            return None
        what = (
            "Progress of the fal batch {task}: finished inputs and queued request ids, kept so that a retry "
            "pays for nothing twice. Deleted when the task succeeds."
        )
        self.snapshot = SnapshotProgressStore(request_store(self.context, PROGRESS_STATE_KEY, what))
        return self.snapshot

    def finish(self, index: int, entry: dict[str, Any], error: FalError | None) -> tuple[dict[str, Any], Any]:
        """Store the input's media (when it succeeded) and record it; what the batch then records."""
        entry, error = self.store_media(index, entry, error)
        if self.progress is not None:
            self.progress.finished(index, entry)
        return entry, error

    def store_media(self, index: int, entry: dict[str, Any], error: FalError | None) -> tuple[dict[str, Any], Any]:
        """Store the input's media (when it succeeded), not recording it (see :meth:`record`)."""
        if error is None and entry.get("ok") and self.persister is not None:
            return self._store_media(index, entry)
        return entry, error

    def record(self, entries: dict[int, dict[str, Any]]) -> None:
        """Record the final entries of several inputs whose media :meth:`store_media` stored, in one save."""
        if self.progress is not None:
            self.progress.finished_many(entries)

    def _store_media(self, index: int, entry: dict[str, Any]) -> tuple[dict[str, Any], FalError | None]:
        assert self.persister is not None
        prefix = file_prefix(self.task_id, map_index=self.map_index, input_index=index)
        try:
            persisted = self.persister.persist(entry["output"], prefix)
        except (FalError, OSError) as failure:
            error = failure if isinstance(failure, FalError) else FalDownloadError(f"Could not store media: {failure}")
            self.log.warning("fal batch: input %d: its media could not be stored: %s", index, error)
            # The output (paid for) is kept: a retry stores it again instead of generating it again.
            return {**entry, "ok": False, "error": error.to_dict()}, error
        return {**entry, "output": drop_stored_data_uris(persisted.output)}, None

    def write_manifest(self, entries: list[dict[str, Any]]) -> str | None:
        """The manifest's location (``None`` without ``output_path``)."""
        if self.store is None:
            return None
        return write_manifest(self.store, manifest_name(self.task_id, self.map_index), entries, self.fingerprints)

    def close(self) -> None:
        """Drop the media downloader's connections."""
        if self.persister is not None:
            self.persister.close()

    def succeeded(self) -> None:
        """The task succeeded: progress kept in the metadata DB is deleted (a folder stays, for a re-run)."""
        if self.snapshot is not None:
            try:
                self.snapshot.clear()
            except Exception as error:
                self.log.warning(
                    "fal batch: could not delete the batch's progress from %s: %s", self.snapshot.where, error
                )
