"""Validation and coercion of everything a caller passes, done before any request is sent.

Each function raises :class:`FalConfigurationError` naming the field and the fix. Values may
arrive rendered from Jinja templates, so numeric strings are accepted where numbers are.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
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
#: Upper bounds of durations. Anything above them is a typo or a unit mix-up, and unbounded
#: values overflow ``time``/``timedelta`` after the request was sent.
#: One call (start timeout, read and connect timeouts, retry waits): a day.
MAX_CALL_SECONDS = 24 * 3600.0
#: Waiting for a queued request, and the intervals of that wait: a week.
MAX_WAIT_SECONDS = 7 * 24 * 3600.0
#: Media lifetime (``object_lifecycle``): ten years; longer is what ``"never"`` is for.
MAX_LIFECYCLE_SECONDS = 10 * 365 * 24 * 3600
#: Longest model ID: real ones are a few dozen characters; a huge one only earns a 414.
MAX_MODEL_ID_CHARS = 256
# Header names that carry the credential or framing: a caller's ``headers`` may not set them.
_PROTECTED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "te",
        "trailer",
        "connection",
        "keep-alive",
        "upgrade",
        "expect",
    }
)
# RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Printable ASCII without space: what an API key may be made of.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


def validate_model_id(model_id: Any, field: str = "model_id") -> str:
    """Return ``model_id`` if it is ``owner/app[/subpath...]`` made of safe path segments.

    Nothing accepted here can move a request off the configured host or out of its path.
    """
    if not isinstance(model_id, str) or not model_id:
        raise FalConfigurationError(f"{field} must be a non-empty string like '{MODEL_ID_EXAMPLE}', got {model_id!r}.")
    if len(model_id) > MAX_MODEL_ID_CHARS:
        raise FalConfigurationError(
            f"{field} is {len(model_id)} characters long (at most {MAX_MODEL_ID_CHARS}); pass a model ID like "
            f"'{MODEL_ID_EXAMPLE}'. It starts {model_id[:40]!r}."
        )
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
    return _checked_base_url(url, field)


@functools.lru_cache(maxsize=64)
def _checked_base_url(url: str, field: str) -> str:
    """:func:`validate_base_url` of a string, remembered: every queue call rebuilds its URLs from
    the client's queue URL (a refused URL raises, and raising is not remembered)."""
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        raise FalConfigurationError(f"{field} contains whitespace or control characters; use e.g. 'https://fal.run'.")
    if "://" not in url:
        if url.lower().startswith(("http:", "https:")):
            raise FalConfigurationError(f"{field} has a malformed scheme (no '//'); write it as 'https://host'.")
        url = f"https://{url}"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: 'http://[::1'
        parts = None
    # Checked first: the messages below quote the URL, which must then hold no secret.
    if "@" in (parts.netloc if parts else url) or "?" in url or "#" in url:
        raise FalConfigurationError(
            f"{field} must not contain credentials, a query or a fragment; put the API key in the "
            "connection's password field."
        )
    if parts is None:
        raise FalConfigurationError(
            f"{field} {url!r} is not a valid URL (an unclosed '[' of an IPv6 address?); use e.g. "
            "'https://fal.run' or 'http://[::1]:8765'."
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


def _seconds(value: Any, field: str, fix: str, maximum: float) -> float:
    """Seconds from a number, numeric string or timedelta: finite and at most ``maximum``."""
    if isinstance(value, bool):
        raise FalConfigurationError(f"{field} must be a number of seconds, not a boolean. {fix}")
    if isinstance(value, timedelta):
        number = value.total_seconds()
    elif isinstance(value, int):
        number = float(value) if abs(value) <= maximum else math.inf if value > 0 else -math.inf
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise FalConfigurationError(f"{field} must be a number of seconds, got {value!r}. {fix}") from None
    else:
        raise FalConfigurationError(
            f"{field} must be seconds (number, numeric string or timedelta), got {type(value).__name__}. {fix}"
        )
    if math.isnan(number) or (math.isinf(number) and not isinstance(value, int)):
        raise FalConfigurationError(f"{field} must be a finite number of seconds, got {_short_repr(value)}. {fix}")
    if number > maximum:
        raise FalConfigurationError(
            f"{field} is at most {plain_seconds(maximum)} seconds ({_days(maximum)}), got {_short_repr(value)}. {fix}"
        )
    return number


def plain_seconds(seconds: float) -> str:
    """Seconds in plain decimal, to the millisecond: ``1234567``, ``2.5`` (never ``1.23457e+06``)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _days(seconds: float) -> str:
    days = seconds / 86400
    if days >= 365 and days % 365 == 0:
        return f"{days / 365:g} years"
    return {1: "a day", 7: "a week"}.get(days, f"{days:g} days")


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (over 4300 digits)
        return "a number too large to print"
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def positive_seconds(value: Any, field: str, maximum: float = MAX_WAIT_SECONDS) -> float:
    """Seconds from a number, a numeric string (templates render strings) or a timedelta; > 0.

    The one coercion of a duration a caller gives (timeouts, poll intervals, progress intervals).
    ``maximum``: :data:`MAX_CALL_SECONDS` for the timeouts of one call, else :data:`MAX_WAIT_SECONDS`.
    """
    fix = f"Give {field} as seconds (e.g. 30 or '30') or a timedelta."
    seconds = _seconds(value, field, fix, maximum)
    if seconds <= 0:
        raise FalConfigurationError(f"{field} must be a positive number of seconds, got {_short_repr(value)}. {fix}")
    return seconds


def optional_seconds(value: Any, field: str, maximum: float = MAX_WAIT_SECONDS) -> float | None:
    """:func:`positive_seconds`, with ``None`` or ``""`` (an empty template or extra) meaning unset."""
    if value is None or value == "":
        return None
    return positive_seconds(value, field, maximum)


def coerce_start_timeout(value: Any, field: str = "start_timeout") -> float | None:
    """Seconds a runner may take to *start* the request (``X-Fal-Request-Timeout``), 1 s to a day."""
    if value is None or value == "":
        return None
    fix = "Use 1 second to a day, e.g. 60, '60' or timedelta(minutes=1)."
    seconds = _seconds(value, field, fix, MAX_CALL_SECONDS)
    if seconds < MIN_START_TIMEOUT_SECONDS:
        raise FalConfigurationError(
            f"{field} must be at least 1 second (fal's minimum), got {_short_repr(value)}. {fix}"
        )
    return seconds


def coerce_object_lifecycle(value: Any, field: str = "object_lifecycle") -> dict[str, int | None] | None:
    """The ``X-Fal-Object-Lifecycle-Preference`` object for seconds, a timedelta, ``"never"`` or a dict."""
    if value is None or value == "":
        return None
    fix = "Use a positive whole number of seconds up to ten years (e.g. 86400 or timedelta(days=1)) or 'never'."
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
    seconds = _seconds(value, field, fix, MAX_LIFECYCLE_SECONDS)
    if seconds <= 0 or seconds != int(seconds):
        raise FalConfigurationError(
            f"{field} must be a positive whole number of seconds, got {_short_repr(value)}. {fix}"
        )
    return int(seconds)


def coerce_arguments(value: Any, field: str = "arguments") -> dict[str, Any]:
    """The model input: a JSON object (a dict, or a string holding a JSON object)."""
    return encode_arguments(value, field)[0]


def non_finite_number(value: Any) -> tuple[str, float] | None:
    """Where ``value`` (nested dicts, lists, tuples) holds a NaN or infinity: ``("['a'][0]", nan)``, else None.

    Such numbers are no JSON; Airflow cannot even store a rendered field holding one.
    """
    pending: list[tuple[str, Any]] = [("", value)]
    seen: set[int] = set()
    while pending:
        path, current = pending.pop()
        if isinstance(current, float) and not math.isfinite(current):
            return path, current
        if isinstance(current, (Mapping, list, tuple)):
            if id(current) in seen:  # a structure that contains itself is reported by the JSON encoder
                continue
            seen.add(id(current))
            items = current.items() if isinstance(current, Mapping) else enumerate(current)
            pending.extend((f"{path}[{key!r}]", item) for key, item in reversed(list(items)))
    return None


_TOO_DEEP = (
    "{field} is nested too deeply to encode as JSON (thousands of levels, or a structure that "
    "contains itself); flatten it."
)


def encode_arguments(value: Any, field: str = "arguments") -> tuple[dict[str, Any], bytes]:
    """:func:`coerce_arguments` and the JSON body it sends, encoded once (which is also the check)."""
    if value is None:
        return {}, b"{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise FalConfigurationError(_TOO_DEEP.format(field=field)) from None
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
    except RecursionError:
        raise FalConfigurationError(_TOO_DEEP.format(field=field)) from None
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
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise FalConfigurationError(
                f"{field} has an invalid header name {_short_repr(name)}: use letters, digits and '-', "
                "e.g. 'X-Fal-Store-IO'."
            )
        if name.lower() in _PROTECTED_HEADERS:
            raise FalConfigurationError(
                f"{field} may not set {name!r}: the API key comes from the fal connection and the "
                "body framing and connection handling from the client."
            )
        if raw is None:  # a templated header that rendered to nothing is left out, not sent as "null"
            continue
        text = json.dumps(raw) if isinstance(raw, (dict, list, bool)) else str(raw)
        headers[name] = header_value(text, f"{field}[{name!r}]")
    return headers


def header_value(text: str, field: str) -> str:
    """``text`` as an HTTP header value: surrounding blanks dropped, one line of Latin-1 text.

    The message never quotes the value: a header may carry a secret.
    """
    text = text.strip(" \t")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise FalConfigurationError(
            f"{field} contains a line break, tab, NUL or other control character; send a single line of text."
        )
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise FalConfigurationError(
            f"{field} contains characters HTTP headers cannot carry (only Latin-1 text); percent-encode or drop them."
        ) from None
    return text


def coerce_hint(value: Any, field: str = "hint") -> str | None:
    """Runner hint (``X-Fal-Runner-Hint``): a short single-line string."""
    if value is None or value == "":
        return None
    return header_value(str(value), field) or None


def clean_api_key(key: Any, source: str) -> str:
    """The API key from ``source`` (e.g. "the fal connection 'fal_default'"), surrounding whitespace removed.

    Keys copied from files and secret stores often end in a newline; it is dropped. A key that
    still holds whitespace, control or non-ASCII characters is refused, naming ``source`` and
    never quoting the key.
    """
    if not isinstance(key, str) or not key.strip():
        raise FalConfigurationError(f"{source} has no API key.")
    key = key.strip()
    if not _KEY_CHARS.fullmatch(key):
        raise FalConfigurationError(
            f"The API key of {source} contains whitespace, control or non-ASCII characters inside it "
            "(fal keys are printable ASCII). Paste the key again, without line breaks or spaces."
        )
    return key


def coerce_priority(value: Any, field: str = "priority") -> str | None:
    """Queue priority (``X-Fal-Queue-Priority``): ``normal`` or ``low``."""
    if value is None or value == "":
        return None
    if value not in ("normal", "low"):
        raise FalConfigurationError(f"{field} must be 'normal' or 'low', got {value!r}.")
    return str(value)
