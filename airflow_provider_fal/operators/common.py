"""What the fal operators share: their XCom keys and how a fal error fails a task."""

from __future__ import annotations

from typing import Any

from airflow_provider_fal._compat import AirflowFailException
from airflow_provider_fal.core.validation import non_finite_number
from airflow_provider_fal.exceptions import FalConfigurationError, FalError

#: XCom key under which the operators push fal's request id (``return_value`` is the result).
REQUEST_ID_XCOM_KEY = "fal_request_id"
#: XCom key of the whole queued request handle (``fal_request_id`` holds its id).
QUEUE_REQUEST_XCOM_KEY = "fal_queue_request"


def fail_permanently(error: FalError) -> AirflowFailException:
    """An error retrying cannot fix, as an exception that skips Airflow-level retries."""
    failure = AirflowFailException(str(error))
    failure.__cause__ = error
    return failure


def check_rendered_numbers(operator: Any) -> None:
    """Fail the task (no retries) if a rendered template field holds NaN or infinity.

    Called right after rendering: Airflow stores the rendered fields as JSON before ``execute``
    runs, and would otherwise fail the task there with a bare ``ValueError`` (and retry it).
    """
    for name in operator.template_fields:
        found = non_finite_number(getattr(operator, name, None))
        if found is not None:
            where, number = found
            raise fail_permanently(
                FalConfigurationError(
                    f"{name}{where} is {number!r}: NaN and infinity are not allowed (JSON has no such "
                    "numbers); use null, a string or a finite number."
                )
            )
