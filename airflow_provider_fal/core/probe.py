"""Tell a working fal API key from a wrong one without running (or paying for) a model."""

from __future__ import annotations

from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalError

#: A non-billable probe: the queue status of a request that cannot exist. fal answers 401/403
#: to a bad key and 404 to a good one; no model runs.
CREDENTIAL_PROBE_MODEL = "fal-ai/fast-sdxl"
CREDENTIAL_PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"
#: The UI's Test button should answer within seconds, not wait out a long backoff.
PROBE_RETRY_POLICY = RetryPolicy(max_attempts=2, initial_backoff=0.5, max_backoff=1.0, max_total_wait=2.0)


def check_credentials(client: FalClient) -> str:
    """A human message when fal accepts the client's key; raises :class:`FalAuthError` (or another
    :class:`FalError`) when it does not."""
    url = f"{client.queue_url}/{CREDENTIAL_PROBE_MODEL}/requests/{CREDENTIAL_PROBE_REQUEST_ID}/status"
    try:
        client.request("GET", url, read_timeout=30.0, idempotent=True, retry_policy=PROBE_RETRY_POLICY)
    except FalError as error:
        if error.status_code in (400, 404, 422):
            return f"fal accepted the API key ({client.queue_url} answered {error.status_code} to a probe)."
        raise
    return f"fal accepted the API key ({client.queue_url})."
