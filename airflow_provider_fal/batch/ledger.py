"""The shared state of one batch run: each input's entry as it comes in, the counts, and the stop.

A :class:`BatchLedger` is written by every worker thread (of either mode) and read by the
runner's progress lines; all of it is behind one lock. Recording a failure may stop the batch
(an error every input would get, or a ``fail_fast`` policy already broken): the ledger then
calls ``on_stop`` with the reason.

Each finished input first goes through the ledger's ``finish`` hook (in the worker thread that
finished it, outside the lock): the operator stores the input's media there and records it
in the batch's durable progress, as soon as the input is done.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from airflow_provider_fal.batch.budget import Budget
from airflow_provider_fal.batch.results import (
    BatchResult,
    FailurePolicy,
    FalNotSentError,
    error_entry,
    stops_batch,
)
from airflow_provider_fal.batch.scheduling import AdaptiveLimit
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.exceptions import FalError, FalRequestFailedError

#: What the ledger calls with each finished input's entry and error; returns what is recorded.
FinishHook = Callable[[int, dict[str, Any], FalError | None], tuple[dict[str, Any], FalError | None]]

#: Failed inputs logged one by one; later ones are only counted (a 10,000-input batch must not
#: print 10,000 lines).
LOGGED_FAILURES = 10


class BatchLedger:
    """Entries and counts of one run of ``total`` inputs; thread-safe.

    :param policy: decides, with ``fail_fast``, when recorded failures stop the batch.
    :param log: where failures are logged (the runner's logger).
    :param on_stop: called (outside the lock) with the reason when a recorded failure stops the batch.
    :param finish: called with each finished input's entry and error before it is recorded; returns
        what is recorded (e.g. the entry with its media stored, or a storage error).
    """

    def __init__(
        self,
        total: int,
        policy: FailurePolicy,
        log: Any,
        on_stop: Callable[[str], None],
        finish: FinishHook | None = None,
    ) -> None:
        self.policy = policy
        self.log = log
        self.on_stop = on_stop
        self.finish = finish
        self.lock = threading.Lock()
        #: set once the batch stops: nothing new is sent
        self.stopping = threading.Event()
        self.stopped: str | None = None
        self.entries: list[dict[str, Any] | None] = [None] * total
        self.done = 0
        self.failed = 0
        self.transient = 0
        self.rate_limited = 0
        self.retried = 0
        self.errors: Counter[str] = Counter()
        #: inputs finished by an earlier try (not sent again), and inputs whose submit's answer was lost
        self.reused = 0
        self.unknown_submits = 0
        #: units fal reported billed (earlier tries' included), and the spending limit they count against
        self.billed_units = 0.0
        self.budget: Budget | None = None

    @property
    def total(self) -> int:
        return len(self.entries)

    def request_stop(self, reason: str) -> None:
        """Send nothing more; the first reason given is the one reported."""
        with self.lock:
            if self.stopped is None:
                self.stopped = reason
        self.stopping.set()

    def not_sent_error(self) -> FalNotSentError:
        return FalNotSentError(f"Not sent: the batch stopped ({self.stopped}).")

    def count_attempts(self, *, rate_limited: bool = False, retried: int = 0) -> None:
        with self.lock:
            self.rate_limited += rate_limited
            self.retried += retried

    # ------------------------------------------------------------------ entries

    def reuse(self, entries: Mapping[int, dict[str, Any]]) -> None:
        """Entries an earlier try finished: done, and not sent again."""
        with self.lock:
            for index, entry in entries.items():
                if self.entries[index] is None:
                    self.entries[index] = entry
                    self.done += 1
                    self.reused += 1
                    self.billed_units += entry.get("billed_units") or 0.0

    def record(self, index: int, entry: dict[str, Any], error: FalError | None) -> None:
        """Input ``index`` finished with ``entry`` (``error`` when it failed)."""
        if self.finish is not None:
            entry, error = self.finish(index, entry, error)
        stop_reason = None
        with self.lock:
            if self.entries[index] is not None:  # already marked cancelled by a kill
                return
            self.entries[index] = entry
            self.done += 1
            self.billed_units += entry.get("billed_units") or 0.0
            if error is None:
                if self.budget is not None and self.stopped is None and self.budget.spent(self.billed_units):
                    stop_reason = f"max_cost={self.budget.max_cost:g} reached ({self.billed_units:g} units billed)"
            else:
                stop_reason = self._after_failure(index, error)
        self._report(index, error, stop_reason)

    def _after_failure(self, index: int, error: FalError) -> str | None:
        """Count a failure (under the lock); the reason to stop the batch, if it must stop."""
        self._count_failure(error)
        if not error.permanent:
            self.transient += 1
        if stops_batch(error):
            return f"input {index} failed with HTTP {error.status_code}, which every input would get"
        if self.policy.fail_fast:
            # The failures so far already exceed what the policy allows of the whole batch.
            breach = self.policy.exceeded(self.failed, self.total)
            if breach:
                return f"fail_fast: {breach}"
        return None

    def _report(self, index: int, error: FalError | None, stop_reason: str | None) -> None:
        """Log a failure (the first few one by one) and stop the batch when it must stop (outside the lock)."""
        if error is not None:
            failed = self.failed
            if failed <= LOGGED_FAILURES:
                self.log.warning("fal batch: input %d failed: %s", index, error)
                if failed == LOGGED_FAILURES:
                    self.log.warning("fal batch: further failures are only counted, not logged one by one.")
        if stop_reason:
            self.log.error("fal batch: stopping, no further inputs are sent: %s", stop_reason)
            self.on_stop(stop_reason)

    def record_unexpected(self, index: int, unexpected: Exception) -> None:
        """A bug must not lose the input: report it as the input's result."""
        self.log.error("fal batch: unexpected error on input %d", index, exc_info=unexpected)
        error = FalError(f"Unexpected error: {type(unexpected).__name__}: {unexpected}")
        self.record(index, error_entry(index, error), error)

    def mark_cancelled(self, handles: Mapping[int, QueueHandle]) -> None:
        """Result entries of queued requests cancelled on fal (failed, not unsent)."""
        cancelled_entries = {}
        with self.lock:
            for index, handle in handles.items():
                if self.entries[index] is None:
                    cancelled = FalRequestFailedError(
                        f"Cancelled on fal: the batch stopped ({self.stopped}).",
                        error_type="client_cancelled",
                        request_id=handle.request_id,
                    )
                    self.entries[index] = cancelled_entries[index] = error_entry(index, cancelled)
                    self.done += 1
                    self._count_failure(cancelled)
        if self.finish is not None:  # so that the durable progress says the retry must send them again
            for index, entry in cancelled_entries.items():
                self.finish(index, entry, None)

    def _count_failure(self, error: FalError) -> None:
        self.failed += 1
        self.errors[type(error).__name__] += 1

    # ------------------------------------------------------------------ the outcome

    def result(self, model_id: str, elapsed: float, limit: AdaptiveLimit | None) -> BatchResult:
        """Every input's entry in order (unsent ones as :class:`FalNotSentError`) and the counts."""
        not_run = 0
        results: list[dict[str, Any]] = []
        unsent: dict[str, Any] | None = None  # one error for all of them (a deferred round leaves thousands)
        for index, entry in enumerate(self.entries):
            if entry is None:
                not_run += 1
                unsent = unsent or error_entry(index, self.not_sent_error())
                entry = {**unsent, "index": index, "error": dict(unsent["error"])}
            results.append(entry)
        return BatchResult(
            model_id=model_id,
            results=results,
            elapsed=elapsed,
            not_run=not_run,
            rate_limited=self.rate_limited,
            retried=self.retried,
            peak_in_flight=limit.peak_in_flight if limit else 0,
            lowest_limit=limit.lowest_limit if limit else 0,
            final_limit=limit.limit if limit else 0,
            stopped=self.stopped,
            transient_failures=self.transient,
            errors_by_type=Counter(self.errors),
            reused=self.reused,
            unknown_submits=self.unknown_submits,
            billed_units=self.billed_units,
            pricing=self.budget.pricing if self.budget is not None else None,
        )
