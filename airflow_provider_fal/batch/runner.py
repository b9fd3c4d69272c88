"""Run many inputs of one fal model over one shared :class:`FalClient`, with bounded, adaptive concurrency.

Airflow-free; :class:`~airflow_provider_fal.operators.batch.FalBatchRunOperator` wraps it.

* **Bounded concurrency.** At most ``max_concurrency`` requests are in flight, from as many
  worker threads sharing the client's one ``requests.Session``, whose pool must hold that many
  connections (``FalClient(pool_maxsize=max_concurrency)``).
* **Backpressure.** A 429 (the account's concurrency limit) halves the in-flight limit and pauses
  new requests for one backoff of the client's retry policy; every other answer raises the limit
  again by about one per round of requests, up to ``max_concurrency`` (AIMD, as in TCP).
* **Retries** of each input follow the client's :class:`RetryPolicy` and error classes; the batch
  makes each attempt itself (one attempt per ``client.request`` call) so it sees every 429.
* **Results** come back in input order, one entry per input, each either the model output or a
  structured error: nothing is dropped. A :class:`FailurePolicy` decides whether the batch as a
  whole failed.
* **Progress** goes to the log every ``progress_interval`` seconds: done/total, failures, rate, ETA.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_fal.batch.scheduling import (
    AdaptiveLimit,
    QueueWork,
    ScheduledPoll,
    next_poll_delay,
)
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL, FalClient, FalRequest, FalResponse
from airflow_provider_fal.core.queue import ALREADY_COMPLETED, CANCELLATION_REQUESTED, QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy, retrying
from airflow_provider_fal.core.validation import coerce_arguments, optional_seconds, positive_seconds
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalClientError,
    FalConfigurationError,
    FalError,
    FalRateLimitError,
    FalRequestFailedError,
    FalTimeoutError,
)

DEFAULT_MAX_CONCURRENCY = 8
#: One thread per in-flight request; beyond this, use the queue (``use_queue``) instead.
MAX_CONCURRENCY_CEILING = 256
DEFAULT_PROGRESS_INTERVAL = 30.0
#: Failed inputs logged one by one; later ones are only counted (a 10,000-input batch must not
#: print 10,000 lines).
LOGGED_FAILURES = 10
#: Queue mode: a request whose status could not be read this many times in a row (each poll
#: already retried by the client) is reported as failed.
MAX_FAILED_POLLS = 5
#: Seconds a killed batch spends cancelling its queued requests on fal.
CANCEL_DEADLINE = 20.0
_SINGLE_ATTEMPT = RetryPolicy(max_attempts=1)

log = logging.getLogger(__name__)


class FalBatchError(FalError):
    """The batch as a whole failed its :class:`FailurePolicy` (or was stopped).

    ``summary`` holds the batch's counts; ``permanent`` is set when retrying the batch cannot
    help (every failure was permanent, e.g. rejected inputs or a wrong key).
    """

    def __init__(self, message: str, *, summary: dict[str, Any], permanent: bool) -> None:
        super().__init__(message, detail=summary)
        self.summary = summary
        self.permanent = permanent


class FalNotSentError(FalError):
    """The error of an input that was never run because the batch stopped first."""


# --------------------------------------------------------------------------- inputs and policy


def coerce_inputs(value: Any, field: str = "inputs") -> list[dict[str, Any]]:
    """The batch's model inputs as a list of JSON objects, each validated like ``arguments``.

    Accepts a list (or any non-string iterable, e.g. a resolved XComArg) of dicts or JSON-object
    strings, or a string holding a JSON list (as a rendered template gives). Every bad input is
    reported (up to five), by index, before anything is sent.
    """
    if value is None:
        raise FalConfigurationError(f"{field} is required: a list of model inputs like [{{'prompt': 'a cat'}}, ...].")
    if isinstance(value, (str, bytes)):
        value = _parse_list_text(value.decode() if isinstance(value, bytes) else value, field)
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise FalConfigurationError(
            f"{field} must be a list of model inputs (one dict per call), got {type(value).__name__}; "
            "e.g. [{'prompt': 'a cat'}, {'prompt': 'a dog'}]."
        )
    inputs: list[dict[str, Any]] = []
    problems: list[str] = []
    for index, item in enumerate(value):
        try:
            inputs.append(coerce_arguments(item, field=f"{field}[{index}]"))
        except FalConfigurationError as error:
            problems.append(error.message)
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise FalConfigurationError(
            f"{len(problems)} of the {len(problems) + len(inputs)} {field} are invalid; nothing was sent:\n  "
            f"{shown}{more}"
        )
    return inputs


def _parse_list_text(text: str, field: str) -> Any:
    """A rendered template: JSON, or the Python repr Jinja gives for a list of dicts."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise FalConfigurationError(
            f"{field} is a string that is neither a JSON list nor a Python list literal. Pass the list "
            "itself (e.g. an upstream task's XComArg, `task.output`), or render it as JSON with "
            "`{{ ... | tojson }}`."
        ) from None


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


