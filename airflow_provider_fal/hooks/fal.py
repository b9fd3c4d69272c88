"""FalHook: an Airflow connection of type ``fal`` turned into a configured :class:`FalClient`."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from airflow_provider_fal._compat import BaseHook
from airflow_provider_fal.core.billing import Pricing, fetch_pricing
from airflow_provider_fal.core.client import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAIT_TIMEOUT,
    FalClient,
    FalRequest,
    FalResponse,
    prepare_request,
)
from airflow_provider_fal.core.probe import check_credentials
from airflow_provider_fal.core.queue import QueueHandle, QueueProgress, QueueStatus
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.core.validation import MAX_CALL_SECONDS, optional_seconds
from airflow_provider_fal.exceptions import FalError
from airflow_provider_fal.hooks.async_side import AsyncHookSide
from airflow_provider_fal.hooks.connection import (
    DEFAULT_CONN_ID,
    EXTRA_QUEUE_URL,
    EXTRA_START_TIMEOUT,
    EXTRA_TIMEOUT,
    FAL_KEY_ENV,
    FalConnectionSettings,
    cdn_uploader,
    connection_form_widgets,
    how_to_create,
    settings_from_connection,
    settings_without_connection,
    ui_field_behaviour,
)
from airflow_provider_fal.media.hosts import DownloadHosts
from airflow_provider_fal.media.inputs import inline_input_files
from airflow_provider_fal.media.upload import CdnUploader

__all__ = [
    "EXTRA_QUEUE_URL",
    "EXTRA_START_TIMEOUT",
    "EXTRA_TIMEOUT",
    "FAL_KEY_ENV",
    "FalConnectionSettings",
    "FalHook",
    "how_to_create",
]


class FalHook(AsyncHookSide, BaseHook):
    """Run fal.ai models with the API key of an Airflow connection.

    The connection's password holds the API key (``Authorization: Key <key>``); with a login
    set, the key is ``<login>:<password>`` (fal's key-id/secret form). The optional host
    replaces ``https://fal.run`` (point it at the emulator in tests), the ``queue_url`` extra
    replaces ``https://queue.fal.run``, ``timeout`` sets the read timeout and
    ``start_timeout`` a default ``X-Fal-Request-Timeout``.

    The connection is resolved once, on first use, and one HTTP session serves every call
    of this hook instance.

    :param fal_conn_id: the fal connection. If it is the default ``fal_default`` and does not
        exist, the ``FAL_KEY`` environment variable is used, as fal's own client would.
    :param retry_policy: a :class:`RetryPolicy` or a dict of its fields.
    :param timeout: read timeout in seconds for each call (overrides the connection extra).
    :param pool_maxsize: HTTP connections kept per host; raise it for concurrent use.
    """

    conn_name_attr = "fal_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "fal"
    hook_name = "fal.ai"

    def __init__(
        self,
        fal_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        timeout: float | None = None,
        pool_maxsize: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fal_conn_id = fal_conn_id
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = timeout
        self.pool_maxsize = pool_maxsize

    def __repr__(self) -> str:
        return f"FalHook(fal_conn_id={self.fal_conn_id!r})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Form behaviour for Airflow UIs before 3.2 (3.2+ read the provider info)."""
        return ui_field_behaviour()

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The connection's extra fields as WTForms fields, for Airflow UIs before 3.2."""
        return connection_form_widgets()

    @cached_property
    def settings(self) -> FalConnectionSettings:
        """API key, URLs and defaults, from the connection (looked up once, on first use).

        A missing default connection falls back to the ``FAL_KEY`` environment variable.
        """
        from airflow.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.fal_conn_id)
        except AirflowNotFoundException:
            return settings_without_connection(self.fal_conn_id, self.log)
        return settings_from_connection(conn, self.fal_conn_id)

    @cached_property
    def client(self) -> FalClient:
        """The configured client, with this hook's one HTTP session."""
        settings = self.settings
        return FalClient(
            settings.api_key,
            run_url=settings.run_url,
            queue_url=settings.queue_url,
            retry_policy=self.retry_policy,
            timeout=self.call_timeout(settings),
            pool_maxsize=self.pool_maxsize,
            max_answer_bytes=settings.max_answer_bytes,
            logger=self.log,
        )

    @cached_property
    def uploader(self) -> CdnUploader:
        """Uploads input files to fal's CDN: one storage token and one cache of uploads by digest per hook."""
        return cdn_uploader(self.settings, self.retry_policy, self.call_timeout(self.settings), self.log)

    def upload_inputs(self, arguments: Any, *, uris: bool = False, field: str = "arguments", **more: Any) -> Any:
        """``arguments`` with its files (``Path``/``ObjectStoragePath``; file URIs too with ``uris``) as
        CDN URLs above the connection's ``upload_threshold_kb``, else data: URIs (``more``: ``local_fields``)."""
        limit = self.settings.upload_threshold  # None: never upload
        uploader = self.uploader if limit is not None else None
        return inline_input_files(arguments, uris=uris, field=field, uploader=uploader, threshold=limit, **more)

    def download_limits(self) -> dict[str, Any]:
        """Where media of this connection's results may be downloaded from, and their size cap:
        fal's hosts, the connection's own hosts and its ``download_hosts`` extra (see :mod:`media.hosts`)."""
        settings = self.settings
        return {
            "download_hosts": DownloadHosts.for_connection(
                (settings.run_url, settings.queue_url), settings.download_hosts
            ),
            "max_bytes": settings.max_download_bytes,
        }

    def get_pricing(self, endpoint_id: str) -> Pricing | None:
        """fal's price of one unit of ``endpoint_id`` (Platform API, connection extra ``api_url``;
        cached for an hour), or ``None`` when fal lists no price for it. Raises :class:`FalError`."""
        return fetch_pricing(self.client, self.settings.api_url, endpoint_id, timeout=self.client.queue_call_timeout())

    def call_timeout(self, settings: FalConnectionSettings) -> float | None:
        """The read timeout of one call: this hook's ``timeout``, else the connection's extra, else None."""
        if self.timeout is not None:
            return optional_seconds(self.timeout, "timeout", MAX_CALL_SECONDS)
        return optional_seconds(
            settings.timeout, f"the {EXTRA_TIMEOUT!r} extra of connection {self.fal_conn_id!r}", MAX_CALL_SECONDS
        )

    def prepare(
        self,
        model_id: Any,
        arguments: Any = None,
        *,
        start_timeout: Any = None,
        **options: Any,
    ) -> FalRequest:
        """Check and encode a model call, with the connection's defaults applied (the one place they are).

        ``options`` are those of :func:`~airflow_provider_fal.core.request.prepare_request`
        (``object_lifecycle``, ``hint``, ``priority``, ``webhook_url``, ``headers``, ``timeout``).
        A ``start_timeout`` left unset takes the connection's ``start_timeout`` extra.
        """
        if start_timeout is None or start_timeout == "":
            start_timeout = self.settings.start_timeout
        return prepare_request(model_id, arguments, start_timeout=start_timeout, **options)

    def get_conn(self) -> FalClient:
        return self.client

    def run_with_metadata(
        self,
        model_id: str,
        arguments: dict[str, Any] | None = None,
        *,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: str | None = None,
        headers: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> FalResponse:
        """Like :meth:`run`, returning the output together with fal's request id."""
        request = self.prepare(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            headers=headers,
            timeout=timeout,
        )
        return self.send(request)

    def send(self, request: FalRequest) -> FalResponse:
        """Run a prepared request (see :meth:`prepare`) synchronously."""
        self.log.debug("Running fal model %s", request.model_id)
        response = self.client.send(request)
        self.log.info("fal model %s answered (request id %s)", request.model_id, response.request_id)
        return response

    def run(
        self,
        model_id: str,
        arguments: dict[str, Any] | None = None,
        *,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: str | None = None,
        headers: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``model_id`` synchronously on ``POST {host}/{model_id}`` and return its JSON output.

        :param model_id: ``owner/app[/subpath]``, e.g. ``fal-ai/flux/dev``.
        :param arguments: the model input (a JSON object).
        :param start_timeout: seconds (or timedelta) a runner may take to start; >= 1.
            Sent as ``X-Fal-Request-Timeout``. Expiry raises :class:`FalStartTimeoutError`.
        :param object_lifecycle: how long output media stay available: seconds, timedelta,
            ``"never"`` or ``{"expiration_duration_seconds": N}``.
        :param hint: runner hint (``X-Fal-Runner-Hint``).
        :param headers: other ``X-Fal-*`` headers; may not set ``Authorization``.
        :param timeout: read timeout in seconds (default 600 s plus the start timeout).
        :raises FalError: a subclass describing what went wrong; see :mod:`exceptions`.
        """
        return self.run_with_metadata(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            headers=headers,
            timeout=timeout,
        ).output

    # ------------------------------------------------------------------ queue

    def submit(
        self,
        model_id: str,
        arguments: dict[str, Any] | None = None,
        *,
        start_timeout: Any = None,
        object_lifecycle: Any = None,
        hint: str | None = None,
        priority: str | None = None,
        webhook_url: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> QueueHandle:
        """Put a model call on fal's queue (``POST {queue_url}/{model_id}``) and return its handle.

        Takes the same inputs as :meth:`run` plus ``priority`` (``"normal"``/``"low"``) and
        ``webhook_url``; the connection's default start timeout applies. The handle holds the
        request id and the status/response/cancel URLs; ``handle.to_dict()`` is JSON for XCom.
        """
        request = self.prepare(
            model_id,
            arguments,
            start_timeout=start_timeout,
            object_lifecycle=object_lifecycle,
            hint=hint,
            priority=priority,
            webhook_url=webhook_url,
            headers=headers,
        )
        return self.enqueue(request)

    def enqueue(self, request: FalRequest) -> QueueHandle:
        """Put a prepared request (see :meth:`prepare`) on fal's queue and return its handle."""
        handle = self.client.enqueue(request)
        self.log.info("Queued fal model %s as request %s", handle.model_id, handle.request_id)
        return handle

    def cancel(self, handle: QueueHandle | dict[str, Any]) -> str:
        """Cancel the request: ``CANCELLATION_REQUESTED`` or ``ALREADY_COMPLETED``."""
        outcome = self.client.cancel(handle)
        request_id = handle.request_id if isinstance(handle, QueueHandle) else handle.get("request_id")
        self.log.info("Cancel of fal request %s: %s", request_id, outcome)
        return outcome

    def wait(
        self,
        handle: QueueHandle | dict[str, Any],
        *,
        timeout: Any = DEFAULT_WAIT_TIMEOUT,
        poll_interval: Any = DEFAULT_POLL_INTERVAL,
        logs: bool = True,
        on_status: Callable[[QueueStatus], None] | None = None,
    ) -> Any:
        """Block until the request completes and return its output; at most ``timeout`` seconds.

        New runner log lines and queue positions go to this hook's log as they arrive (unless
        ``on_status`` is given). On timeout the request is cancelled and
        :class:`FalTimeoutError` raised; a request that failed raises the model's error, read from
        its result as a synchronous call's answer would be.
        """
        if on_status is None:
            on_status = self.progress_logger()
        return self.client.wait(
            handle, timeout=timeout, poll_interval=poll_interval, logs=logs, on_status=on_status
        ).output

    def progress_logger(self) -> Callable[[QueueStatus], None]:
        """An ``on_status`` callback logging each new runner line and queue move exactly once."""
        progress = QueueProgress()

        def log_progress(status: QueueStatus) -> None:
            for level, message in progress.updates(status):
                self.log.log(level, "%s", message)

        return log_progress

    def test_connection(self) -> tuple[bool, str]:
        """Tell a working API key from a wrong one without running (or paying for) a model.

        Probes the queue status of a request that cannot exist; see
        :func:`~airflow_provider_fal.core.probe.check_credentials`.
        """
        try:
            return True, check_credentials(self.client)
        except FalError as error:
            return False, str(error)
        except Exception as error:  # the UI shows the message; never let the Test button crash
            return False, f"{type(error).__name__}: {error}"

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()
        if "uploader" in self.__dict__:
            self.uploader.close()
