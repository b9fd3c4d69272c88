"""The queue modes of :class:`~airflow_provider_fal.operators.fal.FalRunOperator`.

* ``use_queue=True``: submit to fal's queue and poll from the worker. A dropped connection
  loses nothing (the request lives on fal's queue), but the worker slot stays busy.
* ``deferrable=True``: submit from the worker, push the request id to XCom, and hand the
  polling to :class:`~airflow_provider_fal.triggers.fal.FalQueueTrigger` in the triggerer;
  the worker slot is free until the result is back.

In both modes the submitted request is remembered (see :mod:`.request_store`) so that a retry
of the task reattaches to it instead of paying for the same generation again. A "submit in
flight" marker is stored before the submit is sent, so that a retry after a submit whose answer
never came does not submit again silently (see :mod:`.unknown_submit`). ``poll_timeout``
and ``execution_timeout`` end in a cancel of the fal request and a clear error, and so does
killing the task.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow_provider_fal._compat import AirflowTaskTimeout, Context
from airflow_provider_fal.core.client import DEFAULT_WAIT_TIMEOUT, FalRequest
from airflow_provider_fal.core.http import FalResponse
from airflow_provider_fal.core.queue import QueueHandle, coerce_handle
from airflow_provider_fal.core.validation import optional_seconds, positive_seconds
from airflow_provider_fal.exceptions import (
    FalConfigurationError,
    FalConnectError,
    FalError,
    FalRequestLostError,
    FalResultExpiredError,
    FalTimeoutError,
)
from airflow_provider_fal.operators.billing import push_billing
from airflow_provider_fal.operators.common import QUEUE_REQUEST_XCOM_KEY, REQUEST_ID_XCOM_KEY, fail_permanently
from airflow_provider_fal.operators.lineage import LineageRecord
from airflow_provider_fal.operators.request_store import SafeStore, request_store
from airflow_provider_fal.operators.unknown_submit import (
    IN_FLIGHT_KEY,
    duplicate_warning,
    in_flight_marker,
    unknown_submit_message,
)
from airflow_provider_fal.triggers.fal import FalQueueTrigger

#: How long after the trigger's own deadline Airflow ends a deferral that no trigger ended (and
#: how long after ``execution_timeout`` a worker-side wait would stop, were Airflow not to stop it).
DEFER_BACKSTOP_GRACE = 300.0


class QueuedRunMixin:
    """Queue and deferrable execution for an operator with FalRunOperator's attributes.

    The host class provides ``hook``, ``model_id``, ``fal_conn_id``, ``fal_retry_policy``,
    ``timeout``, ``execution_timeout``, ``log``, ``defer``, a checked ``on_unknown_submit`` (see
    :mod:`.unknown_submit`) and sets the attributes read in :meth:`init_queue_options`. It may
    override :meth:`deliver_output` to post-process the model output exactly as its synchronous
    mode does.
    """

    def init_queue_options(
        self,
        *,
        deferrable: bool,
        use_queue: bool,
        poll_interval: Any,
        poll_timeout: Any,
        priority: Any,
        webhook_url: Any,
        durable: bool,
    ) -> None:
        self.deferrable = bool(deferrable)
        self.use_queue = bool(use_queue)
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.priority = priority
        self.webhook_url = webhook_url
        self.durable = bool(durable)
        self._active_request: QueueHandle | None = None
        if not self.queued:
            for name in ("priority", "webhook_url", "poll_timeout"):
                if getattr(self, name) not in (None, ""):
                    raise FalConfigurationError(
                        f"{name} applies to queued runs only; set use_queue=True or deferrable=True, or drop {name}."
                    )

    @property
    def queued(self) -> bool:
        """Whether this task goes through fal's queue (``use_queue`` or ``deferrable``)."""
        return self.use_queue or self.deferrable

    def deliver_output(self, output: Any, context: Context) -> Any:
        """The task's return value for the model output; identity unless the host overrides it."""
        return output

    @property
    def fal_lineage(self) -> LineageRecord:
        """What the host records for OpenLineage (see :class:`~.lineage.FalLineageMixin`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ worker side

    def execute_queued(self, context: Context, request: FalRequest) -> Any:
        """Submit (or reattach to) the prepared request, then poll here or defer to the trigger."""
        try:
            interval = positive_seconds(self.poll_interval, "poll_interval")
            poll_timeout = optional_seconds(self.poll_timeout, "poll_timeout")
        except FalError as error:
            raise fail_permanently(error) from error

        store = SafeStore(request_store(context) if self.durable else None, self.log)
        fingerprint = request.fingerprint()
        try:
            handle, completed = self._reattach(store, fingerprint)
            if handle is None:
                handle = self._submit(store, request, fingerprint)
            self._active_request = handle
            ti = context["ti"]
            ti.xcom_push(key=REQUEST_ID_XCOM_KEY, value=handle.request_id)
            self.fal_lineage.add_request(handle.request_id)
            ti.xcom_push(key=QUEUE_REQUEST_XCOM_KEY, value=handle.to_dict())
            if completed:
                response = self.hook.client.result(handle)
            elif self.deferrable:
                self._defer_to_trigger(context, handle, interval, poll_timeout)
            else:
                response = self._wait_on_worker(context, handle, interval, poll_timeout)
            push_billing(self, context, request.model_id, handle.request_id, response.billable_units)
            output = response.output
        except FalError as error:
            self._forget_expired(store, error)
            self._forget_on_final_failure(context, store, error)
            if error.permanent:
                raise fail_permanently(error) from error
            raise
        except AirflowTaskTimeout:  # execution_timeout: the request was cancelled
            self._forget_on_final_failure(context, store, None)
            raise
        finally:
            self._active_request = None
        delivered = self.deliver_output(output, context)
        store.clear()  # only now: a retry after a failed delivery reattaches to the completed request
        return delivered

    def _submit(self, store: SafeStore, request: FalRequest, fingerprint: str) -> QueueHandle:
        """Submit, with a "submit in flight" marker stored while the outcome is unknown.

        The marker becomes the request once fal answers; it is removed when the submit provably
        queued nothing (the connection failed before sending, or fal answered with an error).
        """
        marker = in_flight_marker(request.model_id, fingerprint)
        store.save(marker)
        try:
            handle = self.hook.enqueue(request)
        except FalRequestLostError as error:
            if self.on_unknown_submit == "resubmit":
                raise  # the marker stays: the retry warns that it submits again
            store.clear()  # failing for good: a cleared (re-run) task submits again, deliberately
            message = unknown_submit_message(request.model_id, marker[IN_FLIGHT_KEY]["at"], previous_try=False)
            raise fail_permanently(FalRequestLostError(f"{message} ({error})")) from error
        except FalError as error:
            if isinstance(error, FalConnectError) or (error.status_code or 0) >= 400:
                store.clear()  # nothing was sent, or fal refused it: no request exists
            raise
        if store.save({"request": handle.to_dict(), "fingerprint": fingerprint}):
            self.log.info("Remembered fal request %s in %s for retries", handle.request_id, store.where)
        return handle

    def _reattach(self, store: SafeStore, fingerprint: str) -> tuple[QueueHandle | None, bool]:
        """The request an earlier try submitted, if it can still deliver: (handle, completed)."""
        stored = store.load()
        if not stored:
            return None, False
        if stored.get("fingerprint") != fingerprint:
            self.log.warning("The fal request stored by an earlier try was for other inputs; submitting anew.")
            return None, False
        if IN_FLIGHT_KEY in stored and "request" not in stored:
            self._unknown_submit_of_earlier_try(store, stored[IN_FLIGHT_KEY])
            return None, False
        try:
            handle = coerce_handle(stored.get("request"), self.hook.client.queue_url)
        except FalError as error:
            self.log.warning("Ignoring the stored fal request: %s", error)
            return None, False
        try:
            status = self.hook.client.status(handle, logs=False)
        except FalError as error:
            if error.status_code == 404:
                self.log.warning(
                    "fal no longer knows request %s submitted by an earlier try (results are kept 1 hour, "
                    "6 minutes when 10 KB or more); submitting anew: a new generation, billed again.",
                    handle.request_id,
                )
                return None, False
            raise
        if status.failed:
            self.log.warning(
                "fal request %s of an earlier try ended with %s; submitting anew.",
                handle.request_id,
                status.error or status.error_type,
            )
            return None, False
        self.log.info(
            "Reattaching to fal request %s submitted by an earlier try (%s) instead of submitting again.",
            handle.request_id,
            status.status,
        )
        return handle, status.completed

    def _unknown_submit_of_earlier_try(self, store: SafeStore, in_flight: Any) -> None:
        """An earlier try sent a submit and never learnt its request id: fail, or warn and go on."""
        details = in_flight if isinstance(in_flight, dict) else {}
        model_id = str(details.get("model_id") or self.model_id)
        at = str(details.get("at") or "an unknown time")
        if self.on_unknown_submit == "resubmit":
            self.log.warning(duplicate_warning(model_id, at))
            return
        store.clear()  # failing for good: a cleared (re-run) task submits again, deliberately
        message = unknown_submit_message(model_id, at, previous_try=True)
        raise fail_permanently(FalRequestLostError(message))

    def _wait_on_worker(
        self, context: Context, handle: QueueHandle, interval: float, poll_timeout: float | None
    ) -> FalResponse:
        deadline, limit, reason = self._deadline(context, poll_timeout)
        if limit == "execution_timeout":  # Airflow enforces it on the worker (AirflowTaskTimeout below)
            deadline += DEFER_BACKSTOP_GRACE
        try:
            return self.hook.client.wait(
                handle,
                timeout=max(deadline - time.time(), 0.001),
                poll_interval=interval,
                on_status=self.hook.progress_logger(),
                deadline_reason=reason,
            )
        except FalTimeoutError:
            self._active_request = None  # wait() has cancelled it
            raise
        except AirflowTaskTimeout:
            timeout = self.execution_timeout.total_seconds() if self.execution_timeout else None
            self.cancel_active_request(f"execution_timeout of {timeout:g} s reached" if timeout else "task timed out")
            raise

    def _deadline(self, context: Context, poll_timeout: float | None) -> tuple[float, str, str]:
        """When waiting gives up (Unix time), which limit that is, and a description of it.

        The earlier of ``poll_timeout`` and ``execution_timeout`` (counted from the task's start);
        the default poll timeout applies only when neither is set, so it never cuts a longer
        ``execution_timeout`` short.
        """
        now = time.time()
        candidates = []
        if poll_timeout:
            candidates.append((now + poll_timeout, "poll_timeout", f"poll_timeout of {poll_timeout:g} s"))
        if self.execution_timeout:
            started = getattr(context["ti"], "start_date", None)
            begin = started.timestamp() if started is not None else now
            seconds = self.execution_timeout.total_seconds()
            candidates.append((begin + seconds, "execution_timeout", f"execution_timeout of {seconds:g} s"))
        if not candidates:
            default = DEFAULT_WAIT_TIMEOUT
            candidates.append((now + default, "poll_timeout", f"poll_timeout of {default:g} s (the default)"))
        return min(candidates)

    def _defer_to_trigger(self, context: Context, handle: QueueHandle, interval: float, poll_timeout: float | None):
        deadline, _, reason = self._deadline(context, poll_timeout)
        self.log.info("Deferring: the triggerer polls fal request %s every %g s", handle.request_id, interval)
        self._active_request = None  # from here on the trigger owns the request
        # A backstop: should no triggerer run the trigger (or one die mid-way), Airflow still ends
        # the deferral a little after the trigger's own deadline would have cancelled the request.
        backstop = timedelta(seconds=max(0.0, deadline - time.time()) + DEFER_BACKSTOP_GRACE)
        self.defer(
            trigger=FalQueueTrigger(
                request=handle.to_dict(),
                fal_conn_id=self.fal_conn_id,
                poll_interval=interval,
                deadline=deadline,
                deadline_reason=reason,
                retry_policy=self.fal_retry_policy,
                timeout=self.timeout,
            ),
            method_name="execute_complete",
            timeout=backstop,
        )

    # ------------------------------------------------------------------ back from the trigger

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume after :class:`FalQueueTrigger` fired: return the output or raise its error."""
        if not isinstance(event, dict) or event.get("status") not in ("success", "error"):
            raise FalError(f"Unexpected event from the fal trigger: {event!r}")
        if event["status"] == "success":
            self.log.info("fal request %s completed", event.get("request_id"))
            self.fal_lineage.add_request(event.get("request_id"))
            units = event.get("billable_units")
            units = float(units) if isinstance(units, (int, float)) and not isinstance(units, bool) else None
            push_billing(self, context, str(self.model_id), event.get("request_id"), units)
            delivered = self.deliver_output(event.get("output"), context)
            if self.durable:
                SafeStore(request_store(context), self.log).clear()
            return delivered
        error = FalError.from_dict(event.get("error"))
        if self.durable:
            store = SafeStore(request_store(context), self.log)
            self._forget_expired(store, error)
            self._forget_on_final_failure(context, store, error)
        if error.permanent:
            raise fail_permanently(error) from error
        raise error

    def _forget_on_final_failure(self, context: Context, store: SafeStore, error: FalError | None) -> None:
        """A try that fails the task for good leaves no stored request behind.

        Its request id stays in the task log and in XCom (``fal_request_id``); a task cleared
        after that submits anew.
        """
        ti = context["ti"]
        retries_left = int(getattr(ti, "max_tries", 0) or 0) - int(getattr(ti, "try_number", 1) or 1) + 1
        if retries_left > 0 and not (error is not None and error.permanent):
            return  # the retry reattaches to the request
        store.clear()
        self.log.info(
            "The task fails for good: the stored fal request %s is forgotten (its id stays in XCom %r).",
            (error.request_id if error is not None else None) or "(none)",
            REQUEST_ID_XCOM_KEY,
        )

    def _forget_expired(self, store: SafeStore, error: FalError) -> None:
        """A request whose result fal no longer has cannot be reattached: let the retry submit anew."""
        if isinstance(error, FalResultExpiredError):
            store.clear()
            self.log.warning(
                "The result of fal request %s expired before it was read (it was most likely billed). "
                "The task's retry submits the input again: a new generation, billed again.",
                error.request_id,
            )

    # ------------------------------------------------------------------ cancel

    def cancel_active_request(self, why: str) -> None:
        """Cancel the request this worker is waiting on, if any (best effort, logged)."""
        handle, self._active_request = getattr(self, "_active_request", None), None
        if handle is None:
            return
        try:
            outcome = self.hook.cancel(handle)
            self.log.warning("%s: cancel of fal request %s answered %s", why, handle.request_id, outcome)
        except Exception as error:
            self.log.warning("%s: could not cancel fal request %s: %s", why, handle.request_id, error)
