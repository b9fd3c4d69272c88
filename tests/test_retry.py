"""The retry policy: validated settings, bounded jittered backoff, Retry-After, and when to stop.

Network-free. The retried callables are plain functions that raise the error classes the
client raises; backoffs are a few milliseconds so the tests stay fast. Stop decisions are
checked by counting attempts, never by measuring time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest

from airflow_provider_fal.core.retry import RetryPolicy, async_retrying, is_retryable, retrying
from airflow_provider_fal.exceptions import (
    FalAuthError,
    FalConfigurationError,
    FalConnectError,
    FalRateLimitError,
    FalRequestLostError,
    FalServerError,
    FalStartTimeoutError,
    FalTransientError,
    FalValidationError,
)

LOGGER = logging.getLogger("tests.retry")
TINY = {"initial_backoff": 0.001, "max_backoff": 0.002}


class Flaky:
    """A callable that raises the given errors in turn, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def call_with_retries(policy: RetryPolicy, func, what: str = "POST https://fal.run/fal-ai/flux/dev"):
    for attempt in retrying(policy, LOGGER, what):
        with attempt:
            return func()
    raise AssertionError("unreachable")


def transient(n: int = 1, retry_after: float | None = None) -> FalTransientError:
    return FalTransientError(f"Transient fal error: runner disconnected #{n}", status_code=503, retry_after=retry_after)


# --------------------------------------------------------------------------- the policy's fields


def test_defaults_are_valid_and_bounded():
    policy = RetryPolicy()
    assert policy.max_attempts >= 1
    assert 0 <= policy.initial_backoff <= policy.max_backoff
    assert math.isfinite(policy.max_total_wait) and math.isfinite(policy.max_retry_after)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", -1),
        ("max_attempts", 2.5),
        ("initial_backoff", -0.1),
        ("initial_backoff", math.nan),
        ("max_backoff", 0.1),  # below the default initial_backoff of 0.5
        ("max_total_wait", -1),
        ("max_total_wait", math.nan),
        ("max_retry_after", -1),
    ],
)
def test_invalid_fields_are_rejected_by_name(field, value):
    with pytest.raises(FalConfigurationError) as caught:
        RetryPolicy(**{field: value})
    assert field in str(caught.value)
    assert "max_backoff >= initial_backoff" in str(caught.value), "the message says what is valid"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", "3"), ("max_attempts", True), ("initial_backoff", None), ("max_total_wait", [1])],
)
def test_fields_must_be_numbers(field, value):
    with pytest.raises(FalConfigurationError, match=f"{field} must be a number"):
        RetryPolicy(**{field: value})


def test_one_attempt_and_zero_waits_are_valid():
    policy = RetryPolicy(max_attempts=1, initial_backoff=0, max_backoff=0, max_total_wait=0, max_retry_after=0)
    assert policy.backoff(1) == 0


# --------------------------------------------------------------------------- from_value


def test_from_value_none_and_instance():
    assert RetryPolicy.from_value(None) == RetryPolicy()
    policy = RetryPolicy(max_attempts=2)
    assert RetryPolicy.from_value(policy) is policy


def test_from_value_survives_a_json_round_trip():
    """A trigger serialises the policy to JSON and rebuilds it on the triggerer."""
    policy = RetryPolicy(max_attempts=7, initial_backoff=0.25, max_backoff=8, max_total_wait=90, max_retry_after=5)
    data = json.loads(json.dumps(policy.to_dict()))
    rebuilt = RetryPolicy.from_value(data)
    assert rebuilt == policy
    assert type(rebuilt.max_attempts) is int and type(rebuilt.initial_backoff) is float


def test_from_value_coerces_strings_from_connection_extras():
    policy = RetryPolicy.from_value({"max_attempts": "3", "initial_backoff": "0.2", "max_backoff": 1})
    assert policy == RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0)
    assert type(policy.max_backoff) is float