@dataclass(frozen=True)
class FailurePolicy:
    """When failed inputs fail the batch.

    * ``max_failures``: the batch fails if more than this many inputs failed.
    * ``max_failure_rate``: the batch fails if more than this fraction (0..1) of inputs failed.
    * ``fail_fast``: stop sending new inputs as soon as a limit is exceeded (inputs already in
      flight finish; unsent ones are reported as not run) instead of trying every input first.

    With neither limit set, any failed input fails the batch (``max_failures=0``), after every
    input was tried. ``max_failure_rate=1`` never fails it: failures are only reported.
    """

    max_failures: int | None = None
    max_failure_rate: float | None = None
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if self.max_failures is not None and (
            isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0
        ):
            raise FalConfigurationError(
                f"max_failures must be a whole number >= 0 (e.g. 10), got {self.max_failures!r}. "
                "Use max_failure_rate=1 to never fail the batch."
            )
        rate = self.max_failure_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0 <= rate <= 1
        ):
            raise FalConfigurationError(
                f"max_failure_rate must be a fraction from 0 to 1 (e.g. 0.05 for 5%), got {rate!r}."
            )
        if not isinstance(self.fail_fast, bool):
            raise FalConfigurationError(f"fail_fast must be True or False, got {self.fail_fast!r}.")

    @property
    def _count_limit(self) -> int | None:
        if self.max_failures is None and self.max_failure_rate is None:
            return 0
        return self.max_failures

    def describe(self) -> str:
        limits = []
        if self._count_limit is not None:
            limits.append(f"more than {self._count_limit} failed inputs")
        if self.max_failure_rate is not None:
            if self.max_failure_rate >= 1:
                return "never fail the batch; failed inputs are only reported"
            limits.append(f"more than {self.max_failure_rate:.1%} failed inputs")
        when = "stop at once" if self.fail_fast else "fail at the end"
        return f"{when} on {' or '.join(limits)}"

    def exceeded(self, failed: int, total: int) -> str | None:
        """Why ``failed`` of ``total`` inputs break this policy, or ``None`` when they do not."""
        count_limit = self._count_limit
        if count_limit is not None and failed > count_limit:
            return f"{failed} of {total} inputs failed, more than max_failures={count_limit}"
        if self.max_failure_rate is not None and total and failed / total > self.max_failure_rate:
            share = f"{failed / total:.1%}"
            return f"{failed} of {total} inputs failed ({share}), more than max_failure_rate={self.max_failure_rate:g}"
        return None


# --------------------------------------------------------------------------- results


def success_entry(index: int, output: Any, request_id: str | None) -> dict[str, Any]:
    return {"index": index, "ok": True, "output": output, "request_id": request_id}


def error_entry(index: int, error: FalError) -> dict[str, Any]:
    return {"index": index, "ok": False, "error": error.to_dict(), "request_id": error.request_id}


def stops_batch(error: FalError) -> bool:
    """Whether every further input would fail like this: a refused key, a locked account, an unknown model."""
    return isinstance(error, FalAuthError) or (isinstance(error, FalClientError) and error.status_code == 404)


