"""Run many inputs of one fal model over one shared :class:`FalClient`, with bounded, adaptive concurrency.

Airflow-free; :class:`~airflow_provider_fal.operators.batch.FalBatchRunOperator` wraps it.

* **Prepared inputs.** :func:`~airflow_provider_fal.batch.inputs.prepare_inputs` checks and
  encodes every input once, before anything is sent; the runner sends those requests as they are.
* **Bounded concurrency.** At most ``max_concurrency`` requests are in flight, from as many
  worker threads sharing the client's one ``requests.Session``, whose pool must hold that many
  connections (``FalClient(pool_maxsize=max_concurrency)``).
* **Backpressure.** A 429 (the account's concurrency limit) sets the in-flight limit to the
  number of requests fal was running at that moment, and one more slot is probed now and then,
  up to ``max_concurrency`` (:class:`~airflow_provider_fal.batch.scheduling.AdaptiveLimit`). A
  synchronous run refused so is sent again as soon as one of the batch's requests frees a slot.
* **Retries** of each input follow the client's :class:`RetryPolicy` and error classes; the batch
  makes each attempt itself (:mod:`~airflow_provider_fal.batch.attempts`) so it sees every 429.
* **Two ways of sending:** synchronous runs (:mod:`~airflow_provider_fal.batch.sync_mode`) or
  fal's queue (:mod:`~airflow_provider_fal.batch.queue_mode`).
* **Results** come back in input order, one entry per input, each either the model output or a
  structured error: nothing is dropped. A :class:`FailurePolicy` decides whether the batch as a
  whole failed.
* **Progress** goes to the log every ``progress_interval`` seconds: done/total, failures, rate, ETA.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from airflow_provider_fal.batch.attempts import LimitedAttempts
from airflow_provider_fal.batch.budget import Budget
from airflow_provider_fal.batch.ledger import BatchLedger, FinishHook
from airflow_provider_fal.batch.progress import BatchProgress
from airflow_provider_fal.batch.queue_mode import QueueMode
from airflow_provider_fal.batch.results import (
    BatchResult,
    FailurePolicy,
    FalBatchError,
    FalNotSentError,
    error_entry,
    failures,
    outputs,
)
from airflow_provider_fal.batch.scheduling import AdaptiveLimit
from airflow_provider_fal.batch.sync_mode import SyncMode
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL, FalClient
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.request import FalRequest
from airflow_provider_fal.core.validation import optional_seconds, positive_seconds
from airflow_provider_fal.exceptions import FalConfigurationError, FalRequestLostError
from airflow_provider_fal.operators.unknown_submit import duplicate_warning, unknown_submit_message

#: The results' names stay importable from here, where they were first (example DAGs use ``outputs``).
__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PROGRESS_INTERVAL",
    "BatchResult",
    "FailurePolicy",
    "FalBatchError",
    "FalBatchRunner",
    "FalNotSentError",
    "coerce_max_concurrency",
    "failures",
    "outputs",
]

DEFAULT_MAX_CONCURRENCY = 8
#: One thread per in-flight request; beyond this, use the queue (``use_queue``) instead.
MAX_CONCURRENCY_CEILING = 256
DEFAULT_PROGRESS_INTERVAL = 30.0

log = logging.getLogger(__name__)


def coerce_max_concurrency(value: Any, field: str = "max_concurrency") -> int:
    """A whole number of requests in flight, 1..256 (a numeric string is accepted)."""
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_CONCURRENCY_CEILING:
        raise FalConfigurationError(
            f"{field} must be a whole number from 1 to {MAX_CONCURRENCY_CEILING}, got {value!r}. Stay at or below "
            "your fal account's concurrency limit; use the queue (use_queue=True) for more parallel jobs."
        )
    return number


class FalBatchRunner:
    """Runs a list of prepared requests (one per input) with one shared client.

    :param client: the client whose session, URLs, headers, retry policy and error classes every
        request uses. Its ``pool_maxsize`` must be at least ``max_concurrency``.
    :param max_concurrency: HTTP requests in flight at most (1..256).
    :param failure_policy: when failed inputs fail the batch; see :class:`FailurePolicy`.
    :param progress_interval: seconds between progress lines in the log.
    :param logger: where progress and failures are logged.
    :param use_queue: submit every input to fal's queue and poll them, instead of holding one
        synchronous request (and connection) per running generation. For long generations.
    :param poll_interval: queue mode: seconds between status polls of one request at first
        (see :func:`~airflow_provider_fal.batch.scheduling.next_poll_delay`).
    :param poll_timeout: queue mode: seconds a request may take from submit to completion
        before it is cancelled and reported as failed (``None``: no limit).
    """

    def __init__(
        self,
        client: FalClient,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        failure_policy: FailurePolicy | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        logger: Any = None,
        use_queue: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        poll_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.max_concurrency = coerce_max_concurrency(max_concurrency)
        if client.pool_maxsize < self.max_concurrency:
            raise FalConfigurationError(
                f"The client's connection pool holds {client.pool_maxsize} connections, fewer than "
                f"max_concurrency={self.max_concurrency}; build it with FalClient(..., pool_maxsize="
                f"{self.max_concurrency}) or FalHook(..., pool_maxsize={self.max_concurrency})."
            )
        self.policy = failure_policy or FailurePolicy()
        self.progress_interval = positive_seconds(progress_interval, "progress_interval")
        self.use_queue = bool(use_queue)
        self.poll_interval = positive_seconds(poll_interval, "poll_interval")
        self.poll_timeout = optional_seconds(poll_timeout, "poll_timeout")
        self.log = logger or log
        self._ledger = BatchLedger(0, self.policy, self.log, self.cancel)
        self._limit: AdaptiveLimit | None = None
        self._mode: SyncMode | QueueMode | None = None

    # ------------------------------------------------------------------ public

    def run(
        self,
        items: Sequence[FalRequest],
        *,
        model_id: str | None = None,
        progress: BatchProgress | None = None,
        finish: FinishHook | None = None,
        on_unknown_submit: str = "fail",
        submit_only: bool = False,
        budget: Budget | None = None,
    ) -> BatchResult:
        """Send every prepared request (see :func:`~airflow_provider_fal.batch.inputs.prepare_inputs`)
        as it is; block until all are done.

        ``model_id`` names the batch in the log and the result (default: the first item's model).
        ``progress``: the batch's durable progress: what earlier tries finished is reused, what
        they queued is polled, and this try records its own. ``finish``: called with each input's
        entry as it finishes (see :class:`BatchLedger`). ``on_unknown_submit``: ``"fail"`` or
        ``"resubmit"`` a queue submit whose answer was lost (see
        :mod:`~airflow_provider_fal.operators.unknown_submit`). ``submit_only`` (queue mode, with
        ``progress``): submit and record every input, poll nothing; submitted inputs are left
        without an entry (reported as not run), for a deferrable batch to poll from the triggerer.
        ``budget``: the model's price and ``max_cost``: the estimate is logged before anything is
        sent (:class:`~airflow_provider_fal.batch.budget.FalBudgetError` when it exceeds
        ``max_cost``), and the batch stops sending once the billed units reach it.
        Returns a :class:`BatchResult`; raises only when interrupted (after stopping the batch and
        cancelling its queued requests).
        """
        model_id = model_id or (items[0].model_id if items else "")
        total = len(items)
        started = time.monotonic()
        ledger = self._ledger = BatchLedger(total, self.policy, self.log, self.cancel, finish)
        limit = self._limit = AdaptiveLimit(self.max_concurrency)
        attempts = LimitedAttempts(
            self.client.retry_policy, limit, ledger, self.log, retry_refused_at_once=not self.use_queue
        )
        to_send, reattach = self._resume(items, ledger, progress, on_unknown_submit)
        if budget is not None:
            ledger.budget = budget
            budget.check_start(model_id, [items[index].arguments for index in to_send], ledger.billed_units, self.log)
        if self.use_queue:
            self._mode = QueueMode(
                self.client,
                items,
                ledger,
                attempts,
                poll_interval=self.poll_interval,
                poll_timeout=self.poll_timeout,
                log=self.log,
                to_submit=to_send,
                reattach=reattach,
                progress=progress,
                on_unknown_submit=on_unknown_submit,
                submit_only=submit_only,
            )
        else:
            self._mode = SyncMode(self.client, items, ledger, attempts, to_send, on_unknown_submit)
        if submit_only:
            reattach = {}  # polled from the triggerer
        if not to_send and not reattach:
            self.log.info("fal batch %s: %d inputs, nothing to send.", model_id, total)
            return ledger.result(model_id, time.monotonic() - started, limit)
        _ = self.client.session  # create the one session before the threads share it
        workers = min(self.max_concurrency, len(to_send) + len(reattach))
        self.log.info(
            "fal batch %s: %d inputs (%d to send), %s, up to %d requests in flight; failure policy: %s",
            model_id,
            total,
            len(to_send),
            "submitted to fal's queue and polled" if self.use_queue else "synchronous runs",
            workers,
            self.policy.describe(),
        )
        self._run_workers(self._mode.work, workers, model_id, started)
        result = ledger.result(model_id, time.monotonic() - started, limit)
        result.reattached = len(reattach)
        self._log_progress(model_id, started, final=True)
        if result.errors_by_type:
            kinds = ", ".join(f"{name} x{count}" for name, count in result.errors_by_type.most_common())
            self.log.warning("fal batch %s: failures by kind: %s", model_id, kinds)
        return result

    def cancel(self, reason: str = "cancelled", *, cancel_submitted: bool = False) -> None:
        """Send no further inputs; requests already in flight finish (and are reported).

        With ``cancel_submitted`` (a killed task), queued requests are not waited for but
        cancelled on fal, so they stop running (and billing).
        """
        self._ledger.request_stop(reason)
        if self._mode is not None:
            self._mode.stop(abort=cancel_submitted)

    # ------------------------------------------------------------------ helpers

    def _resume(
        self,
        items: Sequence[FalRequest],
        ledger: BatchLedger,
        progress: BatchProgress | None,
        on_unknown_submit: str,
    ) -> tuple[list[int], dict[int, QueueHandle]]:
        """What this try sends and which queued requests of earlier tries it polls; reused entries go to the ledger."""
        if progress is None:
            return list(range(len(items))), {}
        resumed = progress.resume()
        ledger.reuse(resumed.done)
        for index, entry in resumed.unstored.items():  # paid for: store the media again, never regenerate
            ledger.record(index, entry, None)
        reattach: dict[int, QueueHandle] = {}
        for index, request_id in resumed.submitted.items():
            if self.use_queue:
                reattach[index] = self.client.queue_handle(items[index].model_id, request_id)
            else:
                self.log.warning(
                    "fal batch: input %d was queued on fal as %s by an earlier try in queue mode; this try runs "
                    "synchronously and sends it again (billed again). Keep use_queue=True to reattach instead.",
                    index,
                    request_id,
                )
        resend: set[int] = set()
        for index, at in resumed.unknown.items():
            model_id = items[index].model_id
            if on_unknown_submit == "resubmit":
                self.log.warning("fal batch: input %d: %s", index, duplicate_warning(model_id, at))
                resend.add(index)
                continue
            error = FalRequestLostError(unknown_submit_message(model_id, at, previous_try=True))
            error.permanent = True
            with ledger.lock:
                ledger.unknown_submits += 1
            ledger.record(index, error_entry(index, error), error)
        if resumed.done or resumed.unstored or resumed.submitted or resumed.unknown or resumed.stale:
            self.log.info("fal batch: resuming from %s: %s", progress.where, resumed.describe())
        skip = set(resumed.done) | set(resumed.unstored) | set(reattach) | (set(resumed.unknown) - resend)
        return [index for index in range(len(items)) if index not in skip], reattach

    def _run_workers(self, work: Callable[[], None], workers: int, model_id: str, started: float) -> None:
        """``work`` in ``workers`` threads; progress lines until all return. A kill cancels the batch."""
        finished = threading.Event()
        running = [workers]
        lock = threading.Lock()

        def worker() -> None:
            try:
                work()
            finally:
                with lock:
                    running[0] -= 1
                    if running[0] == 0:
                        finished.set()

        threads = [threading.Thread(target=worker, name=f"fal-batch-{n}", daemon=True) for n in range(workers)]
        for thread in threads:
            thread.start()
        try:
            while not finished.wait(self.progress_interval):
                self._log_progress(model_id, started)
        except BaseException:  # a kill or execution_timeout: stop, and cancel what fal still runs
            self.cancel("the task was interrupted", cancel_submitted=True)
            raise
        for thread in threads:
            thread.join()

    def _log_progress(self, model_id: str, started: float, *, final: bool = False) -> None:
        ledger, limit, mode = self._ledger, self._limit, self._mode
        with ledger.lock:
            done, failed, rate_limited = ledger.done, ledger.failed, ledger.rate_limited
        total = ledger.total
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        parts = [
            f"fal batch {model_id}: {done}/{total} done ({done / total:.0%})" if total else f"fal batch {model_id}",
            f"{failed} failed",
            f"{rate:.1f}/s",
        ]
        if final:
            parts.append(f"took {elapsed:.1f} s")
        else:
            eta = (total - done) / rate if rate > 0 else math.inf
            parts.append(f"ETA {_duration(eta)}")
            if isinstance(mode, QueueMode):
                parts.append(f"{mode.queued_on_fal} queued on fal")
            if limit is not None:
                parts.append(f"in flight {limit.in_flight}/{limit.limit}")
        if rate_limited:
            parts.append(f"{rate_limited} rate-limited (429) answers")
        self.log.info(", ".join(parts))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
