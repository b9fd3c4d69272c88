"""Each input's attempts, one at a time through the batch's :class:`AdaptiveLimit`.

The batch sends every prepared request with a single-attempt retry policy and retries it here
with the client's own policy and error classes, so that it sees every 429 and lowers the limit
(instead of the client retrying 429s behind its back). Both modes send this way: a synchronous
run, or a queue submit.

A synchronous run refused with a 429 while other requests of the batch run (and without
``Retry-After``) is sent again as soon as the limit gives it a slot, without the policy's
backoff: the limit was just lowered to what fal runs, so that slot is one fal freed. (A 429
costs no money, but a backoff of 0.25-0.75 s, then 0.5-1.5 s, left a refused input to finish
long after the rest: L=40, 400 inputs x 100 ms took up to 2.5 s for a 1 s ideal.) The retry
still counts against ``max_attempts``. Queue submits keep the backoff: their 429 is fal's queue
length, which no slot of the batch frees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_fal.batch.ledger import BatchLedger
from airflow_provider_fal.batch.scheduling import AdaptiveLimit
from airflow_provider_fal.core.retry import RetryPolicy, call_with_retries
from airflow_provider_fal.exceptions import FalError, FalRateLimitError

#: The policy every batch call is sent with: the batch makes the retries itself.
SINGLE_ATTEMPT = RetryPolicy(max_attempts=1)

T = TypeVar("T")


class QuietRetryLog:
    """Stands in for the logger of :func:`retry.retrying`: per-attempt retry lines go to DEBUG.

    A 429 storm over 10,000 inputs must not print a line per attempt; the batch counts them.
    Duck-typed, because an operator's ``log`` is a structlog logger on newer Airflow.
    """

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def warning(self, msg: str, *args: Any) -> None:
        self._logger.debug(msg, *args)


class LimitedAttempts:
    """Makes one input's attempts under ``policy``, each holding a slot of ``limit``.

    429s lower the limit (and are counted); with ``retry_refused_at_once`` (synchronous runs) a
    refused attempt is retried without a backoff wait when the limit says so; retried attempts
    are counted; once the batch stops, an attempt not yet started raises
    :class:`~airflow_provider_fal.batch.results.FalNotSentError`.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        limit: AdaptiveLimit,
        ledger: BatchLedger,
        log: Any,
        *,
        retry_refused_at_once: bool = False,
    ) -> None:
        self.policy = policy
        self.retry_refused_at_once = retry_refused_at_once
        self.limit = limit
        self.ledger = ledger
        self._retry_log = QuietRetryLog(log)

    def send(self, index: int, call: Callable[[], T]) -> T:
        """``call()`` (one attempt, e.g. ``client.send(item, retry_policy=SINGLE_ATTEMPT)``) until it succeeds."""
        attempts = 0
        refused_now = [False]  # the last attempt's 429 may be retried as soon as a slot is free

        def retry_now(attempt_number: int, error: BaseException | None) -> bool:
            return self.retry_refused_at_once and refused_now[0]

        def one_attempt() -> T:
            nonlocal attempts
            attempts += 1
            token = None if self.ledger.stopping.is_set() else self.limit.acquire()
            if token is None:
                raise self.ledger.not_sent_error()
            rate_limited, failure = False, None
            try:
                return call()
            except FalError as error:
                failure, rate_limited = error, isinstance(error, FalRateLimitError)
                raise
            finally:
                refused_now[0] = self.limit.release(token, rate_limited=rate_limited, error=failure)
                if rate_limited:
                    self.ledger.count_attempts(rate_limited=True)

        try:
            what = f"fal batch input {index}"
            return call_with_retries(self.policy, self._retry_log, what, one_attempt, retry_now=retry_now)  # type: ignore[arg-type]
        finally:
            if attempts > 1:
                self.ledger.count_attempts(retried=attempts - 1)
