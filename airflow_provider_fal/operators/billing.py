"""What a run billed, pushed to XCom ``fal_billing`` by FalRunOperator in every mode.

``{"request_id", "units", "unit_price", "unit", "currency", "cost"}``: ``units`` is what fal's
``X-Fal-Billable-Units`` header said (``None`` when fal sent none); the price comes from fal's
Platform API (connection extra ``api_url``), looked up once per hour and endpoint, only when
fal reported units, and left out when it cannot be read.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_fal.core.billing import billing_record, pricing_or_none

#: XCom key of a run's billing record.
BILLING_XCOM_KEY = "fal_billing"


def push_billing(operator: Any, context: Any, model_id: str, request_id: str | None, units: float | None) -> None:
    """Push the billing record of one result (and put its units into the task's lineage)."""
    pricing = None
    if units is not None:
        pricing = pricing_or_none(lambda: operator.hook.get_pricing(model_id), operator.log, model_id)
    record = billing_record(units, request_id, pricing)
    context["ti"].xcom_push(key=BILLING_XCOM_KEY, value=record)
    if units is not None:
        operator.fal_lineage.billed_units = (operator.fal_lineage.billed_units or 0.0) + units
        operator.log.info("fal request %s billed %g units%s", request_id, units, _cost_text(record))


def _cost_text(record: dict[str, Any]) -> str:
    if record.get("cost") is None:
        return ""
    return f" ({record['cost']:g} {record['currency']} at {record['unit_price']:g} per {record['unit']})"
