"""Append-only progress logs: how a batch's progress folder on a local (or mounted) disk holds groups.

Each writer (one task or trigger process) appends its groups of records, one JSON line per
group, to a log of its own, ``l-<writer>[-<n>].jsonl``. Opening a file, appending a line and
closing it costs a few microseconds; a new file per group, written and renamed, cost about
175 µs on ext4, most of what recording a queue submit cost the worker. Object storage has no
append, so there every group stays an object of its own.

Only its writer appends to a log, and a log is never deleted by a checkpoint: a writer still
alive (a zombie try) may append after a checkpoint read the log. The checkpoint records how
many bytes of each log it holds instead, and reading starts after them.

A line counts only once its newline is there, so a line cut short by a kill is never read. A
writer whose append failed moves on to a new log (:func:`log_name`), so nothing is ever
appended after a partial line; reading stops at a complete line that does not parse (data not
visible yet on a network file system), so a checkpoint never holds, or skips, what lies after it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

LOG_NAME = re.compile(r"^l-[0-9a-f]{8}(?:-\d+)?\.jsonl$")


def log_name(writer: str, part: int) -> str:
    """The log of ``writer``; ``part`` counts the logs it gave up after a failed append."""
    return f"l-{writer}.jsonl" if part == 0 else f"l-{writer}-{part}.jsonl"


def encode(value: dict[str, Any]) -> bytes:
    """Compact JSON, as every progress object and log line is written."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_line(sequence: int, records: dict[int, dict[str, Any]]) -> bytes:
    return encode({"seq": sequence, "records": records}) + b"\n"


def append_line(path: str, line: bytes) -> None:
    """Append ``line`` to the log at ``path``; raises ``OSError`` unless all of it was written."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        written = os.write(handle, line)
    finally:
        os.close(handle)
    if written != len(line):
        raise OSError(errno.EIO, f"only {written} of {len(line)} bytes were appended to {path}")


@dataclass
class LogTail:
    """What a log holds after a given offset."""

    #: (sequence, records) of each group read, in the order written
    groups: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: the offset after the last group read: where the next read starts once a checkpoint holds these
    end: int = 0


def read_log(path: str, start: int) -> LogTail:
    """The groups of the log at ``path`` from byte ``start`` on, up to the first line that is
    incomplete or does not parse. A log that is gone (or unreadable) has nothing more."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return LogTail(end=start)
    tail = LogTail(end=start)
    position = 0
    while (newline := data.find(b"\n", position)) >= 0:
        try:
            value = json.loads(data[position:newline])
            sequence, records = value["seq"], value["records"]
        except (ValueError, KeyError, TypeError):
            break
        if not isinstance(sequence, int) or not isinstance(records, dict):
            break
        tail.groups.append((sequence, records))
        position = newline + 1
        tail.end = start + position
    return tail
