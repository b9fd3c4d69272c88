"""Retry policy: what is retried (decided by the error class) and how long we wait.

The decision comes from :attr:`FalError.retryable`, set by :mod:`classify` from fal's error
semantics: 429, 502/503/504 (not the user's own start timeout), ``X-Fal-Needs-Retry: 1`` and
connection failures before the request was sent. Never 400/401/403/404/422 or a lost answer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import tenacity

from airflow_provider_fal.core.validation import MAX_CALL_SECONDS
from airflow_provider_fal.exceptions import FalConfigurationError, FalError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries retryable fal errors.

    * ``max_attempts``: attempts in all, the first included (1 disables retries).
    * ``initial_backoff``/``max_backoff``: exponential backoff bounds in seconds; each wait
      is multiplied by a random factor in [0.5, 1.5) (jitter).
    * ``max_total_wait``: the sum of all waits never exceeds this; a retry whose wait would
      go past it is not made.
    * ``max_retry_after``: an honoured ``Retry-After`` is capped at this.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_total_wait: float = 120.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FalConfigurationError(f"retry policy field {name} must be a number, got {value!r}.")

        def seconds_ok(value: float) -> bool:
            return 0 <= value <= MAX_CALL_SECONDS  # also False for NaN

        checks = {
            "max_attempts": self.max_attempts >= 1
            and (isinstance(self.max_attempts, int) or float(self.max_attempts).is_integer()),
            "initial_backoff": seconds_ok(self.initial_backoff),
            "max_backoff": seconds_ok(self.max_backoff) and self.max_backoff >= self.initial_backoff,
            "max_total_wait": seconds_ok(self.max_total_wait),
            "max_retry_after": seconds_ok(self.max_retry_after),
        }
        for name, ok in checks.items():
            if not ok:
                raise FalConfigurationError(
                    f"retry policy field {name}={getattr(self, name)!r} is invalid: attempts must be a "
                    "whole number >= 1, times 0 to 86400 seconds (a day), and max_backoff >= initial_backoff."
                )

    @classmethod
    def from_value(cls, value: RetryPolicy | dict[str, Any] | None) -> RetryPolicy:
        """Accept a policy, a dict of its fields (e.g. from connection extras or a trigger), or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise FalConfigurationError(
                    f"unknown retry policy fields {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}."
                )
            try:
                return cls(**{k: _number(v, whole=k == "max_attempts") for k, v in value.items()})
            except (TypeError, ValueError) as error:
                raise FalConfigurationError(f"invalid retry policy {value!r}: {error}") from None
        raise FalConfigurationError(f"retry policy must be a RetryPolicy or dict, got {type(value).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def backoff(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        # The exponent is capped: 2**1024 would overflow a float long after max_backoff is reached.
        base = min(self.max_backoff, self.initial_backoff * (2 ** min(attempt - 1, 64)))
        return min(self.max_backoff, base * random.uniform(0.5, 1.5))


def _number(value: Any, *, whole: bool) -> int | float:
    """A number from a dict value (e.g. a string from connection extras); a whole count stays whole."""
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not a number")
    number = float(value)
    return int(number) if whole and number.is_integer() else number


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, FalError) and error.retryable


#: Whether a failed attempt (its number, 1-based, and its error) may be retried without a backoff wait.
RetryNow = Callable[[int, BaseException | None], bool]


def _tenacity_kwargs(
    policy: RetryPolicy, logger: logging.Logger, what: str, retry_now: RetryNow | None = None
) -> dict[str, Any]:
    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if retry_now is not None and retry_now(state.attempt_number, error):
            return 0.0
        return policy.backoff(state.attempt_number, error)

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= policy.max_attempts:
            return True
        return state.idle_for + state.upcoming_sleep > policy.max_total_wait

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.2f s",
            what,
            state.attempt_number,
            policy.max_attempts,
            error,
            state.upcoming_sleep,
        )

    return {
        "retry": tenacity.retry_if_exception(is_retryable),
        "wait": wait,
        "stop": stop,
        "before_sleep": log_retry,
        "reraise": True,
    }


def retrying(
    policy: RetryPolicy, logger: logging.Logger, what: str, *, retry_now: RetryNow | None = None
) -> tenacity.Retrying:
    """A tenacity ``Retrying`` for one logical call, e.g. ``for attempt in retrying(...)``.

    ``retry_now``: a caller that paces its attempts itself (the batch's adaptive limit) may skip
    the backoff wait of some failed attempts; they still count against ``max_attempts``.
    """
    return tenacity.Retrying(**_tenacity_kwargs(policy, logger, what, retry_now))


def call_with_retries(
    policy: RetryPolicy,
    logger: logging.Logger,
    what: str,
    call: Callable[[], T],
    *,
    retry_now: RetryNow | None = None,
) -> T:
    """``call()``, retried as ``policy`` says (``retry_now``: as for :func:`retrying`).

    The first attempt is made directly, without the per-call set-up of a tenacity ``Retrying``
    (about a tenth of a queue call's CPU); only a retryable failure of it builds one, whose
    first attempt is that failure (re-raised, not sent again), so backoff, logging and the
    attempt count are what they would have been.
    """
    try:
        return call()
    except BaseException as error:
        if policy.max_attempts == 1 or not is_retryable(error):
            raise
        first_failure: BaseException | None = error
    for attempt in retrying(policy, logger, what, retry_now=retry_now):
        with attempt:
            if first_failure is not None:
                failure, first_failure = first_failure, None
                raise failure
            return call()
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


def async_retrying(policy: RetryPolicy, logger: logging.Logger, what: str) -> tenacity.AsyncRetrying:
    """The same policy for async callers (the triggers)."""
    return tenacity.AsyncRetrying(**_tenacity_kwargs(policy, logger, what))
