"""What a batch may cost: an estimate before anything is sent, and a stop when the budget is spent.

The estimate is ``units x unit price`` over the inputs still to send, where an input is expected
to bill ``num_images`` units when it asks for several images, else one (fal bills per output
unit; the estimate is a guide, not fal's invoice). ``max_cost`` (in the currency fal's pricing
API reports) refuses to start a batch whose billed-so-far plus estimate exceeds it, and stops
sending once the units fal reported as billed reach it: inputs already in flight finish, the
rest are reported as not sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_fal.core.billing import Pricing
from airflow_provider_fal.exceptions import FalConfigurationError, FalError


class FalBudgetError(FalError):
    """The batch's estimate exceeds ``max_cost``, or its price is unknown: nothing was sent."""

    permanent = True


def check_max_cost(value: Any) -> float | None:
    """``max_cost`` as a number >= 0 (or ``None``); a numeric string is accepted."""
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise FalConfigurationError(
            f"max_cost must be a number >= 0 in the currency fal bills in (e.g. 25 for USD 25), got {value!r}."
        )
    return float(number)


def expected_units(arguments: Any) -> float:
    """Units one input is expected to bill: its ``num_images`` when it asks for several, else 1."""
    count = arguments.get("num_images") if hasattr(arguments, "get") else None
    if isinstance(count, int) and not isinstance(count, bool) and count > 1:
        return float(count)
    return 1.0


@dataclass
class Budget:
    """The price of the batch's model (``None``: unknown) and its spending limit (``None``: none)."""

    pricing: Pricing | None
    max_cost: float | None = None

    def estimate(self, arguments: Sequence[Any]) -> float | None:
        """Expected cost of sending these inputs, or ``None`` without a price."""
        if self.pricing is None:
            return None
        return self.pricing.cost(sum(expected_units(item) for item in arguments))

    def cost(self, units: float) -> float | None:
        return None if self.pricing is None else self.pricing.cost(units)

    def spent(self, units: float) -> bool:
        """Whether ``units`` billed so far reach ``max_cost``."""
        cost = self.cost(units)
        return self.max_cost is not None and cost is not None and cost >= self.max_cost

    def check_start(self, model_id: str, arguments: Sequence[Any], billed_units: float, log: Any) -> None:
        """Log the estimate; raise :class:`FalBudgetError` when ``max_cost`` forbids starting."""
        estimate = self.estimate(arguments)
        if estimate is None:
            if self.max_cost is not None:
                raise FalBudgetError(
                    f"max_cost={self.max_cost:g} needs fal's price of {model_id}, which could not be read from fal's "
                    "pricing API (connection extra 'api_url'); nothing was sent. Drop max_cost, or check the API."
                )
            return
        assert self.pricing is not None
        spent = self.pricing.cost(billed_units)
        currency = self.pricing.currency
        log.info(
            "fal batch %s: estimated cost of the %d inputs to send: %.4f %s (%s per %s; %.4f %s billed before)",
            model_id,
            len(arguments),
            estimate,
            currency,
            f"{self.pricing.unit_price:g}",
            self.pricing.unit.rstrip("s") or "unit",
            spent,
            currency,
        )
        if self.max_cost is not None and spent + estimate > self.max_cost:
            raise FalBudgetError(
                f"fal batch {model_id}: the estimated cost {spent + estimate:.4f} {currency} (billed so far "
                f"{spent:.4f} + {estimate:.4f} for {len(arguments)} inputs to send) exceeds max_cost="
                f"{self.max_cost:g}; nothing was sent. Raise max_cost, or send fewer inputs."
            )
