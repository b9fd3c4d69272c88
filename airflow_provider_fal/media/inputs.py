"""Send local files to fal: arguments that point at files become CDN URLs or ``data:`` URIs.

fal fetches its file inputs (``image_url`` for image-to-image, ``audio_url`` ...) by URL and
also accepts ``data:`` URIs up to roughly 10 MB. :func:`inline_input_files` walks the model
arguments and replaces every file reference with the URL of its upload to fal's CDN when an
``uploader`` is given and the file is larger than ``threshold`` bytes (see :mod:`media.upload`),
else with a ``data:`` URI:

* ``pathlib.Path`` and ``ObjectStoragePath`` objects, always (only DAG code can put objects
  into arguments; ``ObjectStoragePath("/data/{{ ds }}.png")`` is even templated by Airflow);
* strings that are ``file://`` or object storage URIs (``s3://conn_id@bucket/key.png`` ...),
  only when ``uris=True``: a string may come from ``dag_run.conf`` or XCom, and turning any
  string into a file read would let whoever triggers a DAG send the worker's files to fal.

A file to inline whose ``data:`` URI would exceed ``max_bytes`` fails with a clear error before
it is read, and before any request is sent.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
from collections.abc import Mapping
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media.locations import is_object_storage_path, read_location, uri_scheme

#: fal rejects ``data:`` URIs above roughly 10 MB; this is the size of the whole URI we allow.
DATA_URI_LIMIT = 10_000_000
#: URI schemes fal fetches itself; never touched.
_REMOTE_SCHEMES = frozenset({"http", "https", "data", "ftp"})
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF8", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
    (b"WAVE", 8, "audio/wav"),
    (b"ID3", 0, "audio/mpeg"),
    (b"fLaC", 0, "audio/flac"),
    (b"OggS", 0, "audio/ogg"),
    (b"ftyp", 4, "video/mp4"),
    (b"\x1a\x45\xdf\xa3", 0, "video/webm"),
    (b"%PDF", 0, "application/pdf"),
)


def data_uri_length(size: int, content_type: str) -> int:
    """Length of the ``data:<type>;base64,`` URI of ``size`` bytes."""
    return len(f"data:{content_type};base64,") + 4 * math.ceil(size / 3)


def sniff_content_type(name: str, head: bytes) -> str:
    """The media type of a file from its name, else its first bytes, else ``application/octet-stream``."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed:
        return guessed
    for magic, offset, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return "application/octet-stream"


def _check_fits(field: str, shown: str, size: int, content_type: str, limit: int) -> None:
    """Raise unless ``size`` bytes of ``content_type`` make a ``data:`` URI of at most ``limit`` characters."""
    uri_size = data_uri_length(size, content_type)
    if uri_size > limit:
        raise FalConfigurationError(
            f"{field}: {shown} is {size / 1e6:.1f} MB, {uri_size / 1e6:.1f} MB as a data: URI, above fal's limit of "
            f"about {limit / 1e6:g} MB for data: URIs. Let the provider upload it to fal's CDN (the fal connection's "
            "`upload_threshold_kb` extra, default 256), or pass a URL fal can fetch (e.g. a presigned S3/GCS URL)."
        )


def _encode(field: str, shown: str, name: str, data: bytes, limit: int) -> str:
    """``data`` as a ``data:`` URI, checked again: a file can grow between its size check and its read."""
    content_type = sniff_content_type(name, data[:64])
    _check_fits(field, shown, len(data), content_type, limit)
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def _size(path: Any, noun: str, field: str, shown: str, errors: type[Exception]) -> int:
    try:
        return int(path.stat().st_size)
    except FileNotFoundError:
        raise FalConfigurationError(f"{field}: the {noun} {shown} does not exist.") from None
    except errors as error:
        raise FalConfigurationError(f"{field}: cannot read {shown}: {error}") from None


