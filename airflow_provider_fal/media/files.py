"""fal file objects in a result: finding them, and naming the files they are stored as.

A *file object* is what fal returns for a media file: a dict with a ``url`` (and usually
``content_type``, ``file_name``, ``file_size``), anywhere in the output (``images[]``,
``video``, ``audio_url`` ...). Names built here are deterministic and made only of
``[A-Za-z0-9_.-]``, never starting with a dot, so nothing in a model's output can choose
a directory.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

#: The key added beside ``url`` in every file object that was stored.
STORED_PATH_KEY = "stored_path"
_MAX_NAME = 180
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "audio/mp3": "audio/mpeg",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "audio/vnd.wave": "audio/wav",
    "audio/x-flac": "audio/flac",
    "video/x-m4v": "video/mp4",
}
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/svg+xml": "svg",
    "image/avif": "avif",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/quicktime": "mov",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/flac": "flac",
    "audio/ogg": "ogg",
    "audio/aac": "aac",
    "application/json": "json",
    "text/plain": "txt",
    "application/zip": "zip",
    "model/gltf-binary": "glb",
}


# --------------------------------------------------------------------------- finding files


@dataclass(frozen=True)
class MediaRef:
    """A fal file object found in a result: where it sits, its URL and what it promises."""

    position: tuple[str | int, ...]
    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


def is_file_object(value: Any) -> bool:
    """Whether ``value`` is a fal file object: a dict whose ``url`` is an http(s) or ``data:`` URL."""
    if not isinstance(value, dict):
        return False
    url = value.get("url")
    return isinstance(url, str) and url.lower().startswith(("http://", "https://", "data:"))


def find_media(result: Any) -> list[MediaRef]:
    """Every fal file object in ``result``, depth first in document order."""
    found: list[MediaRef] = []

    def walk(value: Any, position: tuple[str | int, ...]) -> None:
        if is_file_object(value):
            found.append(
                MediaRef(
                    position=position,
                    url=value["url"],
                    content_type=_text_or_none(value.get("content_type")),
                    file_name=_text_or_none(value.get("file_name")),
                    file_size=_size_or_none(value.get("file_size")),
                )
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*position, str(key)))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, (*position, index))

    walk(result, ())
    return found


def _text_or_none(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _size_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(value) if float(value).is_integer() else None


# --------------------------------------------------------------------------- names


def safe_component(text: Any, fallback: str = "x") -> str:
    """``text`` reduced to ``[A-Za-z0-9_.-]``, no leading dot, never empty: safe as part of a file name."""
    cleaned = _UNSAFE.sub("_", str(text)).strip("._") or fallback
    return cleaned[:_MAX_NAME]


def file_prefix(task_id: str, *, map_index: int | None = None, input_index: int | None = None) -> str:
    """The per-task part of a file name: ``<task>[__m<map index>][__i<input index>]``.

    A ``map_index`` of -1 (not mapped) or None is left out.
    """
    parts = [safe_component(task_id, "task")]
    if map_index is not None and int(map_index) >= 0:
        parts.append(f"m{int(map_index)}")
    if input_index is not None:
        parts.append(f"i{int(input_index)}")
    return "__".join(parts)


def media_type(content_type: str | None) -> str:
    """``image/PNG; charset=x`` -> ``image/png``, with common aliases (``image/jpg``) normalised."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return _TYPE_ALIASES.get(base, base)


def extension_for(ref: MediaRef, served_type: str | None = None) -> str:
    """The file extension (no dot): from the promised type, the file name or URL, the served type, else ``bin``."""
    for candidate in (ref.content_type, served_type):
        kind = media_type(candidate)
        if kind in _EXTENSIONS:
            return _EXTENSIONS[kind]
    for name in (ref.file_name, PurePosixPath(urlsplit(ref.url).path).name if not ref.url.startswith("data:") else ""):
        suffix = PurePosixPath(name or "").suffix.lstrip(".").lower()
        if suffix and re.fullmatch(r"[a-z0-9]{1,8}", suffix):
            return suffix
    for candidate in (ref.content_type, served_type):
        guessed = mimetypes.guess_extension(media_type(candidate)) if media_type(candidate) else None
        if guessed:
            return guessed.lstrip(".")
    return "bin"


def _position_text(position: tuple[str | int, ...]) -> str:
    return "-".join(safe_component(part) for part in position) or "output"


def file_names(refs: list[MediaRef], prefix: str) -> list[str]:
    """Deterministic, distinct, safe base names (without extension) for ``refs``."""
    names: list[str] = []
    seen: set[str] = set()
    for ref in refs:
        name = f"{prefix}__{_position_text(ref.position)}"
        if len(name) > _MAX_NAME or name in seen:
            digest = hashlib.sha1(repr(ref.position).encode()).hexdigest()[:10]
            name = f"{name[: _MAX_NAME - 12]}__{digest}"
        seen.add(name)
        names.append(name)
    return names


def with_locations(value: Any, position: tuple[str | int, ...], stored: dict[tuple[str | int, ...], str]) -> Any:
    """A copy of ``value`` with ``stored_path`` added to every stored file object."""
    if position in stored and isinstance(value, dict):
        return {**value, STORED_PATH_KEY: stored[position]}
    if isinstance(value, dict):
        return {key: with_locations(item, (*position, str(key)), stored) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [with_locations(item, (*position, index), stored) for index, item in enumerate(value)]
    return value
