"""Validation and coercion of everything a caller passes, done before any request is sent.

Each function raises :class:`FalConfigurationError` naming the field and the fix. Values may
arrive rendered from Jinja templates, so numeric strings are accepted where numbers are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_fal.exceptions import FalConfigurationError

MODEL_ID_EXAMPLE = "fal-ai/flux/dev"
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+")
_THREE_SEGMENT_APP_OWNERS = frozenset({"workflows", "comfy"})
MIN_START_TIMEOUT_SECONDS = 1.0
# Header names that carry the credential or framing: a caller's ``headers`` may not set them.
_PROTECTED_HEADERS = frozenset({"authorization", "content-type", "content-length", "host"})


def validate_model_id(model_id: Any, field: str = "model_id") -> str:
    """Return ``model_id`` if it is ``owner/app[/subpath...]`` made of safe path segments.

    Nothing accepted here can move a request off the configured host or out of its path.
    """
    if not isinstance(model_id, str) or not model_id:
        raise FalConfigurationError(f"{field} must be a non-empty string like '{MODEL_ID_EXAMPLE}', got {model_id!r}.")
    if "://" in model_id or model_id.lower().startswith(("http:", "https:", "//")):
        raise FalConfigurationError(
            f"{field} {model_id!r} looks like a URL. Pass only the model ID ('owner/app[/subpath]', "
            f"e.g. '{MODEL_ID_EXAMPLE}'); set the host on the fal connection instead."
        )
    segments = model_id.split("/")
    if len(segments) < 2:
        raise FalConfigurationError(f"{field} {model_id!r} needs an owner and an app, like '{MODEL_ID_EXAMPLE}'.")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise FalConfigurationError(
                f"{field} {model_id!r} has an empty, '.' or '..' path segment; use 'owner/app[/subpath]' "
                f"with no leading, trailing or doubled '/', e.g. '{MODEL_ID_EXAMPLE}'."
            )
        if not _SEGMENT.fullmatch(segment):
            raise FalConfigurationError(
                f"{field} {model_id!r} has an invalid segment {segment!r}: only letters, digits, "
                f"'-', '_' and '.' are allowed (no spaces, '@', '?', '#', '%' or ':')."
            )
    return model_id


def app_id_of(model_id: str) -> str:
    """The app part of a model ID: two segments, three for ``workflows/``/``comfy/`` apps."""
    segments = validate_model_id(model_id).split("/")
    size = 3 if segments[0] in _THREE_SEGMENT_APP_OWNERS and len(segments) >= 3 else 2
    return "/".join(segments[:size])


def validate_base_url(url: Any, field: str) -> str:
    """A base URL from the connection: http(s), a host, no query/fragment/credentials."""
    if not isinstance(url, str) or not url.strip():
        raise FalConfigurationError(f"{field} must be a URL like 'https://fal.run', got {url!r}.")
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        raise FalConfigurationError(f"{field} contains whitespace or control characters; use e.g. 'https://fal.run'.")
    if "://" not in url:
        if url.lower().startswith(("http:", "https:")):
            raise FalConfigurationError(f"{field} has a malformed scheme (no '//'); write it as 'https://host'.")
        url = f"https://{url}"
    parts = urlsplit(url)
    # Checked first: the messages below quote the URL, which must then hold no secret.
    if "@" in parts.netloc or "?" in url or "#" in url:
        raise FalConfigurationError(
            f"{field} must not contain credentials, a query or a fragment; put the API key in the "
            "connection's password field."
        )
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FalConfigurationError(
            f"{field} {url!r} is not an http(s) URL; use e.g. 'https://fal.run' or 'http://127.0.0.1:8765'."
        )
    if not port_ok:
        raise FalConfigurationError(f"{field} {url!r} has an invalid port; use a number from 1 to 65535.")
    return url.rstrip("/")


def _seconds(value: Any, field: str, fix: str) -> float:
    if isinstance(value, bool):
        raise FalConfigurationError(f"{field} must be a number of seconds, not a boolean. {fix}")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise FalConfigurationError(f"{field} must be a number of seconds, got {value!r}. {fix}") from None
    else:
        raise FalConfigurationError(
            f"{field} must be seconds (number, numeric string or timedelta), got {type(value).__name__}. {fix}"
        )
    if not math.isfinite(number):
        raise FalConfigurationError(f"{field} must be a finite number of seconds, got {value!r}. {fix}")
    return number


def positive_seconds(value: Any, field: str) -> float:
    """Seconds from a number, a numeric string (templates render strings) or a timedelta; > 0.

    The one coercion of a duration a caller gives (timeouts, poll intervals, progress intervals).
    """
    fix = f"Give {field} as seconds (e.g. 30 or '30') or a timedelta."
    seconds = _seconds(value, field, fix)
    if seconds <= 0:
        raise FalConfigurationError(f"{field} must be a positive number of seconds, got {value!r}. {fix}")
    return seconds


def optional_seconds(value: Any, field: str) -> float | None:
    """:func:`positive_seconds`, with ``None`` or ``""`` (an empty template or extra) meaning unset."""
    if value is None or value == "":
        return None
    return positive_seconds(value, field)


def coerce_start_timeout(value: Any, field: str = "start_timeout") -> float | None:
    """Seconds a runner may take to *start* the request (``X-Fal-Request-Timeout``), >= 1."""
    if value is None or value == "":
        return None
    fix = "Use at least 1 second, e.g. 60, '60' or timedelta(minutes=1)."
    seconds = _seconds(value, field, fix)
    if seconds < MIN_START_TIMEOUT_SECONDS:
        raise FalConfigurationError(f"{field} must be at least 1 second (fal's minimum), got {value!r}. {fix}")
    return seconds


def coerce_object_lifecycle(value: Any, field: str = "object_lifecycle") -> dict[str, int | None] | None:
    """The ``X-Fal-Object-Lifecycle-Preference`` object for seconds, a timedelta, ``"never"`` or a dict."""
    if value is None or value == "":
        return None
    fix = "Use a positive whole number of seconds (e.g. 86400 or timedelta(days=1)) or 'never'."
    if isinstance(value, str) and value.strip().lower() == "never":
        return {"expiration_duration_seconds": None}
    if isinstance(value, Mapping):
        unknown = set(value) - {"expiration_duration_seconds"}
        if unknown or "expiration_duration_seconds" not in value:
            raise FalConfigurationError(
                f"{field} as a dict must be {{'expiration_duration_seconds': N or None}}, got keys "
                f"{sorted(map(str, value))}. {fix}"
            )
        inner = value["expiration_duration_seconds"]
        if inner is None:
            return {"expiration_duration_seconds": None}
        return {"expiration_duration_seconds": _whole_positive_seconds(inner, field, fix)}
    return {"expiration_duration_seconds": _whole_positive_seconds(value, field, fix)}


def _whole_positive_seconds(value: Any, field: str, fix: str) -> int:
    seconds = _seconds(value, field, fix)
    if seconds <= 0 or seconds != int(seconds):
        raise FalConfigurationError(f"{field} must be a positive whole number of seconds, got {value!r}. {fix}")
    return int(seconds)


def coerce_arguments(value: Any, field: str = "arguments") -> dict[str, Any]:
    """The model input: a JSON object (a dict, or a string holding a JSON object)."""
    return encode_arguments(value, field)[0]


def encode_arguments(value: Any, field: str = "arguments") -> tuple[dict[str, Any], bytes]:
    """:func:`coerce_arguments` and the JSON body it sends, encoded once (which is also the check)."""
    if value is None:
        return {}, b"{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FalConfigurationError(
                f"{field} is a string that is not JSON; pass a dict such as {{'prompt': 'a cat'}}."
            ) from None
    if not isinstance(value, Mapping):
        raise FalConfigurationError(
            f"{field} must be a JSON object (dict) of model inputs, got {type(value).__name__}; "
            "e.g. {'prompt': 'a cat'}."
        )
    value = dict(value)  # a copy; also lets any Mapping (not only dict) through json.dumps
    try:
        body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise FalConfigurationError(
            f"{field} is not JSON-serialisable ({error}); convert values to str, numbers, lists or dicts "
            "(NaN and infinity are not allowed)."
        ) from None
    return value, body


def coerce_extra_headers(value: Any, field: str = "headers") -> dict[str, str]:
    """Extra platform headers (``X-Fal-Store-IO`` ...); may not set ``Authorization`` and friends."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FalConfigurationError(f"{field} must be a dict of header names to values.") from None
    if not isinstance(value, Mapping):
        raise FalConfigurationError(f"{field} must be a dict of header names to values, got {type(value).__name__}.")
    headers: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not name or any(c in name for c in "\r\n: "):
            raise FalConfigurationError(f"{field} has an invalid header name {name!r}.")
        if name.lower() in _PROTECTED_HEADERS:
            raise FalConfigurationError(
                f"{field} may not set {name!r}: the API key comes from the fal connection and the "
                "body framing from the client."
            )
        if raw is None:  # a templated header that rendered to nothing is left out, not sent as "null"
            continue
        text = json.dumps(raw) if isinstance(raw, (dict, list, bool)) else str(raw)
        if "\r" in text or "\n" in text:
            raise FalConfigurationError(f"{field}[{name!r}] must not contain line breaks.")
        headers[name] = text
    return headers


def coerce_hint(value: Any, field: str = "hint") -> str | None:
    """Runner hint (``X-Fal-Runner-Hint``): a short single-line string."""
    if value is None or value == "":
        return None
    text = str(value)
    if "\r" in text or "\n" in text:
        raise FalConfigurationError(f"{field} must be a single line of text.")
    return text


def coerce_priority(value: Any, field: str = "priority") -> str | None:
    """Queue priority (``X-Fal-Queue-Priority``): ``normal`` or ``low``."""
    if value is None or value == "":
        return None
    if value not in ("normal", "low"):
        raise FalConfigurationError(f"{field} must be 'normal' or 'low', got {value!r}.")
    return str(value)
