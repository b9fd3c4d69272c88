"""download.py and storage.py against the emulator over real HTTP: finding fal file objects,
streaming them into storage, verification, retries, safe deterministic names, and object
storage through Airflow's ``ObjectStoragePath``."""

from __future__ import annotations

import base64
import hashlib
import http.server
import logging
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
import requests

from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.exceptions import FalConfigurationError
from airflow_provider_fal.media import download
from airflow_provider_fal.media.download import FalDownloadError
from airflow_provider_fal.media.files import (
    STORED_PATH_KEY,
    MediaRef,
    extension_for,
    file_names,
    file_prefix,
    find_media,
)
from airflow_provider_fal.media.hosts import DownloadHosts
from airflow_provider_fal.media.storage import open_store
from tests.conftest import API_KEY

FAST = {"max_attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.02}
#: The emulator and the test servers here listen on 127.0.0.1 (any port), over plain http.
LOCAL_HOSTS = DownloadHosts.for_connection((), ("http://127.0.0.1",))


def persist_media(result, output_path, **options):
    """The one-shot downloader, allowed to reach this machine's test servers."""
    return download.persist_media(result, output_path, download_hosts=LOCAL_HOSTS, **options)


def MediaPersister(output_path, **options):
    return download.MediaPersister(output_path, download_hosts=LOCAL_HOSTS, **options)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_model(emulator, model_id: str, arguments: dict) -> dict:
    client = FalClient(API_KEY, run_url=emulator.url, queue_url=emulator.queue_url)
    try:
        return client.run(model_id, arguments).output
    finally:
        client.close()


def sha256_of_url(url: str) -> str:
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=30) as response:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_gets(emulator, at_least: int = 0) -> int:
    """File downloads the emulator answered. It records a request only after the last byte went
    out, which can be a moment after the client returned, so wait for ``at_least`` of them."""
    deadline = time.monotonic() + 10
    while emulator.count("GET", "/files/") < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return emulator.count("GET", "/files/")


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- finding and naming


def test_find_media_sees_fal_file_objects_at_any_depth_and_nothing_else():
    result = {
        "images": [{"url": "https://v3.fal.media/a.png", "content_type": "image/png"}, {"url": "https://x/b.jpg"}],
        "video": {"url": "https://v3.fal.media/v.mp4", "content_type": "video/mp4", "file_size": 1234},
        "nested": {"tracks": [{"audio_url": {"url": "data:audio/wav;base64,UklGRg=="}}]},
        "prompt": "https://not-a-file-object.example/x.png",
        "links": [{"url": "ftp://example/x"}, {"url": 42}, {"href": "https://x/y.png"}],
        "seed": 1,
    }
    refs = find_media(result)
    assert [ref.position for ref in refs] == [
        ("images", 0),
        ("images", 1),
        ("video",),
        ("nested", "tracks", 0, "audio_url"),
    ]
    assert refs[2].content_type == "video/mp4" and refs[2].file_size == 1234
    assert refs[1].content_type is None
    assert find_media({"url": "https://x/y.png"})[0].position == ()
    assert find_media([1, "a", None]) == []


def test_names_are_deterministic_distinct_and_cannot_escape():
    assert file_prefix("generate") == "generate"
    assert file_prefix("grp.generate", map_index=3) == "grp.generate__m3"
    assert file_prefix("gen", map_index=-1, input_index=12) == "gen__i12"
    assert file_prefix("../../etc/passwd") == "etc_passwd"
    refs = [
        MediaRef(("../../../etc", 0), "https://h/a.png"),
        MediaRef(("a/b",), "https://h/b.png"),
        MediaRef(("a_b",), "https://h/c.png"),  # sanitises to the same text as "a/b"
        MediaRef((".hidden",), "https://h/d.png"),
        MediaRef(("x" * 500,), "https://h/e.png"),
        MediaRef((), "https://h/f.png"),
    ]
    names = file_names(refs, "t")
    assert names == file_names(refs, "t")  # deterministic
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 180
    assert names[0] == "t__etc-0" and names[1] == "t__a_b" and names[3] == "t__hidden" and names[5] == "t__output"


