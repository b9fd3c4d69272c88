"""A model call prepared once: validated, coerced, encoded, and then sent as it is.

:func:`prepare_request` is the only place a caller's values (rendered templates, hook
arguments, batch inputs) are checked and turned into fal's request: the body is JSON-encoded
once and the ``X-Fal-*`` headers built once. Every sender (a synchronous run, a queue submit,
each batch item) takes the resulting :class:`FalRequest` without checking it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from airflow_provider_fal.core.queue import coerce_webhook_url
from airflow_provider_fal.core.validation import (
    MAX_CALL_SECONDS,
    coerce_extra_headers,
    coerce_hint,
    coerce_object_lifecycle,
    coerce_priority,
    coerce_start_timeout,
    encode_arguments,
    optional_seconds,
    plain_seconds,
    validate_model_id,
)

START_TIMEOUT_HEADER = "X-Fal-Request-Timeout"
LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"
RUNNER_HINT_HEADER = "X-Fal-Runner-Hint"
PRIORITY_HEADER = "X-Fal-Queue-Priority"


@dataclass(frozen=True)
class FalRequest:
    """A model call whose every input has been validated and encoded; nothing sent yet.

    ``arguments`` and ``headers`` are read-only views; ``body`` is what is sent. ``timeout`` is
    an explicit read timeout for a synchronous call (None: the client's). ``priority`` and
    ``webhook_url`` only matter when the request goes through fal's queue.
    """

    model_id: str
    arguments: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float | None = None
    timeout: float | None = None
    priority: str | None = None
    webhook_url: str | None = None
    #: What :meth:`fingerprint` reads instead of ``body`` when they differ: the arguments with
    #: uploaded files named by their content digest, not by a CDN URL that changes per upload.
    identity: bytes | None = field(default=None, repr=False)

    def with_arguments(self, arguments: Any, field: str = "arguments", identity: Any = None) -> FalRequest:
        """The same call (model, headers, timeouts) with other arguments, e.g. one batch input;
        ``identity``: those arguments as :meth:`fingerprint` should see them (see ``media.upload``)."""
        checked, body = encode_arguments(arguments, field)
        stable = None if identity is None else encode_arguments(identity, field)[1]
        return replace(
            self, arguments=MappingProxyType(checked), body=body, identity=stable if stable != body else None
        )

    def fingerprint(self) -> str:
        """A digest of what a submit sends, to tell a stored request of the same call from another."""
        blob = json.dumps(
            [self.model_id, (self.identity or self.body).decode(), dict(self.headers), self.webhook_url],
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def prepare_request(
    model_id: Any,
    arguments: Any = None,
    *,
    start_timeout: Any = None,
    object_lifecycle: Any = None,
    hint: Any = None,
    priority: Any = None,
    webhook_url: Any = None,
    headers: Any = None,
    timeout: Any = None,
) -> FalRequest:
    """Check and encode a model call; raises :class:`FalConfigurationError` naming the field and the fix."""
    checked_arguments, body = encode_arguments(arguments)
    start = coerce_start_timeout(start_timeout)
    queue_priority = coerce_priority(priority)
    built = coerce_extra_headers(headers)
    if start is not None:
        built[START_TIMEOUT_HEADER] = plain_seconds(start)
    lifecycle = coerce_object_lifecycle(object_lifecycle)
    if lifecycle is not None:
        built[LIFECYCLE_HEADER] = json.dumps(lifecycle, separators=(",", ":"))
    runner_hint = coerce_hint(hint)
    if runner_hint is not None:
        built[RUNNER_HINT_HEADER] = runner_hint
    if queue_priority is not None:
        built[PRIORITY_HEADER] = queue_priority
    return FalRequest(
        model_id=validate_model_id(model_id),
        arguments=MappingProxyType(checked_arguments),
        body=body,
        headers=MappingProxyType(built),
        start_timeout=start,
        timeout=optional_seconds(timeout, "timeout", MAX_CALL_SECONDS),
        priority=queue_priority,
        webhook_url=coerce_webhook_url(webhook_url),
    )
