"""A small, fast, deterministic PNG writer (standard library only).

The images are 8-bit RGB, drawn as a grid of coloured blocks with a vertical
gradient inside each block. Colours come from a SHAKE-256 digest of a key, so
the same key always gives the same bytes. Rows are built from ``bytes``
repetition (a handful of operations per row), never per-pixel Python loops, so a
1024x1024 image renders in a few milliseconds.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = 8  # blocks per side
GRADIENT = 96  # brightness added from the top to the bottom of a block


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bounds(total: int, parts: int) -> list[int]:
    return [i * total // parts for i in range(parts + 1)]


def render_png(width: int, height: int, key: bytes) -> bytes:
    """Render a ``width`` x ``height`` RGB PNG whose content is derived from ``key``."""
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    palette = hashlib.shake_256(b"fal-emulator-png\x00" + key).digest(GRID * GRID * 3)
    xs = _bounds(width, GRID)
    ys = _bounds(height, GRID)
    rows: list[bytes] = []
    for band in range(GRID):
        y0, y1 = ys[band], ys[band + 1]
        band_height = max(1, y1 - y0)
        colours = [palette[(band * GRID + col) * 3 : (band * GRID + col) * 3 + 3] for col in range(GRID)]
        widths = [xs[col + 1] - xs[col] for col in range(GRID)]
        previous_shade = -1
        row = b""
        for y in range(y0, y1):
            shade = (y - y0) * GRADIENT // band_height
            if shade != previous_shade:
                # filter byte 0 (None) followed by the block colours of this row
                row = b"\x00" + b"".join(
                    bytes(((c[0] + shade) & 0xFF, (c[1] + shade) & 0xFF, (c[2] + shade) & 0xFF)) * w
                    for c, w in zip(colours, widths, strict=True)
                )
                previous_shade = shade
            rows.append(row)
    raw = b"".join(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, no interlace
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", zlib.compress(raw, 6)),
            _chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (handy in tests)."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height
