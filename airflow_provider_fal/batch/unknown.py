"""Batch inputs whose request was sent but whose answer never came: maybe billed, request id unknown.

A queue submit (or a synchronous run) that got no usable answer (a dropped connection, a read
timeout, a 2xx that could not be read) may have been taken and billed by fal, and nothing can
find it again. The batch never resends such an input within the try; ``on_unknown_submit``
decides what the input's error says and whether a retry of the task sends it again (see
:mod:`~airflow_provider_fal.operators.unknown_submit`).
"""

from __future__ import annotations

from airflow_provider_fal.batch.ledger import BatchLedger
from airflow_provider_fal.exceptions import FalConnectError, FalError, FalRequestLostError
from airflow_provider_fal.operators.unknown_submit import unknown_submit_message


def answer_was_lost(error: FalError) -> bool:
    """Whether fal may have taken the request: it was sent and no error answer (4xx/5xx) came back."""
    if isinstance(error, FalRequestLostError):
        return True
    if isinstance(error, FalConnectError):
        return False  # nothing was sent
    return error.status_code is not None and 200 <= error.status_code < 300


def unknown_outcome_error(
    ledger: BatchLedger,
    index: int,
    model_id: str,
    at: str,
    cause: FalError,
    *,
    on_unknown_submit: str,
    synchronous: bool,
) -> FalRequestLostError:
    """The input's error (counted in the ledger): permanent with ``"fail"``, retryable with ``"resubmit"``."""
    with ledger.lock:
        ledger.unknown_submits += 1
    if on_unknown_submit == "resubmit":
        what = "synchronous run" if synchronous else "queue submit"
        message = (
            f"The {what} of input {index} ({model_id}) at {at} got no answer; its request id is unknown. "
            'on_unknown_submit="resubmit": a retry of this task sends it again, and a DUPLICATE MAY BE BILLED.'
        )
    else:
        message = unknown_submit_message(model_id, at, previous_try=False, synchronous=synchronous)
    error = FalRequestLostError(f"{message} ({cause})")
    error.permanent = on_unknown_submit == "fail"
    return error