def test_from_value_partial_dict_keeps_defaults():
    assert RetryPolicy.from_value({"max_attempts": 2}) == RetryPolicy(max_attempts=2)
    assert RetryPolicy.from_value({}) == RetryPolicy()
    assert RetryPolicy.from_value({"max_attempts": 4.0}).max_attempts == 4


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"attempts": 3}, "attempts"),
        ({"max_attempts": 3, "jitter": True}, "jitter"),
        ({"max_attempts": "three"}, "three"),
        ({"initial_backoff": "fast"}, "fast"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"initial_backoff": 5, "max_backoff": 1}, "max_backoff"),
        ({"max_attempts": None}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),  # never silently truncated to 2
        ({"max_attempts": "2.5"}, "max_attempts"),
        ({"max_attempts": True}, "True"),
        ({"max_attempts": "inf"}, "max_attempts"),
        ({"max_total_wait": "nan"}, "max_total_wait"),
    ],
)
def test_from_value_rejects_bad_dicts(value, named):
    with pytest.raises(FalConfigurationError) as caught:
        RetryPolicy.from_value(value)
    assert named in str(caught.value)


@pytest.mark.parametrize("value", [3, "3", [3], '{"max_attempts": 3}'])
def test_from_value_rejects_other_types(value):
    with pytest.raises(FalConfigurationError, match="RetryPolicy or dict"):
        RetryPolicy.from_value(value)


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_within_jitter_bounds():
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=30.0)
    for attempt in range(1, 10):
        base = min(30.0, 0.5 * 2 ** (attempt - 1))
        samples = [policy.backoff(attempt) for _ in range(300)]
        assert all(0.5 * base <= sample <= min(30.0, 1.5 * base) for sample in samples), attempt
        # Jitter: not all the same (300 equal draws from [0.5, 1.5) would be a broken RNG).
        assert len(set(samples)) > 1


def test_backoff_never_exceeds_max_backoff():
    policy = RetryPolicy(max_attempts=100, initial_backoff=1.0, max_backoff=4.0)
    samples = [policy.backoff(attempt) for attempt in range(1, 60) for _ in range(20)]
    assert max(samples) <= 4.0
    assert min(policy.backoff(60) for _ in range(200)) >= 2.0, "capped base 4.0 times at least 0.5"


def test_backoff_of_a_huge_attempt_number_stays_capped():
    policy = RetryPolicy(max_attempts=5000, initial_backoff=0.5, max_backoff=30.0)
    assert 15.0 <= policy.backoff(4000) <= 30.0


def test_zero_initial_backoff_means_no_wait():
    policy = RetryPolicy(initial_backoff=0, max_backoff=0)
    assert {policy.backoff(attempt) for attempt in range(1, 6)} == {0}


@pytest.mark.parametrize(("retry_after", "expected"), [(0, 0.0), (2, 2.0), (3600, 60.0), (60.5, 60.0)])
def test_retry_after_is_honoured_exactly_up_to_the_cap(retry_after, expected):
    policy = RetryPolicy(max_retry_after=60.0)
    error = FalRateLimitError("limit", status_code=429, retry_after=retry_after)
    assert {policy.backoff(attempt, error) for attempt in (1, 2, 5)} == {expected}


def test_retry_after_may_exceed_max_backoff_but_not_max_retry_after():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, max_retry_after=10.0)
    assert policy.backoff(1, FalRateLimitError("limit", retry_after=5)) == 5.0
    assert policy.backoff(1, FalRateLimitError("limit", retry_after=50)) == 10.0


def test_an_error_without_retry_after_uses_the_backoff():
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0)
    assert 0.5 <= policy.backoff(1, transient()) <= 1.0


# --------------------------------------------------------------------------- what is retried


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (transient(), True),
        (FalRateLimitError("limit"), True),
        (FalConnectError("refused"), True),
        (FalAuthError("bad key"), False),
        (FalValidationError("bad input"), False),
        (FalStartTimeoutError("no runner"), False),
        (FalServerError("500"), False),
        (FalRequestLostError("lost"), False),
        (ValueError("not a fal error"), False),
        (ConnectionError("not a fal error either"), False),
    ],
)
def test_is_retryable(error, retryable):
    assert is_retryable(error) is retryable


