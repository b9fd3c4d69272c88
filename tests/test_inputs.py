"""inputs.py: local files and ObjectStoragePaths in model arguments become ``data:`` URIs."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media.download import decode_data_url
from airflow_provider_fal.media.inputs import (
    DATA_URI_LIMIT,
    data_uri_length,
    inline_input_files,
    is_file_uri,
    sniff_content_type,
)
from tests.conftest import API_KEY

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def decoded(uri: str) -> tuple[str, bytes]:
    assert uri.startswith("data:") and ";base64," in uri
    return decode_data_url(uri)


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "input image.png"
    path.write_bytes(PNG)
    return path


def test_path_objects_become_data_uris_at_any_depth(png, tmp_path):
    wav = tmp_path / "voice"
    wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    arguments = {
        "prompt": "make it blue",
        "image_url": png,
        "extra": {"references": [png, "https://example.com/ref.png"], "audio": wav},
        "strength": 0.5,
    }
    inlined = inline_input_files(arguments)
    assert decoded(inlined["image_url"]) == ("image/png", PNG)
    assert decoded(inlined["extra"]["references"][0]) == ("image/png", PNG)
    assert inlined["extra"]["references"][1] == "https://example.com/ref.png"
    assert decoded(inlined["extra"]["audio"])[0] == "audio/wav"  # no extension: sniffed from the bytes
    assert inlined["prompt"] == "make it blue" and inlined["strength"] == 0.5
    assert arguments["image_url"] == png  # the caller's arguments are not modified


def test_object_storage_path_becomes_a_data_uri(png):
    from airflow.sdk import ObjectStoragePath

    inlined = inline_input_files({"image_url": ObjectStoragePath(str(png))})
    assert decoded(inlined["image_url"]) == ("image/png", PNG)


def test_file_uri_strings_are_only_read_when_asked(png):
    uri = png.as_uri()  # file:///.../input%20image.png
    arguments = {"image_url": uri, "mask_url": "data:image/png;base64,AAAA", "prompt": "file:// is fun"}
    assert inline_input_files(arguments) == arguments
    inlined = inline_input_files(arguments, uris=True)
    assert decoded(inlined["image_url"]) == ("image/png", PNG)
    assert inlined["mask_url"] == arguments["mask_url"] and inlined["prompt"] == "file:// is fun"
    as_json = inline_input_files(f'{{"image_url": "{uri}"}}', uris=True)
    assert decoded(as_json["image_url"]) == ("image/png", PNG)


def test_is_file_uri():
    assert is_file_uri("file:///tmp/x.png")
    assert is_file_uri("s3://aws_default@bucket/x.png")
    assert not is_file_uri("https://v3.fal.media/x.png")
    assert not is_file_uri("data:image/png;base64,AA")
    assert not is_file_uri("a photo of file:///tmp/x.png")
    assert not is_file_uri(Path("/tmp/x"))


def test_too_large_file_fails_before_reading_with_the_field_and_the_fix(tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 8 MB of nothing, 10.7 MB as base64
        handle.truncate(8_000_000)
    with pytest.raises(FalConfigurationError) as caught:
        inline_input_files({"images": [{"image_url": big}]})
    message = str(caught.value)
    assert "arguments.images[0].image_url" in message
    assert "8.0 MB" in message and "about 10 MB" in message and "URL" in message
    just_fits = tmp_path / "fits.png"
    just_fits.write_bytes(b"\0" * 7_000_000)
    assert data_uri_length(7_000_000, "image/png") <= DATA_URI_LIMIT
    assert len(inline_input_files({"image_url": just_fits})["image_url"]) == data_uri_length(7_000_000, "image/png")
    with pytest.raises(FalConfigurationError, match=r"above fal's limit of about 0\.001 MB"):
        inline_input_files({"image_url": just_fits}, max_bytes=1000)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("file:///definitely/not/here.png", "arguments.image_url: the file '/definitely/not/here.png' does not exist"),
        ("file://server/share/x.png", "names a host"),
        ("nosuchscheme://bucket/x.png", "cannot be opened with Airflow's ObjectStoragePath"),
    ],
)
def test_unreadable_references_name_the_field(value, message):
    with pytest.raises(FalConfigurationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        inline_input_files({"image_url": value}, uris=True)


def test_directory_and_relative_paths_are_refused(tmp_path):
    with pytest.raises(FalConfigurationError, match="not a regular file"):
        inline_input_files({"image_url": tmp_path})
    with pytest.raises(FalConfigurationError, match="relative path"):
        inline_input_files({"image_url": Path("relative.png")})


def test_sniffing():
    assert sniff_content_type("x.jpg", b"") == "image/jpeg"
    assert sniff_content_type("x", b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_content_type("x", b"\x00\x00\x00\x18ftypisom") == "video/mp4"
    assert sniff_content_type("x", b"?") == "application/octet-stream"


def test_inlined_arguments_reach_fal_as_data_uris(emulator, png):
    """The emulator's echo model returns its input: what fal would have received."""
    client = FalClient(API_KEY, run_url=emulator.url, queue_url=emulator.queue_url)
    try:
        echoed = client.run("emulator/echo", inline_input_files({"image_url": png, "prompt": "x"})).output
    finally:
        client.close()
    assert decoded(echoed["image_url"]) == ("image/png", PNG)
    sent = next(r for r in emulator.requests if r.method == "POST").json
    assert sent["image_url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert os.fspath(png) not in str(sent)