def outputs(results: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The outputs of the successful entries, in input order (a helper for downstream tasks)."""
    return [entry["output"] for entry in results if entry.get("ok")]


def failures(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The failed (or not run) entries, in input order."""
    return [entry for entry in results if not entry.get("ok")]


@dataclass
class BatchResult:
    """What a batch run produced: one entry per input, in input order, and its counts."""

    model_id: str
    results: list[dict[str, Any]]
    elapsed: float
    not_run: int = 0
    rate_limited: int = 0
    retried: int = 0
    peak_in_flight: int = 0
    lowest_limit: int = 0
    final_limit: int = 0
    stopped: str | None = None
    #: failed inputs whose error is not permanent (a retry of the whole batch might help them)
    transient_failures: int = 0
    errors_by_type: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def succeeded(self) -> int:
        return sum(1 for entry in self.results if entry["ok"])

    @property
    def failed(self) -> int:
        """Inputs that did not produce an output (not-run ones included)."""
        return self.total - self.succeeded

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts, e.g. for XCom."""
        return {
            "model_id": self.model_id,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed - self.not_run,
            "not_run": self.not_run,
            "elapsed_seconds": round(self.elapsed, 3),
            "per_second": round(self.total / self.elapsed, 3) if self.elapsed > 0 else None,
            "rate_limited_answers": self.rate_limited,
            "retried_attempts": self.retried,
            "peak_in_flight": self.peak_in_flight,
            "lowest_concurrency_limit": self.lowest_limit,
            "final_concurrency_limit": self.final_limit,
            "stopped": self.stopped,
            "errors_by_type": dict(self.errors_by_type),
        }


# --------------------------------------------------------------------------- the runner


class _QuietRetryLog:
    """Stands in for the logger of :func:`retry.retrying`: per-attempt retry lines go to DEBUG.

    A 429 storm over 10,000 inputs must not print a line per attempt; the batch counts them.
    Duck-typed, because an operator's ``log`` is a structlog logger on newer Airflow.
    """

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def warning(self, msg: str, *args: Any) -> None:
        self._logger.debug(msg, *args)


class FalBatchRunner:
    """Runs a list of inputs against one model with one shared client.

    :param client: the client whose session, URLs, headers, retry policy and error classes every
        request uses. Its ``pool_maxsize`` must be at least ``max_concurrency``.
    :param max_concurrency: HTTP requests in flight at most (1..256).
    :param failure_policy: when failed inputs fail the batch; see :class:`FailurePolicy`.
    :param progress_interval: seconds between progress lines in the log.
    :param logger: where progress and failures are logged.
    :param use_queue: submit every input to fal's queue and poll them, instead of holding one
        synchronous request (and connection) per running generation. For long generations.
    :param poll_interval: queue mode: seconds between status polls of one request at first
        (see :func:`next_poll_delay`).
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
        self._retry_log = _QuietRetryLog(self.log)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._limit: AdaptiveLimit | None = None
        self._queue: QueueWork | None = None
        self._reset(0)

    def _reset(self, total: int) -> None:
        self._results: list[dict[str, Any] | None] = [None] * total
        self._next = 0
        self._done = 0
        self._failed = 0
        self._rate_limited = 0
        self._retried = 0
        self._errors: Counter[str] = Counter()
        self._transient = 0
        self._stopped: str | None = None
        self._stop.clear()

    # ------------------------------------------------------------------ public

    def run(self, request: FalRequest, inputs: Sequence[dict[str, Any]], *, timeout: Any = None) -> BatchResult:
        """Send ``request`` (model, headers, start timeout) once per input; block until all are done.

        ``inputs`` must already be validated (see :func:`coerce_inputs`); ``timeout`` is the read
        timeout of each synchronous call. Returns a :class:`BatchResult`; raises only when
        interrupted (after stopping the batch and cancelling its queued requests).
        """
        total = len(inputs)
        self._reset(total)
        started = time.monotonic()
        policy = self.client.retry_policy
        self._limit = AdaptiveLimit(self.max_concurrency, pause=policy.backoff)
        self._queue = QueueWork(total) if self.use_queue else None
        if total == 0:
            self.log.info("fal batch %s: no inputs, nothing to send.", request.model_id)
            return self._result(request.model_id, started)
        _ = self.client.session  # create the one session before the threads share it
        workers = min(self.max_concurrency, total)
        self.log.info(
            "fal batch %s: %d inputs, %s, up to %d requests in flight; failure policy: %s",
            request.model_id,
            total,
            "submitted to fal's queue and polled" if self.use_queue else "synchronous runs",
            workers,
            self.policy.describe(),
        )
        if self.use_queue:
            url = f"{self.client.queue_url}/{request.model_id}"
            read_timeout = self.client.queue_call_timeout()
        else:
            url = self.client.run_endpoint(request.model_id)
            read_timeout = self.client.read_timeout(timeout, request.start_timeout)
        work = self._work_queue if self.use_queue else self._work_sync
        finished = threading.Event()
        running = [workers]

        def worker() -> None:
            try:
                work(url, request, inputs, read_timeout)
            finally:
                with self._lock:
                    running[0] -= 1
                    if running[0] == 0:
                        finished.set()

        threads = [threading.Thread(target=worker, name=f"fal-batch-{n}", daemon=True) for n in range(workers)]
        for thread in threads:
            thread.start()
        try:
            while not finished.wait(self.progress_interval):
                self._log_progress(request.model_id, started, total)
        except BaseException:  # a kill or execution_timeout: stop, and cancel what fal still runs
            self.cancel("the task was interrupted", cancel_submitted=True)
            raise
        for thread in threads:
            thread.join()
        result = self._result(request.model_id, started)
        self._log_progress(request.model_id, started, total, final=True)
        if result.errors_by_type:
            kinds = ", ".join(f"{name} x{count}" for name, count in result.errors_by_type.most_common())
            self.log.warning("fal batch %s: failures by kind: %s", request.model_id, kinds)
        return result

    def cancel(self, reason: str = "cancelled", *, cancel_submitted: bool = False) -> None:
        """Send no further inputs; requests already in flight finish (and are reported).

        With ``cancel_submitted`` (a killed task), queued requests are not waited for but
        cancelled on fal, so they stop running (and billing).
        """
        with self._lock:
            if self._stopped is None:
                self._stopped = reason
        self._stop.set()
        limit, queue = self._limit, self._queue
        if limit is not None and (queue is None or cancel_submitted):
            limit.close()  # nothing starts any more (in queue mode, polls go on unless aborted)
        if queue is not None:
            self._cancel_on_fal(queue.stop(abort=cancel_submitted, on_abort=self._mark_cancelled))

    def _cancel_on_fal(self, handles: dict[int, QueueHandle]) -> None:
        """Cancel queued requests on fal, in parallel, for at most ``CANCEL_DEADLINE`` seconds.

        Each one's result entry says it was cancelled (they count as failed, not as unsent).
        """
        if not handles:
            return
        self.log.warning("fal batch: cancelling %d queued requests on fal", len(handles))
        pending = deque(handles.values())

        def cancel_some() -> None:
            while True:
                try:
                    handle = pending.popleft()
                except IndexError:
                    return
                try:
                    self.client.cancel(handle)
                except FalError as error:
                    self.log.warning("fal batch: could not cancel request %s: %s", handle.request_id, error)

        count = min(self.max_concurrency, len(handles))
        threads = [threading.Thread(target=cancel_some, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + CANCEL_DEADLINE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _mark_cancelled(self, handles: dict[int, QueueHandle]) -> None:
        """Result entries of queued requests cancelled on fal (failed, not unsent)."""
        with self._lock:
            for index, handle in handles.items():
                if self._results[index] is None:
                    cancelled = FalRequestFailedError(
                        f"Cancelled on fal: the batch stopped ({self._stopped}).",
                        error_type="client_cancelled",
                        request_id=handle.request_id,
                    )
                    self._results[index] = error_entry(index, cancelled)
                    self._done += 1
                    self._failed += 1
                    self._errors[type(cancelled).__name__] += 1

    # ------------------------------------------------------------------ sending

    def _send(
        self, index: int, url: str, request: FalRequest, arguments: dict[str, Any], read_timeout: float
    ) -> FalResponse:
        """POST one input with the client's retry policy, one attempt at a time through the limit."""
        limit = self._limit
        assert limit is not None
        attempts = 0
        try:
            for attempt in retrying(self.client.retry_policy, self._retry_log, f"fal batch input {index}"):  # type: ignore[arg-type]
                with attempt:
                    attempts += 1
                    token = None if self._stop.is_set() else limit.acquire()
                    if token is None:
                        raise FalNotSentError(f"Not sent: the batch stopped ({self._stopped}).")
                    rate_limited, failure = False, None
                    try:
                        return self.client.request(
                            "POST",
                            url,
                            body=request.with_arguments(arguments).body,
                            headers=request.headers,
                            read_timeout=read_timeout,
                            retry_policy=_SINGLE_ATTEMPT,
                        )
                    except FalError as error:
                        failure, rate_limited = error, isinstance(error, FalRateLimitError)
                        raise
                    finally:
                        limit.release(token, rate_limited=rate_limited, error=failure)
                        if rate_limited:
                            with self._lock:
                                self._rate_limited += 1
        finally:
            if attempts > 1:
                with self._lock:
                    self._retried += attempts - 1
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _work_sync(self, url: str, request: FalRequest, inputs: Sequence[dict[str, Any]], read_timeout: float) -> None:
        while (index := self._take()) is not None:
            try:
                response = self._send(index, url, request, inputs[index], read_timeout)
            except FalNotSentError:
                continue  # reported as not run at the end
            except FalError as error:
                self._record(index, error_entry(index, error), error)
            except Exception as unexpected:  # a bug must not lose the input: report it as its result
                self._record_unexpected(index, unexpected)
            else:
                self._record(index, success_entry(index, response.output, response.request_id), None)

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self._results):
                return None
            index = self._next
            self._next += 1
            return index

    # ------------------------------------------------------------------ queue mode

    def _work_queue(self, url: str, request: FalRequest, inputs: Sequence[dict[str, Any]], read_timeout: float) -> None:
        queue = self._queue
        assert queue is not None
        while (item := queue.take()) is not None:
            try:
                if isinstance(item, ScheduledPoll):
                    self._poll(item)
                else:
                    self._submit(item, url, request, inputs[item], read_timeout)
            except Exception as unexpected:  # a bug must not lose the input: report it as its result
                index = item.index if isinstance(item, ScheduledPoll) else item
                queue.finished(index)
                self._record_unexpected(index, unexpected)
            finally:
                queue.release()

    def _submit(self, index: int, url: str, request: FalRequest, arguments: dict[str, Any], timeout: float) -> None:
        queue = self._queue
        assert queue is not None
        try:
            response = self._send(index, url, request, arguments, timeout)
            handle = QueueHandle.from_submit(
                response.output, queue_url=self.client.queue_url, model_id=request.model_id
            )
        except FalNotSentError:
            return
        except FalError as error:
            self._record(index, error_entry(index, error), error)
            return
        now = time.monotonic()
        queue.submitted(ScheduledPoll(now + self.poll_interval, index, handle, now))

    def _poll(self, poll: ScheduledPoll) -> None:
        queue = self._queue
        limit = self._limit
        assert queue is not None and limit is not None
        token = limit.acquire()
        if token is None:  # aborted: the request is cancelled on fal by cancel()
            return
        try:
            entry, error = self._check(poll)
        except FalError as failure:
            poll.failed_polls += 1
            if failure.permanent or poll.failed_polls >= MAX_FAILED_POLLS:
                entry, error = error_entry(poll.index, failure), failure
            else:
                entry = error = None
        finally:
            limit.release(token)
        if entry is None:
            now = time.monotonic()
            if not poll.cancelled:
                poll.due = now + next_poll_delay(self.poll_interval, now - poll.submitted)
            queue.submitted(poll)
            return
        queue.finished(poll.index)
        self._record(poll.index, entry, error)

    def _check(self, poll: ScheduledPoll) -> tuple[dict[str, Any] | None, FalError | None]:
        """One status poll: the finished entry, or ``(None, None)`` while the request still runs."""
        status = self.client.status(poll.handle, logs=False)
        failure = status.failure(poll.handle)
        if failure is not None:
            return error_entry(poll.index, failure), failure
        if status.completed:
            response = self.client.result(poll.handle)
            return success_entry(poll.index, response.output, poll.handle.request_id), None
        if self.poll_timeout is not None and time.monotonic() - poll.submitted > self.poll_timeout:
            return self._timed_out(poll)
        return None, None

    def _timed_out(self, poll: ScheduledPoll) -> tuple[dict[str, Any] | None, FalError | None]:
        """Cancel a request that outlived ``poll_timeout``; one that completed meanwhile is fetched."""
        try:
            outcome = self.client.cancel(poll.handle)
        except FalError as error:
            outcome = f"not cancelled ({error})"
        if outcome == ALREADY_COMPLETED and not poll.cancelled:
            poll.cancelled = True
            poll.due = 0.0
            return None, None  # poll again at once: its (billed) result is there to fetch
        outcome = "cancelled" if outcome == CANCELLATION_REQUESTED else outcome
        error = FalTimeoutError(
            f"fal request {poll.handle.request_id} for {poll.handle.model_id} did not complete within "
            f"poll_timeout of {self.poll_timeout:g} s; the request was {outcome}.",
            request_id=poll.handle.request_id,
        )
        return error_entry(poll.index, error), error

    # ------------------------------------------------------------------ results

    def _record_unexpected(self, index: int, unexpected: Exception) -> None:
        self.log.error("fal batch: unexpected error on input %d", index, exc_info=unexpected)
        error = FalError(f"Unexpected error: {type(unexpected).__name__}: {unexpected}")
        self._record(index, error_entry(index, error), error)

    def _record(self, index: int, entry: dict[str, Any], error: FalError | None) -> None:
        stop_reason = None
        with self._lock:
            if self._results[index] is not None:  # already marked cancelled by a kill
                return
            self._results[index] = entry
            self._done += 1
            if error is None:
                return
            self._failed += 1
            failed = self._failed
            self._errors[type(error).__name__] += 1
            if not error.permanent:
                self._transient += 1
            total = len(self._results)
            if stops_batch(error):
                stop_reason = f"input {index} failed with HTTP {error.status_code}, which every input would get"
            elif self.policy.fail_fast:
                # The failures so far already exceed what the policy allows of the whole batch.
                breach = self.policy.exceeded(failed, total)
                if breach:
                    stop_reason = f"fail_fast: {breach}"
        if failed <= LOGGED_FAILURES:
            self.log.warning("fal batch: input %d failed: %s", index, error)
            if failed == LOGGED_FAILURES:
                self.log.warning("fal batch: further failures are only counted, not logged one by one.")
        if stop_reason:
            self.log.error("fal batch: stopping, no further inputs are sent: %s", stop_reason)
            self.cancel(stop_reason)

    def _result(self, model_id: str, started: float) -> BatchResult:
        not_run = 0
        results: list[dict[str, Any]] = []
        for index, entry in enumerate(self._results):
            if entry is None:
                not_run += 1
                entry = error_entry(index, FalNotSentError(f"Not sent: the batch stopped ({self._stopped})."))
            results.append(entry)
        limit = self._limit
        return BatchResult(
            model_id=model_id,
            results=results,
            elapsed=time.monotonic() - started,
            not_run=not_run,
            rate_limited=self._rate_limited,
            retried=self._retried,
            peak_in_flight=limit.peak_in_flight if limit else 0,
            lowest_limit=limit.lowest_limit if limit else 0,
            final_limit=limit.limit if limit else 0,
            stopped=self._stopped,
            transient_failures=self._transient,
            errors_by_type=Counter(self._errors),
        )

    def _log_progress(self, model_id: str, started: float, total: int, *, final: bool = False) -> None:
        with self._lock:
            done, failed, rate_limited = self._done, self._failed, self._rate_limited
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        limit = self._limit
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
            if self._queue is not None:
                parts.append(f"{len(self._queue.outstanding)} queued on fal")
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
