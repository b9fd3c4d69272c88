"""Where persisted media go: a local directory or an ``ObjectStoragePath`` directory.

:func:`open_store` turns an ``output_path`` (absolute path, ``file://`` URI, object storage
URI such as ``s3://conn_id@bucket/prefix/``, or a ``Path``/``ObjectStoragePath`` object; read
by :mod:`media.locations`) into a store whose :meth:`write` makes a file appear under its
final name only once complete.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media.locations import read_location, uri_scheme

#: URL schemes of the web: fal's own media URLs, never an output directory.
_WEB_SCHEMES = frozenset({"http", "https", "data"})
#: Object stores whose uploads appear atomically (an object exists only once fully written).
_ATOMIC_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def _check_name(name: str) -> None:
    """Defence in depth: names are built from sanitised parts, so this never fires."""
    if not name or name != PurePosixPath(name).name or name.startswith(".") or "\\" in name:
        raise FalConfigurationError(f"refusing to write {name!r}: not a plain file name inside output_path")


def _write_all(handle: BinaryIO, chunks: Iterable[bytes]) -> int:
    """Write every chunk to ``handle``; the number of bytes written."""
    size = 0
    for chunk in chunks:
        handle.write(chunk)
        size += len(chunk)
    return size


class _Store:
    """A directory that files are written into: ``root`` is a ``Path`` or an ``ObjectStoragePath``."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def location(self, name: str) -> str:
        """Where the file ``name`` is (or will be) stored."""
        return str(self.root / name)

    def _temporary(self, name: str) -> Any:
        """A hidden, unique name beside ``name`` to write to before moving into place."""
        return self.root / f".{name}.{uuid.uuid4().hex[:12]}.part"


class LocalStore(_Store):
    """A local directory; files are written to a hidden temporary name and renamed into place."""

    root: Path

    def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FalConfigurationError(f"output_path {str(self.root)!r} cannot be created: {error}") from None
        if not self.root.is_dir():
            raise FalConfigurationError(f"output_path {str(self.root)!r} exists but is not a directory.")

    def write(self, name: str, chunks: Iterable[bytes]) -> int:
        _check_name(name)
        target = self.root / name
        self._remove_leftovers(name)
        temporary = self._temporary(name)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                size = _write_all(handle, chunks)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return size

    def _remove_leftovers(self, name: str) -> None:
        """Remove the temporary files an earlier write of ``name`` left when its process was killed
        (``kill -9``, OOM) between writing and renaming. Names are deterministic per task, so only
        an earlier try of the same task writes them."""
        for leftover in self.root.glob(f".{glob.escape(name)}.*.part"):
            with contextlib.suppress(OSError):
                leftover.unlink()


class ObjectStore(_Store):
    """An ``ObjectStoragePath`` directory. A file is staged locally, verified, then uploaded.

    Stores whose uploads appear atomically (S3, GCS, Azure ...) get the file under its final
    name directly; any other filesystem gets a temporary name that is then moved into place.
    """

    def prepare(self) -> None:
        if str(self.root.protocol) in _ATOMIC_UPLOAD_PROTOCOLS:
            return  # object stores have no directories; creating one could create a bucket
        try:
            self.root.fs.makedirs(self.root.path, exist_ok=True)
        except Exception as error:
            raise FalConfigurationError(f"output_path {str(self.root)!r} cannot be used: {error}") from None

    def write(self, name: str, chunks: Iterable[bytes]) -> int:
        _check_name(name)
        target = self.root / name
        with tempfile.NamedTemporaryFile(prefix="fal-persist-", suffix=".part") as staged:
            size = _write_all(staged, chunks)
            staged.flush()
            fs = target.fs
            if str(self.root.protocol) in _ATOMIC_UPLOAD_PROTOCOLS:
                fs.put_file(staged.name, target.path)
            else:
                temporary = self._temporary(name)
                fs.put_file(staged.name, temporary.path)
                try:
                    fs.mv(temporary.path, target.path)
                except BaseException:
                    fs.rm(temporary.path)
                    raise
        return size


def open_store(output_path: Any, field: str = "output_path") -> LocalStore | ObjectStore:
    """The storage behind ``output_path`` (a directory), validated; nothing is created yet.

    ``output_path`` is any form :func:`~airflow_provider_fal.media.locations.read_location`
    reads, except web URLs (``http(s)://``, ``data:``), which are not storage.
    """
    if isinstance(output_path, str) and uri_scheme(output_path.strip()) in _WEB_SCHEMES:
        raise FalConfigurationError(
            f"{field} {output_path.strip()!r} is not writable storage; use a local directory or an object storage "
            "URI such as 's3://aws_default@bucket/prefix/'."
        )
    location = read_location(output_path, field, "a directory")
    if location.local is not None:
        return LocalStore(Path(os.path.normpath(location.local)))
    return ObjectStore(location.remote)
