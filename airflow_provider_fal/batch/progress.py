"""Durable progress of a batch: what an earlier try finished or submitted, so a retry pays for nothing twice.

A batch writes one small record per input as it moves on (to a :class:`ProgressStore`,
see :mod:`~airflow_provider_fal.batch.progress_stores`):

* ``submitting``: a queue submit is about to be sent (written before sending);
* ``submitted``: fal queued it under ``request_id`` (written as soon as fal answers);
* ``done``: the input's entry with its output (with ``stored_path`` when stored); a paid output
  whose media could not be stored is kept too, so a retry stores it instead of generating it;
* ``fetched``: the deferrable batch's trigger read the result from fal (written by the
  triggerer, so a result fal keeps only minutes is safe while the task waits for a worker);
  its media are not stored yet: the task stores them, as it does an ``unstored`` output;
* ``failed``: the input failed; a later try sends it again (a failure is not a result).

Every record carries the fingerprint of the input's request (model, body, headers), so an
edited batch never reuses a stale result: a record whose fingerprint differs from the input at
the same index is ignored. :meth:`BatchProgress.resume` reads the records back at the start
of a try: finished inputs are not sent again, queued ones are polled (not resubmitted), and a
``submitting`` record without a request id is an unknown submit (see
:mod:`~airflow_provider_fal.operators.unknown_submit`).

What is not covered: a synchronous run cut off by the end of its try (``kill -9``, a worker
lost) got no answer, so the next try sends that input again (at most ``max_concurrency``
inputs); fal cancels a synchronous request whose connection drops, but may bill it.

A store that cannot be written never fails the batch: the first failure is logged, and the
worst outcome is that a retry sends an input again, as without a store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from airflow_provider_fal.batch.results import success_entry

SUBMITTING, SUBMITTED, DONE, FAILED, FETCHED = "submitting", "submitted", "done", "failed", "fetched"


class ProgressStore(Protocol):
    """Keeps one JSON record per input index across the tries of one task instance."""

    #: where the records are, for log lines
    where: str

    def load(self) -> dict[int, dict[str, Any]]:
        """Every stored record, by input index."""
        ...

    def write_many(self, records: dict[int, dict[str, Any]]) -> None:
        """Store each record as its input index's, in one save; durable once this returns."""
        ...

    def save_batch(self, value: dict[str, Any]) -> None:
        """Store what describes the whole batch (see :meth:`BatchProgress.remember`)."""
        ...

    def load_batch(self) -> dict[str, Any] | None:
        """What :meth:`save_batch` stored, if anything."""
        ...


