"""What a run costs: the units fal billed for it, and prices from fal's Platform API.

* :func:`billable_units`: ``X-Fal-Billable-Units`` of a result (sync answer or queue result),
  a decimal set by the app; ``None`` where fal sends none.
* :func:`fetch_pricing`: ``GET {api_url}/v1/models/pricing?endpoint_id=...`` (fal-api.md
  "Billing and cost"), cached per API host and endpoint for an hour.
* :func:`billing_record`: the JSON the operators push (XCom ``fal_billing``, each batch entry).

fal bills per output unit, never for a 5xx or for time in the queue; what it bills is only ever
read here, never computed from the output.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalError

BILLABLE_UNITS_HEADER = "x-fal-billable-units"
DEFAULT_API_URL = "https://api.fal.ai"
PRICING_PATH = "/v1/models/pricing"
#: Seconds a price is reused before it is asked again (and a failed lookup is not retried).
PRICING_TTL = 3600.0
FAILED_LOOKUP_TTL = 300.0
ONE_ATTEMPT = RetryPolicy(max_attempts=1)

_cache: dict[tuple[str, str], tuple[float, Pricing | None]] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Pricing:
    """fal's price of one unit of an endpoint."""

    endpoint_id: str
    unit_price: float
    unit: str
    currency: str

    def cost(self, units: float) -> float:
        return units * self.unit_price

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "unit_price": self.unit_price,
            "unit": self.unit,
            "currency": self.currency,
        }


def billable_units(headers: Mapping[str, str] | None) -> float | None:
    """The billed units a result's headers report (``None`` when absent or not a number >= 0)."""
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == BILLABLE_UNITS_HEADER:
            try:
                units = float(str(value).strip())
            except ValueError:
                return None
            return units if math.isfinite(units) and units >= 0 else None
    return None


def parse_pricing(body: Any, endpoint_id: str) -> Pricing | None:
    """The price of ``endpoint_id`` in a pricing answer (``{"prices": [...]}``), or ``None``."""
    prices = body.get("prices") if isinstance(body, Mapping) else None
    for entry in prices if isinstance(prices, list) else []:
        if not isinstance(entry, Mapping) or entry.get("endpoint_id") not in (endpoint_id, None):
            continue
        price = entry.get("unit_price")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
            continue
        return Pricing(
            endpoint_id, float(price), str(entry.get("unit") or "units"), str(entry.get("currency") or "USD")
        )
    return None


def fetch_pricing(client: Any, api_url: str, endpoint_id: str, *, timeout: float = 30.0) -> Pricing | None:
    """The price of ``endpoint_id`` from fal's Platform API (cached); ``None`` when fal lists none.

    ``client`` is a :class:`~airflow_provider_fal.core.client.FalClient` (its session, key and
    retry policy). Raises :class:`FalError` when the API cannot be asked.
    """
    key = (api_url, endpoint_id)
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and now - cached[0] < PRICING_TTL:
            return cached[1]
    url = f"{api_url.rstrip('/')}{PRICING_PATH}?endpoint_id={quote(endpoint_id, safe='/')}"
    try:
        # One attempt: a price is information; a task must not wait on retries for it.
        response = client.request("GET", url, read_timeout=timeout, idempotent=True, retry_policy=ONE_ATTEMPT)
    except FalError:
        with _cache_lock:  # not asked again for a while: a blocked API must not slow every task
            _cache[key] = (now - PRICING_TTL + FAILED_LOOKUP_TTL, None)
        raise
    pricing = parse_pricing(response.output, endpoint_id)
    with _cache_lock:
        _cache[key] = (now, pricing)
    return pricing


def billing_record(units: float | None, request_id: str | None, pricing: Pricing | None) -> dict[str, Any]:
    """What one result billed: ``units`` (``None``: fal did not say), the price where known, and the cost."""
    record: dict[str, Any] = {"request_id": request_id, "units": units}
    if pricing is not None:
        record.update(unit_price=pricing.unit_price, unit=pricing.unit, currency=pricing.currency)
        record["cost"] = None if units is None else round(pricing.cost(units), 6)
    return record


def pricing_or_none(fetch: Any, log: Any, endpoint_id: str) -> Pricing | None:
    """``fetch()`` (a pricing lookup), logging instead of failing: a price is information, not a need."""
    try:
        return fetch()
    except FalError as error:
        log.info("Could not read fal's price of %s (%s); costs are reported in units only.", endpoint_id, error)
        return None
