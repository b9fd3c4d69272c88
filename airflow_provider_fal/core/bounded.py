"""Reading an HTTP body within a size cap and a total deadline.

A read timeout bounds only the silence between two packets: a server that sends one byte a
second keeps a plain ``requests`` call busy for as long as it likes, and a body with no
``Content-Length`` may be endless. Every body this provider reads from the network (fal's
answers, media downloads) goes through :func:`bounded_chunks`, which stops at whichever
comes first: the end of the body, ``max_bytes``, or ``deadline``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from airflow_provider_fal.exceptions import FalConfigurationError, FalError

#: The largest answer read from fal's API (a model's JSON output, data URIs included). Real
#: outputs are kilobytes; a large video returned inline as a data URI is tens of megabytes.
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The largest media file downloaded from a result (fal's longest videos are hundreds of MB).
DEFAULT_MAX_DOWNLOAD_BYTES = 4 * 1024 * 1024 * 1024
#: Bytes asked for per read: a trickling server returns fewer, and the deadline is checked per read.
READ_SIZE = 64 * 1024


class FalResponseTooLargeError(FalError):
    """An answer or download was larger than the cap allows; nothing more of it was read.

    Permanent: the same request would bring the same body (and, for a model run, bill again).
    """

    permanent = True


class DeadlineExceeded(Exception):
    """The body did not finish arriving before the deadline (the caller names the error)."""

    def __init__(self, received: int) -> None:
        super().__init__(f"{received} bytes arrived before the deadline")
        self.received = received


def too_large(what: str, limit: int, setting: str) -> FalResponseTooLargeError:
    """The error of a body over ``limit`` bytes; ``setting`` says how to raise the cap."""
    return FalResponseTooLargeError(
        f"{what} is larger than the cap of {describe_size(limit)}; stopped reading it. "
        f"Raise {setting} if it is expected."
    )


def check_announced(length: str | None, limit: int, what: str, setting: str) -> None:
    """Refuse a body whose ``Content-Length`` already exceeds the cap, before reading any of it."""
    try:
        announced = int(length) if length is not None else None
    except ValueError:
        return  # the readers below count what really arrives
    if announced is not None and announced > limit:
        raise too_large(f"{what} (announced as {describe_size(announced)})", limit, setting)


def bounded_chunks(
    raw: Any, *, max_bytes: int, deadline: float, what: str, setting: str, decode_content: bool = True
) -> Iterator[bytes]:
    """The chunks of a urllib3 response body, stopping with an error past ``max_bytes`` bytes or
    after ``deadline`` (``time.monotonic()``): :class:`FalResponseTooLargeError` or
    :class:`DeadlineExceeded`. ``read1`` returns whatever has arrived, so a trickle is noticed
    between its bytes, at most one read timeout after the deadline."""
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(received)
        chunk = raw.read1(READ_SIZE, decode_content=decode_content)
        if not chunk:
            return
        received += len(chunk)
        if received > max_bytes:
            raise too_large(what, max_bytes, setting)
        yield chunk


def describe_size(size: int) -> str:
    """``64 MiB``, ``4 GiB``, ``512 bytes``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            value = size / factor
            return f"{value:g} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{size} bytes"


def positive_size(value: Any, field: str) -> int:
    """A size cap in bytes: a positive whole number (or a numeric string)."""
    fix = f"Give {field} as a whole number of bytes, e.g. {64 * 1024 * 1024}."
    try:
        size = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise FalConfigurationError(f"{field} must be a positive whole number, got {_shown(value)}. {fix}")
    return size


def megabytes(value: Any, field: str) -> int | None:
    """A size given in MiB (a connection extra such as ``max_answer_mb``) as bytes; blank means unset."""
    if value is None or value == "":
        return None
    try:
        size = float(str(value).strip())
    except ValueError:
        size = float("nan")
    if not size > 0 or size > 1024 * 1024:  # NaN fails the first test
        raise FalConfigurationError(
            f"{field} must be a positive number of MiB (at most 1048576), got {_shown(value)}. E.g. 64."
        )
    return int(size * 1024 * 1024)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else "a very large number"
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]