def test_extension_prefers_promised_type_then_name_then_served_type():
    assert extension_for(MediaRef((), "https://h/x", content_type="image/jpeg")) == "jpg"
    assert extension_for(MediaRef((), "https://h/x", content_type="image/jpg")) == "jpg"
    assert extension_for(MediaRef((), "https://h/clip.MOV?sig=1")) == "mov"
    assert extension_for(MediaRef((), "https://h/x", file_name="a.wav")) == "wav"
    assert extension_for(MediaRef((), "https://h/x"), "audio/mpeg; charset=binary") == "mp3"
    assert extension_for(MediaRef((), "https://h/x.../../../evil")) == "bin"
    assert extension_for(MediaRef((), "https://h/x")) == "bin"


# --------------------------------------------------------------------------- storing


def test_images_are_stored_byte_for_byte_with_stored_path_beside_url(emulator, tmp_path):
    arguments = {"prompt": "a lighthouse", "num_images": 2, "image_size": "square"}
    result = run_model(emulator, "fal-ai/fast-sdxl", arguments)
    persisted = persist_media(result, tmp_path / "out", prefix="generate")

    images = persisted.output["images"]
    assert [Path(image[STORED_PATH_KEY]).name for image in images] == [
        "generate__images-0.png",
        "generate__images-1.png",
    ]
    for original, stored in zip(result["images"], images, strict=True):
        assert stored["url"] == original["url"]  # the original URL is kept
        assert {k: v for k, v in stored.items() if k != STORED_PATH_KEY} == original
        data = Path(stored[STORED_PATH_KEY]).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert hashlib.sha256(data).hexdigest() == sha256_of_url(original["url"])
    assert STORED_PATH_KEY not in result["images"][0]  # the input result is not modified
    assert persisted.output["seed"] == result["seed"] and persisted.output["prompt"] == result["prompt"]
    assert persisted.locations == [image[STORED_PATH_KEY] for image in images]
    assert listing(tmp_path / "out") == ["generate__images-0.png", "generate__images-1.png"]


def test_large_file_streams_and_matches(emulator, tmp_path):
    size = 24 * 1024 * 1024 + 17
    result = run_model(emulator, "emulator/file", {"size_bytes": size, "content_type": "video/mp4", "key": "video"})
    with MediaPersister(tmp_path, chunk_size=256 * 1024) as persister:
        persisted = persister.persist(result, "render__m2")
    stored = Path(persisted.output["video"][STORED_PATH_KEY])
    assert stored.name == "render__m2__video.mp4"
    assert stored.stat().st_size == size == persisted.files[0].size
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert digest == sha256_of_url(result["video"]["url"])


def test_slow_file_arrives_complete(emulator, tmp_path):
    result = run_model(emulator, "emulator/file", {"size_bytes": 300_000, "content_type": "audio/mpeg", "key": "audio"})
    emulator.set_file_fault("slow", bytes_per_second=2_000_000)
    persisted = persist_media(result, tmp_path, prefix="speak")
    assert Path(persisted.output["audio"][STORED_PATH_KEY]).stat().st_size == 300_000
    assert file_gets(emulator, 1) == 1


def test_truncated_download_is_retried_then_fails_without_a_partial_file(emulator, tmp_path):
    result = run_model(emulator, "emulator/file", {"size_bytes": 2_000_000, "key": "video"})
    previous = tmp_path / "gen__video.mp4"
    previous.write_bytes(b"from an earlier try")
    emulator.set_file_fault("truncate")
    with pytest.raises(FalDownloadError) as caught:
        persist_media(result, tmp_path, prefix="gen", retry_policy=FAST)
    assert caught.value.retryable  # an Airflow task retry may still succeed
    assert "1000000" in str(caught.value) or "broke off" in str(caught.value)
    assert file_gets(emulator, FAST["max_attempts"]) == FAST["max_attempts"]
    assert listing(tmp_path) == ["gen__video.mp4"]  # no .part left behind
    assert previous.read_bytes() == b"from an earlier try"  # never replaced by half a file


