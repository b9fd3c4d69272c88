"""Where files are: one reader of the locations the provider accepts, for inputs and outputs alike.

:func:`read_location` turns any accepted form into a :class:`Location`:

* an absolute local path (``/data/in.png``, ``~/in.png``) or a ``pathlib`` path;
* a ``file://`` (or ``local://``) URI: ``file:///data/in.png``, ``file://localhost/data/in.png``;
* an object storage URI Airflow's ``ObjectStoragePath`` understands, with an optional
  connection id: ``s3://aws_default@bucket/key``, ``gs://bucket/prefix/`` ...;
* an ``ObjectStoragePath`` (or another fsspec path object with ``protocol`` and ``path``);
  one on the local disk without a connection id counts as a local path.

What may be read or written is the callers' business: :mod:`media.inputs` reads only the
strings it is told to, :mod:`media.storage` refuses web URLs as an output directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow_provider_fal.exceptions import FalConfigurationError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WHOLE_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://\S+$")
#: URI schemes (and ``ObjectStoragePath`` protocols) that mean the local disk.
LOCAL_SCHEMES = frozenset({"file", "local"})


@dataclass(frozen=True)
class Location:
    """A file or directory: exactly one of ``local`` and ``remote`` is set.

    ``local`` is an absolute local path (``~`` expanded, otherwise as given); ``remote`` is an
    ``ObjectStoragePath`` (or fsspec path object) on a store other than the local disk.
    """

    local: Path | None = None
    remote: Any = None

    def __str__(self) -> str:
        return str(self.local if self.local is not None else self.remote)


def uri_scheme(text: str, *, whole: bool = False) -> str | None:
    """The lower-cased scheme of a ``scheme://...`` string, or None if it is not one.

    With ``whole``, only a string that is one URI and nothing else (no white space) counts.
    """
    match = (_WHOLE_URI if whole else _SCHEME).match(text)
    return match.group(1).lower() if match else None


def is_object_storage_path(value: Any) -> bool:
    """Whether ``value`` is an Airflow ``ObjectStoragePath``."""
    if isinstance(value, (str, bytes, PurePath)):
        return False
    try:
        from airflow.sdk import ObjectStoragePath
    except ImportError:  # pragma: no cover - Airflow is a dependency
        return False
    return isinstance(value, ObjectStoragePath)


def _is_path_object(value: Any) -> bool:
    """An ``ObjectStoragePath`` or another object with a ``protocol`` (fsspec paths), not a str or pathlib path."""
    return not isinstance(value, (str, bytes, PurePath)) and hasattr(value, "protocol")


def read_location(value: Any, field: str, what: str = "a file") -> Location:
    """``value`` (any form in the module docstring) as a :class:`Location`; nothing is touched on disk.

    :param field: names the argument in error messages (``output_path``, ``arguments.image_url``).
    :param what: what the location must be, for the message about a value of the wrong type.
    :raises FalConfigurationError: for a relative path, a ``file://`` URI naming a host, a URI no
        installed provider handles, or a value that is not a location at all.
    """
    if isinstance(value, PurePath):
        return _local(str(value), field)
    if _is_path_object(value):
        if str(value.protocol or "") in {"", *LOCAL_SCHEMES} and not getattr(value, "conn_id", None):
            return _local(str(value.path), field)
        return Location(remote=value)
    if not isinstance(value, str) or not value.strip():
        raise FalConfigurationError(
            f"{field} must be {what}: an absolute local path, a file:// URI or an object storage URI "
            f"such as 's3://aws_default@bucket/prefix/', got {value!r}."
        )
    text = value.strip()
    scheme = uri_scheme(text)
    if scheme is None:
        return _local(text, field)
    if scheme in LOCAL_SCHEMES:
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise FalConfigurationError(
                f"{field} {text!r} names host {parts.netloc!r}: a file:// URI that names a host is not supported; "
                "use file:///absolute/path."
            )
        return _local(unquote(parts.path), field)
    return Location(remote=_object_storage_path(text, scheme, field))


def _local(text: str, field: str) -> Location:
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        raise FalConfigurationError(
            f"{field} {text!r} is a relative path; workers run in changing directories, so give an absolute "
            "path (e.g. '/data/fal/{{ run_id }}') or a URI."
        )
    return Location(local=path)


def _object_storage_path(text: str, scheme: str, field: str) -> Any:
    from airflow.sdk import ObjectStoragePath

    try:
        path = ObjectStoragePath(text)
        path.fs  # noqa: B018  (resolves the filesystem: fails now if no provider handles the scheme)
    except Exception as error:
        raise FalConfigurationError(
            f"{field} {text!r} cannot be opened with Airflow's ObjectStoragePath ({error}). Install the provider "
            f"that handles '{scheme}://' (e.g. apache-airflow-providers-amazon for s3://, -google for gs://) "
            "and check the connection id in the URI ('s3://conn_id@bucket/key')."
        ) from None
    return path