def test_success_after_retryable_failures():
    func = Flaky(transient(1), FalRateLimitError("limit", retry_after=0), FalConnectError("refused"))
    assert call_with_retries(RetryPolicy(max_attempts=4, **TINY), func) == "ok"
    assert func.calls == 4


@pytest.mark.parametrize(
    "error",
    [
        FalAuthError("bad key", status_code=401),
        FalValidationError("bad input", status_code=422),
        FalStartTimeoutError("no runner", status_code=504),
        FalServerError("boom", status_code=500),
        FalRequestLostError("sent, answer lost"),
        KeyError("a bug"),
    ],
)
def test_non_retryable_errors_are_raised_at_once(error, caplog):
    func = Flaky(error)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name), pytest.raises(type(error)) as caught:
        call_with_retries(RetryPolicy(max_attempts=5, **TINY), func)
    assert caught.value is error, "the original error, not a tenacity RetryError"
    assert func.calls == 1
    assert not caplog.records


def test_a_retryable_flag_set_on_an_instance_is_honoured():
    """The client marks a lost answer of an idempotent request (a status poll) retryable."""
    lost = FalRequestLostError("lost")
    lost.retryable = True
    func = Flaky(lost)
    assert call_with_retries(RetryPolicy(max_attempts=2, **TINY), func) == "ok"
    assert func.calls == 2


# --------------------------------------------------------------------------- when to stop


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_stops_after_max_attempts_and_reraises_the_last_error(max_attempts):
    errors = [transient(n) for n in range(1, 10)]
    func = Flaky(*errors)
    with pytest.raises(FalTransientError) as caught:
        call_with_retries(RetryPolicy(max_attempts=max_attempts, **TINY), func)
    assert func.calls == max_attempts
    assert caught.value is errors[max_attempts - 1]


def test_stops_before_a_wait_that_would_pass_max_total_wait():
    # Retry-After makes the waits exact: 0.02 + 0.02 = 0.04 fits in 0.05, a third would not.
    policy = RetryPolicy(max_attempts=50, max_total_wait=0.05, max_retry_after=1.0)
    func = Flaky(*[transient(n, retry_after=0.02) for n in range(1, 50)])
    with pytest.raises(FalTransientError):
        call_with_retries(policy, func)
    assert func.calls == 3


def test_max_total_wait_zero_allows_only_free_retries():
    policy = RetryPolicy(max_attempts=5, max_total_wait=0)
    func = Flaky(transient(1, retry_after=0.01))
    with pytest.raises(FalTransientError):
        call_with_retries(policy, func)
    assert func.calls == 1
    free = Flaky(transient(1, retry_after=0), transient(2, retry_after=0))
    assert call_with_retries(policy, free) == "ok"
    assert free.calls == 3


def test_retry_now_skips_the_wait_of_the_attempts_it_picks_and_they_still_count():
    policy = RetryPolicy(max_attempts=3, initial_backoff=30, max_backoff=30, max_total_wait=0)
    picked = []

    def retry_now(attempt_number: int, error: BaseException | None) -> bool:
        picked.append((attempt_number, type(error).__name__))
        return True

    def run(func: Flaky, now) -> str:
        for attempt in retrying(policy, LOGGER, "POST https://fal.run/fal-ai/flux/dev", retry_now=now):
            with attempt:
                return func()
        raise AssertionError("unreachable")

    assert run(Flaky(transient(1), transient(2)), retry_now) == "ok"  # no 30 s wait, none allowed
    assert picked == [(1, "FalTransientError"), (2, "FalTransientError")]
    with pytest.raises(FalTransientError):
        run(Flaky(transient(1), transient(2), transient(3)), retry_now)  # max_attempts still holds
    with pytest.raises(FalTransientError):
        run(Flaky(transient(1)), lambda number, error: False)  # the backoff (30 s) is over max_total_wait


