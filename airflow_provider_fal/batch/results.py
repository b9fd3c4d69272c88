"""What a batch produces: one entry per input, the counts, and whether it failed.

* :func:`success_entry` / :func:`error_entry`: the per-input entries (the XCom shape:
  ``index``, ``ok``, ``output`` or ``error`` (:meth:`FalError.to_dict`), ``request_id``).
* :class:`BatchResult`: every entry in input order and the counts (:meth:`BatchResult.summary`).
* :class:`FailurePolicy`: when failed inputs fail the batch.
* :func:`outputs` / :func:`failures`: helpers for downstream tasks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_fal.exceptions import FalAuthError, FalClientError, FalConfigurationError, FalError


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


def success_entry(index: int, output: Any, request_id: str | None, billed_units: float | None = None) -> dict[str, Any]:
    entry = {"index": index, "ok": True, "output": output, "request_id": request_id}
    if billed_units is not None:
        entry["billed_units"] = billed_units  # what fal's X-Fal-Billable-Units said
    return entry


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
    #: inputs an earlier try finished (not sent again); queued requests of an earlier try polled
    reused: int = 0
    reattached: int = 0
    #: inputs whose submit got no answer (this try or an earlier one): maybe billed, not sent again
    unknown_submits: int = 0
    #: units fal reported billed for the entries (``X-Fal-Billable-Units``), and their price
    billed_units: float = 0.0
    pricing: Any = None

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

    def _billing(self) -> dict[str, Any]:
        billed = round(sum(entry.get("billed_units") or 0.0 for entry in self.results), 6)
        billing: dict[str, Any] = {"billed_units": billed}
        if self.pricing is not None:
            billing.update(
                unit_price=self.pricing.unit_price,
                unit=self.pricing.unit,
                currency=self.pricing.currency,
                cost=round(self.pricing.cost(billed), 6),
            )
        return billing

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
            "reused_from_earlier_tries": self.reused,
            "reattached_requests": self.reattached,
            "unknown_submits": self.unknown_submits,
            **self._billing(),
        }
