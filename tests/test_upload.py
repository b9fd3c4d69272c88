"""Input files through fal's CDN (media/upload.py, media/inputs.py, FalHook.upload_inputs), over
real HTTP against the emulator: single and multipart uploads, the threshold, the token cache,
dedupe by digest, refused hosts, size limits and errors that name the file and the step."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import requests

from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.hooks.fal import FalHook
from airflow_provider_fal.media import upload as upload_module
from airflow_provider_fal.media.inputs import inline_input_files
from airflow_provider_fal.media.upload import CdnUploader, FalUploadError, StorageToken
from tests.conftest import API_KEY, connection_json, wait_until

FAST = {"max_attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.02}


def blob(size: int, seed: bytes = b"x") -> bytes:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB, not all the same byte
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def hook(emulator, monkeypatch):
    def make(**extra) -> FalHook:
        monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", connection_json(emulator, **extra))
        return FalHook(retry_policy=FAST)

    made: list[FalHook] = []
    yield lambda **extra: made.append(make(**extra)) or made[-1]
    for each in made:
        each.close()


def describe(hook: FalHook, url: str) -> dict:
    return hook.run("emulator/describe-file", {"file_url": url})


def uploads(emulator, path: str = "/files/upload") -> int:
    return sum(1 for r in emulator.requests if r.method == "POST" and r.path == path)


def taken(emulator, path: str = "/files/upload") -> int:
    """Uploads the emulator accepted. A test's abandoned upload (the "shorter" file test sends less
    than its Content-Length and gives up) is answered with an error only when its connection
    closes, which may fall into the next test's request log after the reset."""
    return sum(1 for r in emulator.requests if r.method == "POST" and r.path == path and r.status == 200)


def test_file_above_threshold_reaches_the_model_as_a_cdn_url(emulator, hook, tmp_path):
    big, small = tmp_path / "ref.png", tmp_path / "mask.png"
    data = b"\x89PNG\r\n\x1a\n" + blob(300 * 1024)
    big.write_bytes(data)
    small.write_bytes(b"\x89PNG\r\n\x1a\n" + blob(1000))
    fal = hook()

    arguments = fal.upload_inputs({"image_url": big, "mask_url": small, "prompt": "x"})

    url = arguments["image_url"]
    assert url.startswith(emulator.url + "/files/") and url.endswith("/ref.png")
    assert arguments["mask_url"].startswith("data:image/png;base64,")  # below 256 KiB: inlined
    seen = describe(fal, url)
    assert seen == {
        "source": "url",
        "url": url,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_type": "image/png",
    }
    [token] = [r for r in emulator.requests if r.path == "/storage/auth/token"]
    assert token.query == {"storage_type": "fal-cdn-v3"} and "Authorization" not in token.headers
    [sent] = [r for r in emulator.requests if r.path == "/files/upload"]
    assert sent.headers["X-Fal-File-Name"] == "ref.png" and sent.headers["Content-Type"] == "image/png"
    assert sent.headers["Content-Length"] == str(len(data))  # streamed with a length, not chunked