def test_truncation_once_is_healed_by_a_retry(emulator, tmp_path):
    result = run_model(emulator, "emulator/file", {"size_bytes": 1_500_000, "key": "video"})
    emulator.set_file_fault("truncate")

    class HealOnRetry(logging.Handler):
        """The persister logs a warning before it sleeps and retries: clear the fault right then."""

        def emit(self, record: logging.LogRecord) -> None:
            emulator.set_file_fault(None)

    logger = logging.getLogger("test_persist.heal")
    logger.addHandler(HealOnRetry(level=logging.WARNING))
    with MediaPersister(tmp_path, retry_policy=FAST, logger=logger) as persister:
        persisted = persister.persist(result, "gen")
    assert file_gets(emulator, 2) == 2
    assert Path(persisted.output["video"][STORED_PATH_KEY]).stat().st_size == 1_500_000
    assert listing(tmp_path) == ["gen__video.mp4"]


def test_content_type_mismatch_is_refused_without_retry(emulator, tmp_path):
    url = emulator.add_file(b"<html>login required</html>", content_type="text/html")
    result = {"images": [{"url": url, "content_type": "image/png"}]}
    with pytest.raises(FalDownloadError, match=r"promised as image/png but is served as text/html") as caught:
        persist_media(result, tmp_path, prefix="gen", retry_policy=FAST)
    assert not caught.value.retryable
    assert file_gets(emulator, 1) == 1
    assert listing(tmp_path) == []


def test_generic_served_type_is_accepted_and_promised_size_is_checked(emulator, tmp_path):
    url = emulator.add_file(b"x" * 1000, content_type="application/octet-stream")
    promised = {"file": {"url": url, "content_type": "model/gltf-binary", "file_size": 1000}}
    ok = persist_media(promised, tmp_path, prefix="m")
    assert Path(ok.output["file"][STORED_PATH_KEY]).name == "m__file.glb"
    with pytest.raises(FalDownloadError, match=r"1000 bytes, but the result promised file_size 999"):
        persist_media({"file": {"url": url, "file_size": 999}}, tmp_path / "other", prefix="m", retry_policy=FAST)
    assert not (tmp_path / "other").exists() or listing(tmp_path / "other") == []


def test_expired_file_fails_with_an_explanation_and_no_retry(emulator, tmp_path):
    url = emulator.add_file(b"gone soon", content_type="image/png")
    emulator.reset()  # the file is forgotten: what an expired fal URL looks like
    with pytest.raises(FalDownloadError, match=r"is gone \(HTTP 404\): fal media URLs expire") as caught:
        persist_media({"image": {"url": url}}, tmp_path, prefix="gen", retry_policy=FAST)
    assert not caught.value.retryable and caught.value.status_code == 404
    assert file_gets(emulator, 1) == 1


def test_retried_task_overwrites_its_own_files(emulator, tmp_path):
    first = run_model(emulator, "fal-ai/fast-sdxl", {"prompt": "one", "num_images": 2, "image_size": "square"})
    second = run_model(emulator, "fal-ai/fast-sdxl", {"prompt": "two", "num_images": 2, "image_size": "square"})
    persist_media(first, tmp_path, prefix="gen")
    again = persist_media(second, tmp_path, prefix="gen")
    assert listing(tmp_path) == ["gen__images-0.png", "gen__images-1.png"]
    data = Path(again.output["images"][1][STORED_PATH_KEY]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256_of_url(second["images"][1]["url"])


def test_model_output_cannot_write_outside_output_path(emulator, tmp_path):
    url = emulator.add_file(PNG_MAGIC + b"data", content_type="image/png", name="evil.png")
    out = tmp_path / "out"
    hostile = {
        "../../escape": {"url": url, "content_type": "image/png", "file_name": "../../../../tmp/evil.png"},
        "/abs": [{"url": url + "?x=/../../y", "content_type": "image/png"}],
    }
    before = listing(tmp_path)
    persisted = persist_media(hostile, out, prefix="../t")
    assert listing(tmp_path) == sorted([*before, "out", *(f"out/{p.name}" for p in out.iterdir())])
    for stored in persisted.files:
        assert Path(stored.location).parent == out
    assert sorted(p.name for p in out.iterdir()) == ["t__abs-0.png", "t__escape.png"]


def test_data_url_outputs_are_decoded_and_stored(tmp_path):
    payload = PNG_MAGIC + b"tiny"
    result = {"image": {"url": "data:image/png;base64," + base64.b64encode(payload).decode()}}
    persisted = persist_media(result, f"file://{tmp_path}/d", prefix="sync")
    assert Path(persisted.output["image"][STORED_PATH_KEY]).read_bytes() == payload
    assert persisted.output["image"]["url"] == result["image"]["url"]


def test_result_without_media_is_returned_as_is(tmp_path):
    result = {"output": "just text", "partial": False}
    persisted = persist_media(result, tmp_path / "never-created", prefix="llm")
    assert persisted.output is result and persisted.files == []
    assert not (tmp_path / "never-created").exists()


class _HeaderRecorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = PNG_MAGIC + b"cdn"
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        return


def test_downloads_never_carry_credentials(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeaderRecorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/media/x.png"
        persist_media({"image": {"url": url}}, tmp_path, prefix="gen")
    finally:
        server.shutdown()
        server.server_close()
    assert len(_HeaderRecorder.seen) == 1
    assert "authorization" not in _HeaderRecorder.seen[0]
    assert all(API_KEY not in value for value in _HeaderRecorder.seen[0].values())


# --------------------------------------------------------------------------- output_path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("relative/dir", "relative path"),
        ("", "must be a directory"),
        (None, "must be a directory"),
        ("https://example.com/out", "not writable storage"),
        ("file://otherhost/x", "names host"),
        ("nosuchscheme://bucket/prefix", "Install the provider"),
    ],
)
def test_bad_output_path_is_refused_naming_the_field(value, message):
    with pytest.raises(FalConfigurationError, match=message) as caught:
        open_store(value)
    assert "output_path" in str(caught.value)


