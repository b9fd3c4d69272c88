"""Each input's attempts, one at a time through the batch's :class:`AdaptiveLimit`.

The batch sends every prepared request with a single-attempt retry policy and retries it here
with the client's own policy and error classes, so that it sees every 429 and lowers the limit
(instead of the client retrying 429s behind its back). Both modes send this way: a synchronous
run, or a queue submit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_fal.batch.ledger import BatchLedger
from airflow_provider_fal.batch.scheduling import AdaptiveLimit
from airflow_provider_fal.core.retry import RetryPolicy, retrying
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

    429s lower the limit (and are counted); retried attempts are counted; once the batch stops,
    an attempt not yet started raises :class:`~airflow_provider_fal.batch.results.FalNotSentError`.
    """

    def __init__(self, policy: RetryPolicy, limit: AdaptiveLimit, ledger: BatchLedger, log: Any) -> None:
        self.policy = policy
        self.limit = limit
        self.ledger = ledger
        self._retry_log = QuietRetryLog(log)

    def send(self, index: int, call: Callable[[], T]) -> T:
        """``call()`` (one attempt, e.g. ``client.send(item, retry_policy=SINGLE_ATTEMPT)``) until it succeeds."""
        attempts = 0
        try:
            for attempt in retrying(self.policy, self._retry_log, f"fal batch input {index}"):  # type: ignore[arg-type]
                with attempt:
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
                        self.limit.release(token, rate_limited=rate_limited, error=failure)
                        if rate_limited:
                            self.ledger.count_attempts(rate_limited=True)
        finally:
            if attempts > 1:
                self.ledger.count_attempts(retried=attempts - 1)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