def test_threshold_is_a_connection_extra(emulator, hook, tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(b"RIFF\0\0\0\0WAVE" + blob(5000))
    assert hook(upload_threshold_kb=1).upload_inputs({"audio_url": path})["audio_url"].startswith("http://")
    assert hook(upload_threshold_kb="never").upload_inputs({"audio_url": path})["audio_url"].startswith("data:")
    assert hook(upload_threshold_kb=0).upload_inputs({"a": path})["a"].startswith("http://")
    with pytest.raises(FalConfigurationError, match="upload_threshold_kb"):
        hook(upload_threshold_kb="lots").upload_inputs({"audio_url": path})


def test_same_content_is_uploaded_once_and_the_token_is_cached(emulator, hook, tmp_path):
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    first.write_bytes(blob(400 * 1024))
    second.write_bytes(blob(400 * 1024))  # same bytes, another name
    other.write_bytes(blob(400 * 1024, b"other"))
    fal = hook()
    inputs = [{"image_url": first, "prompt": str(n)} for n in range(20)] + [{"image_url": second}, {"i": other}]

    urls = [fal.upload_inputs(item) for item in inputs]

    assert len({u["image_url"] for u in urls[:21]}) == 1
    assert taken(emulator) == 2  # the shared reference once, the other file once
    assert emulator.count("POST", "/storage/auth/token") == 1
    assert fal.uploader.tokens_fetched == 1


def test_a_token_close_to_expiry_is_fetched_again(emulator, hook, tmp_path):
    emulator.state.cdn_token_ttl = 30.0  # within the uploader's 60 s margin
    fal = hook()
    for n in range(2):
        path = tmp_path / f"{n}.bin"
        path.write_bytes(blob(300 * 1024, bytes([n])))
        fal.upload_inputs({"f": path})
    assert emulator.count("POST", "/storage/auth/token") == 2


def test_a_revoked_token_is_replaced_and_the_upload_retried(emulator, hook, tmp_path):
    fal = hook()
    path = tmp_path / "a.bin"
    path.write_bytes(blob(300 * 1024))
    fal.uploader.token()
    emulator.state.cdn_tokens.clear()  # fal forgot it
    assert fal.upload_inputs({"f": path})["f"].startswith(emulator.url)
    assert [r.status for r in emulator.requests if r.path == "/files/upload"] == [401, 200]


@pytest.fixture
def small_multipart(monkeypatch):
    monkeypatch.setattr(upload_module, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(upload_module, "PART_SIZE", 256 * 1024)


def test_multipart_retries_a_failed_part_on_its_own(emulator, hook, tmp_path, small_multipart, logs):
    path = tmp_path / "clip.mp4"
    data = blob(1024 * 1024 + 1000)  # five parts, the last of 1,000 bytes
    path.write_bytes(data)
    emulator.fail_upload("part", part=2, times=1, status=503)
    fal = hook()

    url = fal.upload_inputs({"video_url": path})["video_url"]

    assert describe(fal, url)["sha256"] == hashlib.sha256(data).hexdigest()
    puts = [(r.path.rsplit("/", 1)[1], r.status) for r in emulator.requests if r.method == "PUT"]
    assert puts == [("1", 200), ("2", 503), ("2", 200), ("3", 200), ("4", 200), ("5", 200)]
    assert uploads(emulator) == 0 and uploads(emulator, "/files/upload/multipart") == 1
    logged = logs()
    assert "'part 2': HTTP 503" in logged and API_KEY not in logged


def test_a_part_that_keeps_failing_names_the_file_and_the_part_never_the_secrets(
    emulator, hook, tmp_path, small_multipart
):
    path = tmp_path / "clip.mp4"
    path.write_bytes(blob(1024 * 1024 + 1))
    emulator.fail_upload("part", part=3, times=None, status=500)
    fal = hook()

    with pytest.raises(FalUploadError) as caught:
        fal.upload_inputs({"video_url": path})

    message = str(caught.value)
    assert "arguments.video_url" in message and "clip.mp4" in message and "'part 3'" in message
    token = fal.uploader.token().token
    assert API_KEY not in message and token not in message and token not in repr(fal.uploader)
    assert not caught.value.permanent  # a 500: Airflow's own retries may still help
    assert [r.status for r in emulator.requests if r.path.endswith("/3")] == [500, 500, 500]


def test_failed_token_and_complete_steps_are_named(emulator, hook, tmp_path, small_multipart):
    path = tmp_path / "clip.mp4"
    path.write_bytes(blob(1024 * 1024 + 1))
    emulator.fail_upload("complete", times=None, status=400)
    with pytest.raises(FalUploadError, match="'complete'") as caught:
        hook().upload_inputs({"v": path})
    assert caught.value.permanent  # a 400 is not retried
    emulator.reset()
    emulator.fail_upload("token", times=None, status=401)
    with pytest.raises(FalUploadError, match="'token'") as caught:
        hook().upload_inputs({"v": path})
    assert API_KEY not in str(caught.value)


def test_an_upload_host_that_is_not_https_nor_the_connections_is_refused(emulator, tmp_path, small_multipart):
    # the emulator's token names base_url http://127.0.0.1:<port>; this uploader knows it as localhost
    local = emulator.url.replace("127.0.0.1", "localhost")
    uploader = CdnUploader(API_KEY, rest_url=local, cdn_url=local, retry_policy=None)
    path = tmp_path / "clip.mp4"
    path.write_bytes(blob(1024 * 1024 + 1))
    try:
        with pytest.raises(FalUploadError, match="neither https nor one of the fal connection's hosts") as caught:
            uploader.upload(lambda: path.open("rb"), size=path.stat().st_size, name="c", content_type="v", shown="c")
    finally:
        uploader.close()
    assert caught.value.permanent
    assert emulator.count("POST", "/files/upload/multipart") == 0  # the token never went there
    uploader._check_host("https://upload.example.com/x", "c", "create")  # https is accepted


def test_size_limits(emulator, hook, tmp_path):
    path = tmp_path / "big.bin"
    with path.open("wb") as handle:
        handle.truncate(3 * 1024 * 1024)
    with pytest.raises(FalConfigurationError, match=r"above the upload limit of 2 MiB .*max_upload_mb"):
        hook(max_upload_mb=2).upload_inputs({"f": path})
    assert emulator.count("POST", "/storage/auth/token") == 0  # refused before anything is sent
    path.write_bytes(b"\0" * 11_000_000)
    with pytest.raises(FalConfigurationError, match="about 10 MB"):  # below the threshold: inlined, limit kept
        hook(upload_threshold_kb=20_000).upload_inputs({"f": path})


def test_uploads_go_to_the_configured_hosts_and_no_secret_is_in_repr(emulator, hook):
    fal = hook()
    uploader = fal.uploader
    assert (uploader.rest_url, uploader.cdn_url) == (emulator.url, emulator.url)
    assert API_KEY not in repr(uploader)
    assert "secret" not in repr(StorageToken("secret", "Bearer", "https://x", 0.0))
    assert inline_input_files({"p": "file:///etc/hostname"}) == {"p": "file:///etc/hostname"}  # uris not asked
    defaults = json.loads(connection_json(emulator))["extra"]
    assert defaults["rest_url"] == emulator.url


def test_object_storage_path_is_streamed_to_the_cdn(emulator, hook, tmp_path):
    from airflow.sdk import ObjectStoragePath

    path = tmp_path / "remote.png"
    data = b"\x89PNG\r\n\x1a\n" + blob(500 * 1024)
    path.write_bytes(data)
    try:
        remote = ObjectStoragePath(f"file://{path}")
    except (TypeError, ValueError) as error:  # Airflow 3.0's ObjectStoragePath with newer universal-pathlib
        pytest.skip(f"this Airflow's ObjectStoragePath cannot open file:// paths: {error}")
    fal = hook()
    url = fal.upload_inputs({"image_url": remote})["image_url"]
    assert describe(fal, url)["sha256"] == hashlib.sha256(data).hexdigest()


CHILD = """
import json, os, sys
from pathlib import Path
from airflow_provider_fal.media.upload import CdnUploader

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

url, path, key = sys.argv[1:4]
uploader = CdnUploader(key, rest_url=url, cdn_url=url)
uploader.token()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
base = rss("VmRSS")
result = uploader.upload(lambda: open(path, "rb"), size=os.path.getsize(path), name="clip.mp4",
                         content_type="video/mp4", shown=path)
print(json.dumps({"url": result, "growth": rss("VmHWM") - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_a_150_mb_multipart_upload_keeps_memory_bounded(emulator, tmp_path):
    path = tmp_path / "clip.mp4"
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(150):
            block = os.urandom(1_000_000)
            digest.update(block)
            handle.write(block)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, emulator.url, str(path), API_KEY], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["growth"] < 50_000_000, report  # measured: about 21 MB (one 10 MiB part in flight)
    parts = [r for r in emulator.requests if r.method == "PUT"]
    assert len(parts) == 15  # 150 MB in 10 MiB parts
    served = hashlib.sha256(requests.get(report["url"], timeout=60).content).hexdigest()
    assert served == digest.hexdigest()


def test_a_retry_with_new_upload_urls_keeps_the_request_fingerprints(emulator, hook, tmp_path):
    """Durable progress and reattaching match requests by fingerprint: a second try uploads the
    file again (a new URL), and must still recognise the requests the first try sent."""
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.media.upload import identity_of

    ref = tmp_path / "ref.png"
    ref.write_bytes(blob(300 * 1024))
    tries = []
    for _ in range(2):
        fal = hook()  # each try has its own hook, uploader and token

        def convert(item, where, fal=fal):
            sent = fal.upload_inputs(item, field=where)
            return sent, identity_of(sent, fal.uploader)

        shared = fal.prepare("emulator/describe-file")
        tries.append(prepare_inputs(shared, [{"image_url": ref, "n": n} for n in range(3)], convert=convert))
    first, second = tries
    assert first[0].arguments["image_url"] != second[0].arguments["image_url"]  # two uploads, two URLs
    assert [r.fingerprint() for r in first] == [r.fingerprint() for r in second]
    assert len({r.fingerprint() for r in first}) == 3
    plain = fal.prepare("emulator/echo", {"prompt": "x"})
    assert plain.identity is None  # nothing uploaded: the body is the identity


def test_a_file_name_http_cannot_carry_is_sent_plain(emulator, hook, tmp_path):
    path = tmp_path / "café\nnuit.png"
    path.write_bytes(blob(300 * 1024))
    url = hook().upload_inputs({"image_url": path})["image_url"]
    assert url.endswith("/caf__nuit.png")


@pytest.mark.parametrize("second", [blob(1000, b"other"), blob(600)], ids=["changed", "shorter"])
def test_a_file_that_changes_between_digest_and_upload_fails(emulator, second):
    import io

    opened = iter([blob(1000), second])
    uploader = CdnUploader(API_KEY, rest_url=emulator.url, cdn_url=emulator.url, retry_policy=None)
    try:
        with pytest.raises(FalUploadError, match="'upload'") as caught:
            uploader.upload(lambda: io.BytesIO(next(opened)), size=1000, name="a", content_type="x/y", shown="a")
    finally:
        uploader.close()
    assert "changed" in str(caught.value) or "shorter" in str(caught.value)
    assert not caught.value.retryable
    # Never retried. The one attempt is answered when its body ends (at once, or when the
    # abandoned connection closes): wait for it, so it is not counted by the next test.
    assert wait_until(lambda: uploads(emulator) == 1, timeout=10)
    assert uploads(emulator) == 1


def test_a_30_mb_image_reaches_the_model_through_one_streamed_upload(emulator, hook, tmp_path):
    path = tmp_path / "photo.jpg"
    data = b"\xff\xd8\xff" + blob(30_000_000)
    path.write_bytes(data)
    fal = hook()
    arguments = fal.upload_inputs({"image_url": path, "prompt": "x"})
    seen = describe(fal, arguments["image_url"])
    assert (seen["size"], seen["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert seen["content_type"] == "image/jpeg"
    # One upload took the file (the log said so: one attempt, 0.2 s), none multipart.
    assert taken(emulator) == 1 and uploads(emulator, "/files/upload/multipart") == 0
