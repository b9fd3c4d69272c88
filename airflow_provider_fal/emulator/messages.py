"""Transport-neutral request and response objects passed between the HTTP handler and the routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .state import FileEntry

JSON_TYPE = "application/json"

_NOT_PARSED: Any = object()


@dataclass
class Request:
    """An HTTP request as read by the handler (body fully read)."""

    method: str
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes
    _json: Any = field(default=_NOT_PARSED, repr=False)

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        value = None
        for key, item in self.headers:
            if key.lower() == lowered:
                value = item
        return value

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` when it is not JSON."""
        if self._json is _NOT_PARSED:
            self._json = json.loads(self.body.decode("utf-8"))
        return self._json

    def json_or_none(self) -> Any:
        if not self.body:
            return None
        try:
            return self.json()
        except ValueError:
            return None


@dataclass
class Response:
    """What to answer. Exactly one of ``body``, ``file``, ``events`` or ``drop`` is meaningful."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    drop: bool = False  # close the socket without answering
    file: FileEntry | None = None  # stream a served file
    events: Iterator[bytes] | None = None  # server-sent events, then close

    @classmethod
    def json(cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
        return cls(status=status, body=dumps(payload), headers=list(headers or []))


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def error(
    status: int, detail: Any, error_type: str | None = None, headers: list[tuple[str, str]] | None = None
) -> Response:
    """An error answer; infrastructure errors carry ``error_type`` in the body and ``X-Fal-Error-Type``."""
    payload: dict[str, Any] = {"detail": detail}
    all_headers: list[tuple[str, str]] = []
    if error_type is not None:
        payload["error_type"] = error_type
        all_headers.append(("X-Fal-Error-Type", error_type))
    all_headers.extend(headers or [])
    return Response.json(status, payload, all_headers)