def file_to_data_uri(value: Any, *, max_bytes: int = DATA_URI_LIMIT, field: str = "file") -> str:
    """A file as a ``data:`` URI; the size is checked before the file is read.

    ``value`` is any location :func:`~airflow_provider_fal.media.locations.read_location` accepts:
    an absolute path, a ``file://`` or object storage URI, a ``Path`` or an ``ObjectStoragePath``.
    """
    location = read_location(value, field)
    if location.local is not None:
        return _local_file_to_data_uri(location.local, max_bytes=max_bytes, field=field)
    return _object_to_data_uri(location.remote, max_bytes=max_bytes, field=field)


def _local_file_to_data_uri(local: Path, *, max_bytes: int, field: str) -> str:
    shown = repr(str(local))
    size = _size(local, "file", field, shown, OSError)
    if not local.is_file():
        raise FalConfigurationError(f"{field}: {shown} is not a regular file.")
    with local.open("rb") as handle:
        head = handle.read(64)
        _check_fits(field, shown, size, sniff_content_type(local.name, head), max_bytes)
        data = head + handle.read(size + 1 - len(head))
    return _encode(field, shown, local.name, data, max_bytes)


def _object_to_data_uri(path: Any, *, max_bytes: int, field: str) -> str:
    shown = repr(str(path))
    size = _size(path, "object", field, shown, Exception)
    name = PurePosixPath(str(path.path)).name
    _check_fits(field, shown, size, sniff_content_type(name, b""), max_bytes)
    with path.open("rb") as handle:
        data = handle.read(size + 1)
    return _encode(field, shown, name, data, max_bytes)


def file_to_input(value: Any, *, uploader: Any, threshold: int | None, field: str = "file") -> str:
    """A file as model input: the URL of its upload through ``uploader`` (a
    :class:`~airflow_provider_fal.media.upload.CdnUploader`) when it is larger than ``threshold``
    bytes, else a ``data:`` URI. Streamed from the local file or the object store."""
    location = read_location(value, field)
    if location.local is not None:
        source, noun, errors, name = location.local, "file", OSError, location.local.name
    else:
        source, noun, errors = location.remote, "object", Exception
        name = PurePosixPath(str(source.path)).name
    shown = repr(str(source))
    size = _size(source, noun, field, shown, errors)
    if threshold is None or size <= threshold:
        return file_to_data_uri(value, field=field)
    if location.local is not None and not location.local.is_file():
        raise FalConfigurationError(f"{field}: {shown} is not a regular file.")
    with source.open("rb") as handle:
        content_type = sniff_content_type(name, handle.read(64))
    return uploader.upload(
        lambda: source.open("rb"), size=size, name=name, content_type=content_type, shown=f"{field} ({shown})"
    )


def is_file_uri(value: Any) -> bool:
    """Whether ``value`` is a whole-string URI naming a file fal cannot fetch itself (``file://``, ``s3://`` ...)."""
    if not isinstance(value, str):
        return False
    scheme = uri_scheme(value.strip(), whole=True)
    return scheme is not None and scheme not in _REMOTE_SCHEMES


def inline_input_files(
    arguments: Any,
    *,
    uris: bool = False,
    max_bytes: int = DATA_URI_LIMIT,
    field: str = "arguments",
    local_fields: list[str] | None = None,
    uploader: Any = None,
    threshold: int | None = None,
) -> Any:
    """``arguments`` with every file reference replaced by a CDN URL (through ``uploader``, above
    ``threshold`` bytes) or a ``data:`` URI (see the module docstring).

    Containers are copied (tuples become lists); other values are kept. A JSON string is parsed
    first when ``uris`` is set; anything else is left for :func:`validation.coerce_arguments`
    to judge. The fields read from the local disk are appended to ``local_fields`` if given.
    """
    if isinstance(arguments, str):
        if not uris:
            return arguments
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments

    def convert(value: Any, where: str) -> Any:
        if isinstance(value, PurePath) or is_object_storage_path(value) or (uris and is_file_uri(value)):
            if local_fields is not None and read_location(value, where).local is not None:
                local_fields.append(where)
            if uploader is not None:
                return file_to_input(value, uploader=uploader, threshold=threshold, field=where)
            return file_to_data_uri(value, max_bytes=max_bytes, field=where)
        if isinstance(value, Mapping):
            return {key: convert(item, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return value

    return convert(arguments, field)
