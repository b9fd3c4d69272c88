"""A submit whose outcome is unknown: sent to fal, but no answer came back, so no request id.

fal may have queued (and will bill) such a request, and nothing can find it again. Sending the
input again risks paying twice; not sending it risks losing the generation. The operator does
not choose silently: ``on_unknown_submit`` says what a task does then.

* ``"fail"`` (default): the task fails for good (no Airflow retries) with a message saying
  when the unknown submit was made, that it may be billed, and how to check and go on.
* ``"resubmit"``: Airflow's retry submits the input again, logging a warning that a duplicate
  may be billed.

Queue modes record that a submit is in flight (:func:`in_flight_marker`) in the task's request
store before sending it, so that a try killed mid-submit (``kill -9``, a timeout) is noticed
by the next try, too.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from airflow_provider_fal.exceptions import FalConfigurationError

ON_UNKNOWN_SUBMIT_CHOICES = ("fail", "resubmit")
#: Key of the in-flight marker in a stored value (beside ``fingerprint``; no ``request`` yet).
IN_FLIGHT_KEY = "submit_in_flight"


def check_on_unknown_submit(value: Any) -> str:
    """``on_unknown_submit`` as given, if it is one of the choices; else FalConfigurationError."""
    if isinstance(value, str) and value in ON_UNKNOWN_SUBMIT_CHOICES:
        return value
    raise FalConfigurationError(
        f"on_unknown_submit must be 'fail' or 'resubmit', got {value!r}. 'fail' (the default) fails the task "
        "when a submit's answer was lost; 'resubmit' lets the retry send it again, which may bill twice."
    )


def in_flight_marker(model_id: str, fingerprint: str) -> dict[str, Any]:
    """What is stored just before a submit is sent: when, which model, which input (no key, no arguments)."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {IN_FLIGHT_KEY: {"at": at, "model_id": model_id}, "fingerprint": fingerprint}


def unknown_submit_message(model_id: str, at: str, *, previous_try: bool, synchronous: bool = False) -> str:
    """Why the task stops instead of sending the input again, and what the user can do."""
    whose = "The previous try's" if previous_try else "This try's"
    what = "synchronous run" if synchronous else "queue submit"
    effect = (
        "fal cancels a synchronous request whose connection drops, but it may have run and been billed"
        if synchronous
        else "it may have reached fal's queue and been billed (and may still run)"
    )
    return (
        f"{whose} {what} of fal model {model_id} at {at} got no answer: {effect}; its request id is "
        f"unknown. Not sending it again, so as not to pay twice. Check the fal dashboard (Requests of "
        f"{model_id} around {at}, or the billing usage events) for it. To send the input again, clear "
        'this task; to let retries resend automatically (a duplicate may be billed), set on_unknown_submit="resubmit".'
    )


def duplicate_warning(model_id: str, at: str) -> str:
    """The warning of a try that resubmits after an unknown submit (``on_unknown_submit="resubmit"``)."""
    return (
        f"The previous try's queue submit of fal model {model_id} at {at} got no answer; its request id is "
        'unknown. on_unknown_submit="resubmit": submitting again. A DUPLICATE MAY BE BILLED; check the fal '
        f"dashboard (Requests of {model_id} around {at})."
    )
