"""The triggerer's side of FalHook: the connection through Airflow's async API, and async queue clients."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from airflow_provider_fal.core.async_client import AsyncQueueClient, shared_http
from airflow_provider_fal.core.http import queue_call_timeout
from airflow_provider_fal.core.queue import QueueHandle, coerce_handle
from airflow_provider_fal.hooks.connection import (
    FalConnectionSettings,
    settings_from_connection,
    settings_without_connection,
)


class AsyncHookSide:
    """Mixed into :class:`~airflow_provider_fal.hooks.fal.FalHook` (uses its ``fal_conn_id``,
    ``settings``, ``retry_policy``, ``call_timeout`` and ``log``)."""

    async def aget_settings(self) -> FalConnectionSettings:
        """:attr:`settings`, looked up with Airflow's async connection API (for triggers).

        Uses ``BaseHook.aget_connection`` where Airflow has it (3.3 does); on Airflow 3.0, which
        lacks it, the synchronous lookup runs in a worker thread (``asgiref.sync_to_async``) so
        the event loop never blocks.
        """
        if "settings" in self.__dict__:
            return self.settings
        from airflow.exceptions import AirflowNotFoundException

        try:
            aget_connection = getattr(type(self), "aget_connection", None)
            if aget_connection is not None:
                conn = await aget_connection(self.fal_conn_id)
            else:  # Airflow 3.0
                from asgiref.sync import sync_to_async

                conn = await sync_to_async(self.get_connection)(self.fal_conn_id)
        except AirflowNotFoundException:
            settings = settings_without_connection(self.fal_conn_id, self.log)
        else:
            settings = settings_from_connection(conn, self.fal_conn_id)
        self.__dict__["settings"] = settings
        return settings

    @asynccontextmanager
    async def async_queue_client(
        self, request: QueueHandle | dict[str, Any], *, logger: logging.Logger | None = None
    ) -> AsyncIterator[tuple[AsyncQueueClient, QueueHandle]]:
        """For a trigger: the async queue client of this connection and the checked handle of ``request``.

        The connection is looked up with Airflow's async API; the client shares keep-alive
        connections with the other triggers of the event loop (see :func:`shared_http`).
        """
        settings = await self.aget_settings()
        handle = coerce_handle(request, settings.queue_url)
        async with shared_http(settings.api_key, shard=handle.request_id) as http:
            yield self.async_client(http, settings, logger), handle

    def async_client(
        self, http: Any, settings: FalConnectionSettings, logger: logging.Logger | None = None
    ) -> AsyncQueueClient:
        """The async queue client of ``settings`` over ``http`` (a :func:`shared_http` client)."""
        return AsyncQueueClient(
            http,
            settings.api_key,
            queue_url=settings.queue_url,
            retry_policy=self.retry_policy,
            timeout=queue_call_timeout(self.call_timeout(settings)),
            max_answer_bytes=settings.max_answer_bytes,
            logger=logger or self.log,
        )
