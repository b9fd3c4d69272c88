"""Where a deferred batch's trigger keeps the results it reads: the batch's progress folder.

fal keeps a request's result only 6 minutes after it ends when it is 10 KB or more (an hour
when smaller), and a deferred batch's task may wait longer than that for a worker slot. So
the batch's trigger reads each result as soon as its request ends and records it (state
``fetched``) in the batch's durable progress under ``output_path``, beside the records the
task wrote, before it hands the request back; the task, once a worker runs it again, stores
the result's media and records it done, without calling fal. Outputs never go into the
trigger event (Airflow keeps events in the metadata DB).

The triggerer opens the folder itself: an object store's connection is looked up through
Airflow, off the event loop (``asgiref.sync_to_async``, as Airflow asks of sync calls in
triggers). When it cannot (no ``output_path``, a connection only the workers have, a write
that fails), the trigger hands requests back unread, as before, and the task reads them.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_fal.batch.progress import fetched_record, remembered_batch
from airflow_provider_fal.batch.progress_stores import DirectoryProgressStore
from airflow_provider_fal.core.http import FalResponse
from airflow_provider_fal.media.storage import open_store


def results_location(output_path: Any, folder: str) -> dict[str, str] | None:
    """What the trigger needs to open the batch's progress folder (JSON), or ``None`` when it cannot.

    ``output_path`` is the operator's rendered one: a string, or a path object whose URI holds
    its connection (``s3://aws_default@bucket/...``); a path object with other storage options
    cannot be rebuilt from its URI, so its batch hands results back unread.
    """
    if isinstance(output_path, str):
        return {"output_path": output_path, "folder": folder}
    if getattr(output_path, "storage_options", None):
        return None
    return {"output_path": str(output_path), "folder": folder}


class TriggerResults:
    """The batch's progress folder, opened from the triggerer; every method runs off the event loop.

    :param location: what :func:`results_location` returned.
    :param attempt: the task's try number (the records of the try that deferred).
    """

    def __init__(self, location: dict[str, str], attempt: int) -> None:
        self.location = location
        self.attempt = int(attempt)
        self._store: DirectoryProgressStore | None = None
        self._fingerprints: list[str] = []

    @property
    def where(self) -> str:
        return self._store.where if self._store is not None else str(self.location.get("folder"))

    def open(self, model_id: str) -> None:
        """Open the folder and read the inputs' fingerprints the task remembered; raises when it cannot."""
        store = DirectoryProgressStore(open_store(self.location["output_path"]), self.location["folder"])
        remembered = remembered_batch(store, self.attempt)
        if remembered is None or remembered[0] != model_id:
            raise LookupError(f"no inputs of try {self.attempt} are remembered in {store.where}")
        self._store, self._fingerprints = store, remembered[1]

    def save(self, results: dict[int, FalResponse]) -> None:
        """Record ``results`` (by input index) in one group; durable once this returns."""
        assert self._store is not None, "open() first"
        records = {
            index: fetched_record(
                self._fingerprints[index],
                self.attempt,
                response.request_id or "",
                response.output,
                response.billable_units,
            )
            for index, response in results.items()
            if 0 <= index < len(self._fingerprints)
        }
        if records:
            self._store.write_many(records)