def test_max_total_wait_bounds_jittered_backoff():
    # Each wait is at least 0.005 s, so at most 0.02 / 0.005 = 4 waits fit: 5 attempts at most.
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.01, max_backoff=0.01, max_total_wait=0.02)
    func = Flaky(*[transient(n) for n in range(1, 1000)])
    with pytest.raises(FalTransientError):
        call_with_retries(policy, func)
    assert 2 <= func.calls <= 5


# --------------------------------------------------------------------------- logging


def test_each_retry_is_logged_with_its_reason(caplog):
    func = Flaky(
        FalTransientError(
            "Transient fal error: Runner disconnected", status_code=503, error_type="runner_disconnected"
        ),
        FalRateLimitError("fal rate limit: Concurrent requests limit exceeded", status_code=429, retry_after=0),
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        assert call_with_retries(RetryPolicy(max_attempts=3, **TINY), func, "POST http://x/fal-ai/flux/dev") == "ok"
    messages = [record.getMessage() for record in caplog.records if record.name == LOGGER.name]
    assert len(messages) == 2
    assert messages[0].startswith("POST http://x/fal-ai/flux/dev failed (attempt 1 of 3): ")
    assert "Runner disconnected" in messages[0] and "HTTP 503" in messages[0]
    assert "error_type=runner_disconnected" in messages[0]
    assert messages[1].startswith("POST http://x/fal-ai/flux/dev failed (attempt 2 of 3): ")
    assert "Concurrent requests limit exceeded" in messages[1] and "retrying in 0.00 s" in messages[1]
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_the_final_failure_is_not_logged_as_a_retry(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER.name), pytest.raises(FalTransientError):
        call_with_retries(RetryPolicy(max_attempts=2, **TINY), Flaky(transient(1), transient(2)))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "attempt 1 of 2" in messages[0]


# --------------------------------------------------------------------------- async (triggers)


def test_async_retrying_uses_the_same_policy(caplog):
    async def run(func) -> str:
        async for attempt in async_retrying(RetryPolicy(max_attempts=3, **TINY), LOGGER, "GET status"):
            with attempt:
                return func()
        raise AssertionError("unreachable")

    func = Flaky(transient(1), FalConnectError("refused"))
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        assert asyncio.run(run(func)) == "ok"
    assert func.calls == 3
    assert len(caplog.records) == 2 and "GET status failed (attempt 2 of 3)" in caplog.records[1].getMessage()

    auth = Flaky(FalAuthError("bad key"))
    with pytest.raises(FalAuthError):
        asyncio.run(run(auth))
    assert auth.calls == 1

    exhausted = Flaky(*[transient(n) for n in range(5)])
    with pytest.raises(FalTransientError):
        asyncio.run(run(exhausted))
    assert exhausted.calls == 3


def test_a_single_attempt_policy_calls_once_without_building_a_retrying_and_reraises(monkeypatch):
    """Every call of a batch has one attempt (the batch retries by itself): no tenacity set-up per call."""
    import tenacity

    from airflow_provider_fal.core.retry import call_with_retries

    def built(*args, **kwargs):
        raise AssertionError("a tenacity.Retrying was built for a single attempt")

    calls = []
    lost = FalServerError("boom", status_code=503)
    lost.retryable = True  # as classification marks a 503 without a request id

    def failing():
        calls.append(1)
        raise lost

    monkeypatch.setattr(tenacity, "Retrying", built)
    assert call_with_retries(RetryPolicy(max_attempts=1), logging.getLogger("t"), "GET x", lambda: 7) == 7
    with pytest.raises(FalServerError) as raised:
        call_with_retries(RetryPolicy(max_attempts=1), logging.getLogger("t"), "GET x", failing)
    assert raised.value is lost and calls == [1]
    monkeypatch.undo()
    quick = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    with pytest.raises(FalServerError):
        call_with_retries(quick, logging.getLogger("t"), "GET x", failing)
    assert calls == [1, 1, 1, 1]  # three attempts under a policy of three