@dataclass
class Resumed:
    """What a try takes over from the tries before it."""

    #: successful entries of an earlier try, by index: not sent again
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: paid outputs whose media are not stored yet (an earlier try could not store them, or the
    #: batch's trigger fetched them), as success entries: stored now, never sent again
    unstored: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: of ``unstored``, the results the batch's trigger recorded (``fetched``)
    fetched: set[int] = field(default_factory=set)
    #: fal request ids an earlier try queued, by index: polled, not resubmitted
    submitted: dict[int, str] = field(default_factory=dict)
    #: submits of an earlier try whose answer never came (no request id), by index: when they were sent
    unknown: dict[int, str] = field(default_factory=dict)
    #: inputs that failed in the current try (a deferrable batch resuming within its try), by index
    failed_this_try: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: of ``done``, how many an earlier try finished
    earlier_tries: int = 0
    #: records left by an earlier try for an input that has changed since (ignored)
    stale: int = 0

    def recorded_by_trigger(self) -> dict[int, dict[str, Any]]:
        """The entries of the results the batch's trigger recorded and no task has stored yet."""
        return {index: self.unstored[index] for index in self.fetched}

    def describe(self) -> str:
        parts = [
            f"{len(self.done)} inputs already done",
            f"{len(self.submitted)} already queued on fal (polled, not resubmitted)",
        ]
        if self.unstored:
            parts.append(f"{len(self.unstored)} generated but not stored yet (stored now, not sent)")
        if self.unknown:
            parts.append(f"{len(self.unknown)} submits whose answer was lost")
        if self.stale:
            parts.append(f"{self.stale} records of inputs that changed since (ignored)")
        return ", ".join(parts)


class BatchProgress:
    """Records each input's progress in ``store`` under the fingerprints of ``fingerprints``.

    Thread-safe: the batch's worker threads record their own inputs.
    """

    def __init__(self, store: ProgressStore, fingerprints: Sequence[str], log: Any, attempt: int = 0) -> None:
        self.store = store
        #: the task's try number, written into each record: a deferrable batch resumed within the
        #: same try keeps that try's failures, while a new try sends them again
        self.attempt = int(attempt)
        self.fingerprints = list(fingerprints)
        self.log = log or logging.getLogger(__name__)
        self._warned = threading.Event()

    @property
    def where(self) -> str:
        return self.store.where

    def resume(self) -> Resumed:
        """What earlier tries left for the inputs as they are now."""
        try:
            records = self.store.load()
        except Exception as error:
            self.log.warning(
                "fal batch: could not read the progress of earlier tries from %s (%s); every input is sent.",
                self.where,
                error,
            )
            return Resumed()
        compact = getattr(self.store, "compact", None)
        if compact is not None:  # fold what was just read into one object (a store with many small ones)
            compact()
        resumed = Resumed()
        for index, record in records.items():
            if not 0 <= index < len(self.fingerprints) or record.get("fingerprint") != self.fingerprints[index]:
                resumed.stale += 1
                continue
            state = record.get("state")
            entry = record.get("entry")
            if state == DONE and isinstance(entry, dict) and entry.get("ok"):
                resumed.done[index] = {**entry, "index": index}
                resumed.earlier_tries += record.get("try") != self.attempt or not self.attempt
            elif state == DONE and isinstance(entry, dict) and "output" in entry:
                resumed.unstored[index] = success_entry(index, entry["output"], entry.get("request_id"))
            elif state == FETCHED and "output" in record:
                resumed.fetched.add(index)
                billed = record.get("billed_units")
                resumed.unstored[index] = success_entry(
                    index,
                    record["output"],
                    record.get("request_id"),
                    billed if isinstance(billed, (int, float)) else None,
                )
            elif state == SUBMITTED and isinstance(record.get("request_id"), str):
                resumed.submitted[index] = record["request_id"]
            elif state == SUBMITTING:
                resumed.unknown[index] = str(record.get("at") or "an unknown time")
            elif state == FAILED and self.attempt and record.get("try") == self.attempt:
                error = record.get("error") if isinstance(record.get("error"), dict) else {"error": "FalError"}
                resumed.failed_this_try[index] = {
                    "index": index,
                    "ok": False,
                    "error": error,
                    "request_id": record.get("request_id"),
                }
        return resumed

    def remember(self, model_id: str) -> None:
        """Keep the batch's model and every input's fingerprint for the later rounds of this try.

        A deferrable batch resumes in a new process after each deferral; with these it records
        the results it fetches without preparing (validating, uploading, fingerprinting) every
        input again. Best effort: without them, a later round prepares the inputs again.
        """
        try:
            self.store.save_batch({"try": self.attempt, "model_id": model_id, "fingerprints": self.fingerprints})
        except Exception as error:
            self.log.warning("fal batch: could not record the batch's inputs in %s (%s)", self.where, error)

    # ------------------------------------------------------------------ recording

    def submitting(self, index: int) -> str:
        """Before a queue submit is sent; returns when it was (UTC, ISO 8601)."""
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write(index, {"state": SUBMITTING, "at": at})
        return at

    def submitted(self, index: int, request_id: str) -> None:
        self._write(index, {"state": SUBMITTED, "request_id": request_id})

    def finished(self, index: int, entry: dict[str, Any]) -> None:
        """The input's final entry: kept when it holds an output, else marked failed (to be sent again)."""
        self._write(index, self._final_record(entry))

    def finished_many(self, entries: dict[int, dict[str, Any]]) -> None:
        """:meth:`finished` for several inputs, in one save."""
        if entries:
            self._write_many({index: self._final_record(entry) for index, entry in entries.items()})

    @staticmethod
    def _final_record(entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get("ok") or "output" in entry:
            return {"state": DONE, "entry": entry}
        return {"state": FAILED, "request_id": entry.get("request_id"), "error": entry.get("error")}

    def forget(self, index: int) -> None:
        """No request exists for the input (fal refused the submit, or nothing was sent)."""
        self._write(index, {"state": FAILED})

    def _write(self, index: int, record: dict[str, Any]) -> None:
        self._write_many({index: record})

    def _write_many(self, records: dict[int, dict[str, Any]]) -> None:
        stamped = {
            index: {"fingerprint": self.fingerprints[index], "try": self.attempt, **record}
            for index, record in records.items()
        }
        try:
            self.store.write_many(stamped)
        except Exception as error:
            if not self._warned.is_set():
                self._warned.set()
                self.log.warning(
                    "fal batch: could not record progress in %s (%s); a retry of this task may send inputs again. "
                    "Further failures to record are not logged.",
                    self.where,
                    error,
                )


def fetched_record(
    fingerprint: str, attempt: int, request_id: str, output: Any, billed_units: float | None
) -> dict[str, Any]:
    """The record of a result the batch's trigger read from fal: paid for, its media not stored yet."""
    record = {"fingerprint": fingerprint, "try": attempt, "state": FETCHED, "request_id": request_id, "output": output}
    if billed_units is not None:
        record["billed_units"] = billed_units
    return record


def remembered_batch(store: ProgressStore, attempt: int) -> tuple[str, list[str]] | None:
    """The model and input fingerprints :meth:`BatchProgress.remember` kept for try ``attempt``, if any."""
    try:
        value = store.load_batch()
    except Exception:
        return None
    if not isinstance(value, dict) or value.get("try") != attempt or not isinstance(value.get("model_id"), str):
        return None
    fingerprints = value.get("fingerprints")
    if not isinstance(fingerprints, list) or not all(isinstance(item, str) for item in fingerprints):
        return None
    return value["model_id"], fingerprints
