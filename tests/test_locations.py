"""locations.py: every accepted form of a location reads into the same :class:`Location`."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media.locations import Location, is_object_storage_path, read_location, uri_scheme


@pytest.fixture
def memory_fs(monkeypatch):
    """Airflow's ObjectStoragePath with fsspec's in-memory filesystem registered as ``memory://``."""
    try:
        from airflow.sdk.io import fs as fs_module  # Airflow >= 3.1
    except ImportError:
        import airflow.io as fs_module  # Airflow 3.0
    from fsspec.implementations.memory import MemoryFileSystem

    filesystems = {**fs_module._register_filesystems(), "memory": lambda conn_id, options=None: MemoryFileSystem()}
    monkeypatch.setattr(fs_module, "_register_filesystems", lambda: filesystems)
    object_storage_path("memory://bucket/probe").fs  # noqa: B018


def object_storage_path(uri: str):
    """``ObjectStoragePath(uri)``, or a skip where this install's ObjectStoragePath cannot build one.

    The unconstrained Airflow 3.0.0 install pulls universal-pathlib 0.3, which refuses every
    non-default protocol ("incompatible with ObjectStoragePath"); Airflow's constraints pin < 0.3.
    """
    from airflow.sdk import ObjectStoragePath

    try:
        return ObjectStoragePath(uri)
    except (TypeError, ValueError) as error:
        pytest.skip(f"this Airflow's ObjectStoragePath cannot be built here: {error}")


@pytest.mark.parametrize(
    "value",
    [
        "/data/fal/in.png",
        "  /data/fal/in.png ",
        "file:///data/fal/in.png",
        "FILE://localhost/data/fal/in.png",
        "local:///data/fal/in.png",
        "file:///data/fal/%69n.png",
        Path("/data/fal/in.png"),
        PurePosixPath("/data/fal/in.png"),
        "objectstorage:/data/fal/in.png",
        "objectstorage:file:///data/fal/in.png",
    ],
)
def test_local_forms_read_as_one_absolute_path(value):
    if isinstance(value, str) and value.startswith("objectstorage:"):
        value = object_storage_path(value.removeprefix("objectstorage:"))
    location = read_location(value, "output_path")
    assert location == Location(local=Path("/data/fal/in.png"))
    assert location.remote is None and str(location) == "/data/fal/in.png"


def test_home_is_expanded():
    assert read_location("~/in.png", "f") == Location(local=Path.home() / "in.png")


def test_object_storage_forms_read_as_one_object_storage_path(memory_fs):
    from airflow.sdk import ObjectStoragePath

    from_uri = read_location("memory://bucket/run/in.png", "f")
    from_object = read_location(object_storage_path("memory://bucket/run/in.png"), "f")
    assert from_uri == from_object and from_uri.local is None
    assert isinstance(from_uri.remote, ObjectStoragePath) and is_object_storage_path(from_uri.remote)
    assert str(from_uri) == "memory://bucket/run/in.png"


def test_connection_id_keeps_an_object_storage_path_remote():
    path = object_storage_path("file://my_conn@/data/in.png")
    assert read_location(path, "f") == Location(remote=path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("relative/in.png", "arguments.image_url 'relative/in.png' is a relative path"),
        (Path("relative.png"), "is a relative path"),
        ("file://server/share/x.png", "names host 'server'"),
        ("nosuchscheme://bucket/x.png", "cannot be opened with Airflow's ObjectStoragePath"),
        ("", "must be a file"),
        ("   ", "must be a file"),
        (None, "must be a file"),
        (42, "must be a file"),
    ],
)
def test_bad_forms_are_refused_naming_the_field(value, message):
    with pytest.raises(FalConfigurationError, match=message.replace("(", r"\(")) as caught:
        read_location(value, "arguments.image_url")
    assert str(caught.value).startswith("arguments.image_url")


def test_the_wrong_kind_of_value_names_what_was_expected():
    with pytest.raises(FalConfigurationError, match="output_path must be a directory"):
        read_location(None, "output_path", "a directory")


def test_uri_scheme():
    assert uri_scheme("S3://conn@bucket/key") == "s3"
    assert uri_scheme("/data/x") is None
    assert uri_scheme("file:///a b.png") == "file"
    assert uri_scheme("file:///a b.png", whole=True) is None
    assert uri_scheme("a photo of file:///x.png", whole=True) is None
    assert uri_scheme("file://", whole=True) is None
