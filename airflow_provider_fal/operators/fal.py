"""FalRunOperator: run one fal model call from a task and hand its JSON result to XCom."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from airflow_provider_fal._compat import BaseOperator, Context, conf
from airflow_provider_fal.core.client import DEFAULT_POLL_INTERVAL, FalRequest
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalError, FalRequestLostError
from airflow_provider_fal.hooks.fal import FalHook
from airflow_provider_fal.media.persist import persist_task_media
from airflow_provider_fal.media.storage import LocalStore, open_store
from airflow_provider_fal.media.upload import FalUploadError, identity_of
from airflow_provider_fal.operators.billing import push_billing
from airflow_provider_fal.operators.common import QUEUE_REQUEST_XCOM_KEY as QUEUE_REQUEST_XCOM_KEY
from airflow_provider_fal.operators.common import REQUEST_ID_XCOM_KEY, check_rendered_numbers, fail_permanently
from airflow_provider_fal.operators.lineage import FalLineageMixin
from airflow_provider_fal.operators.queued import QueuedRunMixin
from airflow_provider_fal.operators.shared_disk import warn_if_disk_not_shared
from airflow_provider_fal.operators.unknown_submit import check_on_unknown_submit, unknown_submit_message

__all__ = ["QUEUE_REQUEST_XCOM_KEY", "REQUEST_ID_XCOM_KEY", "FalRunOperator", "fail_permanently"]


class FalRunOperator(FalLineageMixin, QueuedRunMixin, BaseOperator):
    """Run a fal.ai model and push its JSON output to XCom (``return_value``).

    fal's request id goes to XCom under ``fal_request_id``. Inputs are rendered as templates,
    then validated before anything is sent; bad input, a wrong key or a rejected model input
    fail the task without spending its retries, while transient fal errors are retried by
    the hook (see :class:`RetryPolicy`) and then by Airflow's own task retries.

    :param model_id: ``owner/app[/subpath]``, e.g. ``fal-ai/flux/dev`` (templated).
    :param arguments: the model input, a JSON object (templated, nested).
    :param start_timeout: seconds or timedelta a runner may take to start, >= 1
        (``X-Fal-Request-Timeout``; templated).
    :param object_lifecycle: how long generated media stay downloadable: seconds, timedelta,
        ``"never"`` or ``{"expiration_duration_seconds": N}`` (templated).
    :param hint: runner hint (``X-Fal-Runner-Hint``; templated).
    :param headers: other ``X-Fal-*`` headers, e.g. ``{"X-Fal-Store-IO": "0"}`` (templated).
    :param fal_conn_id: the fal connection (templated).
    :param timeout: read timeout for the synchronous call, seconds (default 600 s plus the
        start timeout).
    :param fal_retry_policy: a :class:`RetryPolicy` or dict of its fields for the hook's retries of fal
        calls (not ``retry_policy``: Airflow 3.3's ``BaseOperator`` uses that name for task retries).
    :param output_path: a directory (absolute path, ``file://`` or object storage URI such as
        ``s3://conn_id@bucket/fal/{{ ds }}/``) to copy every media file of the result into before
        fal's URLs expire; the result then carries ``stored_path`` beside each ``url``
        (templated; see docs/persist.md).
    :param inline_file_uris: also send the files that ``file://`` and object storage URI strings
        in ``arguments`` name (``Path``/``ObjectStoragePath`` objects always are): uploaded to
        fal's CDN above the connection's ``upload_threshold_kb`` (default 256 KiB), else as
        ``data:`` URIs; the model gets the URL (see docs/inputs.md).
    :param deferrable: submit to fal's queue from the worker, then wait in the triggerer
        (:class:`~airflow_provider_fal.triggers.fal.FalQueueTrigger`) without holding a worker
        slot. Defaults to Airflow's ``[operators] default_deferrable``. See docs/queue.md.
    :param use_queue: submit to fal's queue and poll from the worker.
    :param poll_interval: seconds between status polls in the queue modes (default 2).
    :param poll_timeout: seconds or timedelta to wait for a queued request before cancelling
        it (default 1 hour). ``execution_timeout`` also cancels it, in both queue modes.
    :param priority: ``"normal"`` or ``"low"`` queue priority (templated; queue modes only).
    :param webhook_url: URL fal also posts the result to (templated; queue modes only).
    :param durable: remember the submitted request so that a retry of the task reattaches to
        it instead of paying for the generation again (queue modes; default True).
    :param on_unknown_submit: what happens when a request was sent but its answer was lost, so
        fal may bill it and its request id is unknown (a dropped connection, a read timeout, a
        worker killed mid-submit): ``"fail"`` (default) fails the task for good, saying when it
        was sent and how to check; ``"resubmit"`` lets Airflow's retry send it again, logging a
        warning that a duplicate may be billed. See docs/retries-and-billing.md.
    """

    template_fields: Sequence[str] = (
        "model_id",
        "arguments",
        "start_timeout",
        "object_lifecycle",
        "hint",
        "headers",
        "fal_conn_id",
        "output_path",
        "priority",
        "webhook_url",
    )
    template_fields_renderers = {"arguments": "json", "headers": "json", "object_lifecycle": "json"}
    ui_color = "#e8dcff"

    def __init__(
        self,
        *,
        model_id: str,
        arguments: dict[str, Any] | str | None = None,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: str | None = None,
        headers: dict[str, Any] | None = None,
        fal_conn_id: str = FalHook.default_conn_name,
        timeout: float | None = None,
        fal_retry_policy: RetryPolicy | dict[str, Any] | None = None,
        output_path: Any = None,
        inline_file_uris: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        use_queue: bool = False,
        poll_interval: Any = DEFAULT_POLL_INTERVAL,
        poll_timeout: Any = None,
        priority: str | None = None,
        webhook_url: str | None = None,
        durable: bool = True,
        on_unknown_submit: str = "fail",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.init_queue_options(
            deferrable=deferrable,
            use_queue=use_queue,
            poll_interval=poll_interval,
            poll_timeout=poll_timeout,
            priority=priority,
            webhook_url=webhook_url,
            durable=durable,
        )
        self.on_unknown_submit = on_unknown_submit
        self.output_path = output_path
        self.inline_file_uris = inline_file_uris
        self.model_id = model_id
        self.arguments = arguments
        self.start_timeout = start_timeout
        self.object_lifecycle = object_lifecycle
        self.hint = hint
        self.headers = headers
        self.fal_conn_id = fal_conn_id
        self.timeout = timeout
        self.fal_retry_policy = RetryPolicy.from_value(fal_retry_policy)

    @cached_property
    def hook(self) -> FalHook:
        return FalHook(fal_conn_id=self.fal_conn_id, retry_policy=self.fal_retry_policy, timeout=self.timeout)

    def prepare(self) -> FalRequest:
        """The rendered inputs, checked and encoded once; fails the task (no retries) naming the field."""
        local_fields: list[str] = []
        try:
            if self.output_path and isinstance(open_store(self.output_path), LocalStore):
                local_fields.append("output_path")
            queue_options = {"priority": self.priority, "webhook_url": self.webhook_url} if self.queued else {}
            shared = self.hook.prepare(  # everything but the arguments checked before any upload
                self.model_id,
                None,
                start_timeout=self.start_timeout,
                object_lifecycle=self.object_lifecycle,
                hint=self.hint,
                headers=self.headers,
                timeout=self.timeout,
                **queue_options,
            )
            arguments = self.hook.upload_inputs(self.arguments, uris=self.inline_file_uris, local_fields=local_fields)
            warn_if_disk_not_shared(self, local_fields, self.log)
            uploader = self.hook.__dict__.get("uploader")  # set once a file was uploaded
            return shared.with_arguments(arguments, identity=identity_of(arguments, uploader))
        except FalError as error:
            if isinstance(error, FalUploadError) and not error.permanent:
                raise  # a CDN upload that failed for a transient reason: Airflow's retries may help
            raise fail_permanently(error) from error

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        check_rendered_numbers(self)

    def execute(self, context: Context) -> Any:
        try:
            check_on_unknown_submit(self.on_unknown_submit)
        except FalError as error:
            raise fail_permanently(error) from error
        request = self.prepare()
        if self.queued:
            return self.execute_queued(context, request)
        sent_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            response = self.hook.send(request)
        except FalRequestLostError as error:
            if self.on_unknown_submit == "resubmit":
                self.log.warning(
                    'The synchronous run of fal model %s at %s got no answer. on_unknown_submit="resubmit": '
                    "a retry of this task sends the input again; A DUPLICATE MAY BE BILLED.",
                    request.model_id,
                    sent_at,
                )
                raise
            message = unknown_submit_message(request.model_id, sent_at, previous_try=False, synchronous=True)
            raise fail_permanently(FalRequestLostError(f"{message} ({error})")) from error
        except FalError as error:
            if error.request_id:
                context["ti"].xcom_push(key=REQUEST_ID_XCOM_KEY, value=error.request_id)
                self.fal_lineage.add_request(error.request_id)
            if error.permanent:
                raise fail_permanently(error) from error
            raise
        context["ti"].xcom_push(key=REQUEST_ID_XCOM_KEY, value=response.request_id)
        self.fal_lineage.add_request(response.request_id)
        push_billing(self, context, request.model_id, response.request_id, response.billable_units)
        return self.deliver_output(response.output, context)

    def deliver_output(self, output: Any, context: Context) -> Any:
        """What the task returns for the model output, in every mode: the output, its media stored
        first when ``output_path`` is set."""
        if self.output_path:
            output = persist_task_media(
                output,
                self.output_path,
                context,
                retry_policy=self.fal_retry_policy,
                logger=self.log,
                **self.hook.download_limits(),
            )
            self.fal_lineage.add_output(output)
        return output

    def on_kill(self) -> None:
        self.cancel_active_request("The task was killed")
        # Closing the session drops the connection, and fal cancels a synchronous request
        # whose connection drops.
        if "hook" in self.__dict__:
            self.hook.close()
