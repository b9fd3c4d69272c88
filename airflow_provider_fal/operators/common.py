"""What the fal operators share: their XCom keys and how a fal error fails a task."""

from __future__ import annotations

from airflow_provider_fal._compat import AirflowFailException
from airflow_provider_fal.exceptions import FalError

#: XCom key under which the operators push fal's request id (``return_value`` is the result).
REQUEST_ID_XCOM_KEY = "fal_request_id"
#: XCom key of the whole queued request handle (``fal_request_id`` holds its id).
QUEUE_REQUEST_XCOM_KEY = "fal_queue_request"


def fail_permanently(error: FalError) -> AirflowFailException:
    """An error retrying cannot fix, as an exception that skips Airflow-level retries."""
    failure = AirflowFailException(str(error))
    failure.__cause__ = error
    return failure
