"""What the emulator's request handlers need of the emulator: a small Protocol, so they import nothing of it.

:class:`~airflow_provider_fal.emulator.core.FalEmulator` implements it; the HTTP server, the
gateway and the control API are written against it, which keeps the emulator's modules free of
import cycles.
"""

from __future__ import annotations

from typing import Any, Protocol

from .messages import Request, Response
from .queue import QueueStore
from .state import EmulatorState, RequestRecord, WebhookRecord
from .webhooks import WebhookDispatcher

#: Paths of the control API (not fal's; never recorded as requests).
CONTROL_PREFIX = "/_emulator/"


class EmulatorHost(Protocol):
    """The emulator as its HTTP server and request handlers see it."""

    state: EmulatorState
    queue: QueueStore
    dispatcher: WebhookDispatcher
    default_file_lifespan: float | None

    @property
    def api_key(self) -> str: ...

    @property
    def control_token(self) -> str | None: ...

    @property
    def url(self) -> str: ...

    @property
    def queue_url(self) -> str: ...

    @property
    def requests(self) -> list[RequestRecord]: ...

    @property
    def webhooks(self) -> list[WebhookRecord]: ...

    def webhook_jwks(self) -> dict[str, Any]:
        """The public key that verifies webhook signatures, as a JWKS."""
        ...

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the emulator is stopping."""
        ...

    def respond(self, request: Request) -> Response:
        """The answer to one HTTP request (fal's API or the control API)."""
        ...

    def _finished(self, request: Any, status: int | None, started: float, duration: float) -> None: ...