def test_output_path_that_is_a_file_is_refused_before_downloading(emulator, tmp_path):
    url = emulator.add_file(b"abc", content_type="text/plain")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(FalConfigurationError, match="output_path"):
        persist_media({"doc": {"url": url}}, blocker, prefix="gen")
    assert file_gets(emulator) == 0


# --------------------------------------------------------------------------- object storage


@pytest.fixture(params=["memory", "memtest"])
def object_store(request, monkeypatch):
    """An ``ObjectStoragePath`` root on an in-memory filesystem registered with Airflow.

    ``memory`` is treated as an object store (atomic uploads); ``memtest`` as a plain
    filesystem (upload to a temporary name, then move).
    """
    try:
        from airflow.sdk.io import fs as fs_module  # Airflow >= 3.1
    except ImportError:
        import airflow.io as fs_module  # Airflow 3.0
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class MemTest(MemoryFileSystem):
        protocol = ("memtest",)
        store: dict = {}
        pseudo_dirs = [""]

    fsspec.register_implementation("memtest", MemTest, clobber=True)
    filesystems = {
        **fs_module._register_filesystems(),
        "memory": lambda conn_id, options=None: MemoryFileSystem(),
        "memtest": lambda conn_id, options=None: MemTest(),
    }
    monkeypatch.setattr(fs_module, "_register_filesystems", lambda: filesystems)
    from airflow.sdk import ObjectStoragePath

    try:
        root = ObjectStoragePath(f"{request.param}://bucket/run-1/")
        root.fs  # noqa: B018
    except (TypeError, ValueError) as error:
        pytest.skip(f"this Airflow's ObjectStoragePath cannot use in-memory filesystems here: {error}")
    yield root
    MemoryFileSystem.store.clear()
    MemTest.store.clear()


def store_names(root) -> list[str]:
    """Names of every file under ``root``, hidden ones included."""
    return sorted(PurePosixPath(path).name for path in root.fs.find(root.path))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_media_is_uploaded_to_object_storage(emulator, object_store):
    result = run_model(emulator, "fal-ai/fast-sdxl", {"prompt": "harbor", "num_images": 2, "image_size": "square"})
    persisted = persist_media(result, str(object_store), prefix="gen")
    stored = [image[STORED_PATH_KEY] for image in persisted.output["images"]]
    assert stored == [str(object_store / "gen__images-0.png"), str(object_store / "gen__images-1.png")]
    for image, location in zip(result["images"], stored, strict=True):
        data = (object_store / Path(location).name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256_of_url(image["url"])
    assert store_names(object_store) == ["gen__images-0.png", "gen__images-1.png"]  # no temporary files left


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_download_never_reaches_object_storage(emulator, object_store):
    result = run_model(emulator, "emulator/file", {"size_bytes": 1_000_000, "key": "video"})
    emulator.set_file_fault("truncate")
    with pytest.raises(FalDownloadError):
        persist_media(result, object_store, prefix="gen", retry_policy=FAST)
    assert store_names(object_store) == []
