"""The provider against a hostile fal or network path (tests/hostile_fal.py), not the emulator.

Garbled answers to polls, trickled and endless bodies, redirects and result URLs that point
at other hosts: each ends in a result or a named error, within a bounded time and size, and
nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from airflow_provider_fal.core.async_client import AsyncQueueClient, shared_http
from airflow_provider_fal.core.bounded import FalResponseTooLargeError
from airflow_provider_fal.core.client import FalClient
from airflow_provider_fal.core.queue import QueueHandle
from airflow_provider_fal.core.retry import RetryPolicy
from airflow_provider_fal.exceptions import FalAuthError, FalError, FalRequestLostError
from airflow_provider_fal.hooks.fal import FalHook
from airflow_provider_fal.media.download import FalDownloadError, persist_media
from airflow_provider_fal.media.hosts import DownloadHosts, FalDownloadRefusedError
from tests.conftest import API_KEY
from tests.hostile_fal import Answer, HostileFal

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_total_wait=5, max_retry_after=0.05)
MODEL = "fal-ai/flux"
REQUEST_ID = "0f6c2b1e-8d4e-4c1a-9b7e-2f5a6c7d8e9f"
BASE = f"/{MODEL}/requests/{REQUEST_ID}"
COMPLETED = Answer(body=json.dumps({"status": "COMPLETED", "request_id": REQUEST_ID}).encode())
RESULT = Answer(body=json.dumps({"images": []}).encode(), headers={"x-fal-request-id": REQUEST_ID})
LOCAL = DownloadHosts.for_connection((), ("http://127.0.0.1",))
GARBLED_POLLS = (
    Answer(body=b"<html><body>502 Bad Gateway</body></html>", headers={"Content-Type": "text/html"}),
    Answer(body=b"{not json"),
    Answer(body=b"{}"),
)


@pytest.fixture
def hostile():
    with HostileFal() as server:
        yield server


def handle_on(hostile: HostileFal) -> QueueHandle:
    return QueueHandle.rebuild(hostile.base_url, MODEL, REQUEST_ID)


# --------------------------------------------------------------------------- garbled polls


def test_garbled_answers_to_status_polls_are_polled_again_by_the_worker_wait(hostile):
    hostile.answer("GET", f"{BASE}/status", *GARBLED_POLLS, COMPLETED)
    hostile.answer("GET", BASE, RESULT)
    client = FalClient(API_KEY, run_url=hostile.base_url, queue_url=hostile.base_url, retry_policy=FAST)
    response = client.wait(handle_on(hostile), poll_interval=0.01, timeout=30)
    assert response.output == {"images": []}
    assert len(hostile.hits("GET", f"{BASE}/status")) == 4
    assert hostile.hits("PUT", f"{BASE}/cancel") == []


def test_garbled_answers_to_status_polls_are_polled_again_by_the_trigger_client(hostile):
    from airflow_provider_fal.core.watch import FetchResult, PollAfter, RequestWatch

    hostile.answer("GET", f"{BASE}/status", *GARBLED_POLLS, COMPLETED)
    hostile.answer("GET", BASE, RESULT)

    async def poll_until_done() -> object:
        handle = handle_on(hostile)
        watch = RequestWatch(handle, poll_interval=0.01)
        async with shared_http(API_KEY) as http:
            client = AsyncQueueClient(http, API_KEY, queue_url=hostile.base_url, retry_policy=FAST)
            while True:
                try:
                    step = watch.after_status(await client.status(handle))
                except Exception as error:  # what the trigger does with a failed poll
                    step = watch.after_poll_error(error)
                if isinstance(step, FetchResult):
                    return (await client.fetch(handle, step)).output
                assert isinstance(step, PollAfter), step
                await asyncio.sleep(step.seconds)

    assert asyncio.run(poll_until_done()) == {"images": []}


def test_a_wait_that_ends_on_a_permanent_poll_error_cancels_the_request(hostile):
    hostile.answer("GET", f"{BASE}/status", Answer(status=401, body=b'{"detail": "Unauthorized"}'))
    hostile.answer("PUT", f"{BASE}/cancel", Answer(status=202, body=b'{"status": "CANCELLATION_REQUESTED"}'))
    client = FalClient(API_KEY, run_url=hostile.base_url, queue_url=hostile.base_url, retry_policy=FAST)
    with pytest.raises(FalAuthError) as raised:
        client.wait(handle_on(hostile), poll_interval=0.01, timeout=30)
    assert len(hostile.hits("PUT", f"{BASE}/cancel")) == 1
    assert "asked to cancel" in str(raised.value) and "CANCELLATION_REQUESTED" in str(raised.value)


# --------------------------------------------------------------------------- sync answers


def sync_client(hostile: HostileFal, **options) -> FalClient:
    return FalClient(API_KEY, run_url=hostile.base_url, queue_url=hostile.base_url, retry_policy=FAST, **options)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirected_model_run_is_not_followed_and_the_input_goes_nowhere_else(hostile, status):
    with HostileFal() as elsewhere:
        elsewhere.answer("POST", "/fal-ai/flux", RESULT)
        elsewhere.answer("GET", "/fal-ai/flux", RESULT)
        redirect = Answer(status=status, headers={"Location": elsewhere.url("/fal-ai/flux")})
        hostile.answer("POST", "/fal-ai/flux", redirect)
        with pytest.raises(FalError) as raised:
            sync_client(hostile).run("fal-ai/flux", {"prompt": "a private prompt"})
        assert elsewhere.hits("POST", "/fal-ai/flux") == elsewhere.hits("GET", "/fal-ai/flux") == []
    assert raised.value.permanent and f"redirect (HTTP {status})" in str(raised.value)
    assert len(hostile.hits("POST", "/fal-ai/flux")) == 1


def test_a_trickled_answer_ends_within_the_calls_time_limit(hostile):
    hostile.answer("POST", "/fal-ai/flux", Answer(body=b'{"images": []}' + b" " * 200, trickle=0.1))
    started = time.monotonic()
    with pytest.raises(FalRequestLostError) as raised:
        sync_client(hostile, timeout=1, connect_timeout=1).run("fal-ai/flux", {"prompt": "p"})
    assert time.monotonic() - started < 10, "a 21 s trickle must end near the 2 s limit"
    assert "within the call's time limit of 2 s" in str(raised.value)
    assert len(hostile.hits("POST", "/fal-ai/flux")) == 1, "a model run whose answer was lost is never resent"


def test_an_endless_answer_stops_at_the_cap_naming_the_setting(hostile):
    hostile.answer("POST", "/fal-ai/flux", Answer(body=b'{"images": "', endless=True))
    with pytest.raises(FalResponseTooLargeError) as raised:
        sync_client(hostile, max_answer_bytes=1024 * 1024).run("fal-ai/flux", {"prompt": "p"})
    assert "1 MiB" in str(raised.value) and "max_answer_mb" in str(raised.value)
    assert len(hostile.hits("POST", "/fal-ai/flux")) == 1


def test_an_announced_huge_answer_is_refused_before_reading_it(hostile):
    hostile.answer("POST", "/fal-ai/flux", Answer(body=b"{}", length=10 * 1024**3))
    with pytest.raises(FalResponseTooLargeError, match="announced as 10 GiB"):
        sync_client(hostile).run("fal-ai/flux", {"prompt": "p"})


@pytest.mark.parametrize(
    "refused",
    [
        Answer(body=b"{}", length=10 * 1024**3),
        Answer(status=307, body=b"<html>moved</html>" * 50, headers={"Location": "http://elsewhere.invalid/"}),
    ],
    ids=["announced-huge", "redirect-with-a-body"],
)
def test_a_connection_left_with_unread_bytes_is_not_used_again(hostile, refused):
    """The next call on the same client gets its own answer, not the unread rest of a refused one."""
    hostile.answer("POST", "/fal-ai/flux", refused)
    hostile.answer("POST", "/fal-ai/ok", RESULT)
    client = sync_client(hostile, timeout=3, connect_timeout=1)
    for _ in range(2):
        with pytest.raises(FalError):
            client.run("fal-ai/flux", {"prompt": "p"})
        response = client.run("fal-ai/ok", {"prompt": "p"})
        assert response.output == {"images": []} and response.request_id == REQUEST_ID


def test_the_trigger_client_bounds_answers_too(hostile):
    hostile.answer("GET", f"{BASE}/status", Answer(body=b'{"status": "', endless=True))

    async def poll() -> None:
        async with shared_http(API_KEY) as http:
            client = AsyncQueueClient(http, API_KEY, queue_url=hostile.base_url, max_answer_bytes=1024 * 1024)
            await client.status(handle_on(hostile))

    with pytest.raises(FalResponseTooLargeError, match="max_answer_mb"):
        asyncio.run(poll())


def test_the_trigger_client_ends_a_trickle_within_the_calls_time_limit(hostile):
    hostile.answer("GET", f"{BASE}/status", Answer(body=COMPLETED.body + b" " * 400, trickle=0.05))

    async def poll() -> None:
        async with shared_http(API_KEY) as http:
            client = AsyncQueueClient(
                http, API_KEY, queue_url=hostile.base_url, timeout=1, retry_policy=RetryPolicy(max_attempts=1)
            )
            await client.status(handle_on(hostile))

    started = time.monotonic()
    with pytest.raises(FalRequestLostError, match="did not finish arriving"):
        asyncio.run(poll())
    assert time.monotonic() - started < 16, "a 20 s trickle must end near the 11 s limit (connect + read timeout)"


# --------------------------------------------------------------------------- media downloads


def file_result(url: str) -> dict:
    return {"image": {"url": url, "content_type": "image/png"}}


def test_a_result_pointing_at_an_internal_address_is_not_fetched(hostile, emulator, fal_connection, tmp_path):
    hostile.answer("GET", "/secret", Answer(body=b"internal credentials", headers={"Content-Type": "image/png"}))
    hook = FalHook()
    echoed = hook.run("emulator/echo", file_result(hostile.url("/secret")))  # a model echoing its input
    with pytest.raises(FalDownloadRefusedError) as raised:
        persist_media(echoed, tmp_path, prefix="gen", **hook.download_limits())
    assert hostile.hits("GET", "/secret") == [] and list(tmp_path.iterdir()) == []
    assert "download_hosts" in str(raised.value) and "127.0.0.1" in str(raised.value)


def test_the_emulators_own_files_download_with_the_connections_limits(emulator, fal_connection, tmp_path):
    hook = FalHook()
    output = hook.run("fal-ai/fast-sdxl", {"prompt": "a lighthouse"})
    persisted = persist_media(output, tmp_path, prefix="gen", **hook.download_limits())
    assert len(persisted.files) == 1 and persisted.files[0].size > 0


def test_an_allowed_host_that_redirects_elsewhere_is_checked_again(hostile, tmp_path):
    with HostileFal() as internal:
        internal.answer("GET", "/secret", Answer(body=b"internal", headers={"Content-Type": "image/png"}))
        target = internal.url("/secret").replace("127.0.0.1", "localhost")
        hostile.answer("GET", "/image.png", Answer(status=302, headers={"Location": target}))
        allowed = DownloadHosts.for_connection((), (f"http://127.0.0.1:{hostile.base_url.rsplit(':', 1)[1]}",))
        with pytest.raises(FalDownloadRefusedError, match="localhost"):
            persist_media(file_result(hostile.url("/image.png")), tmp_path, prefix="g", download_hosts=allowed)
        assert internal.hits("GET", "/secret") == []
    assert len(hostile.hits("GET", "/image.png")) == 1


def test_an_endless_download_stops_at_the_cap_and_leaves_no_file(hostile, tmp_path):
    hostile.answer("GET", "/video.mp4", Answer(endless=True, headers={"Content-Type": "video/mp4"}))
    with pytest.raises(FalResponseTooLargeError, match="max_download_mb"):
        persist_media(
            {"video": {"url": hostile.url("/video.mp4")}},
            tmp_path,
            prefix="g",
            download_hosts=LOCAL,
            max_bytes=2 * 1024 * 1024,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_trickled_download_ends_at_its_download_timeout(hostile, tmp_path):
    hostile.answer("GET", "/image.png", Answer(body=b"\x89PNG" + b"\0" * 200, trickle=0.05))
    started = time.monotonic()
    with pytest.raises(FalDownloadError, match="download_timeout of 1 s"):
        persist_media(
            file_result(hostile.url("/image.png")), tmp_path, prefix="g", download_hosts=LOCAL, download_timeout=1
        )
    assert time.monotonic() - started < 8, "a 10 s trickle must end near the 1 s limit"
    assert len(hostile.hits("GET", "/image.png")) == 1, "a download over its time limit is not retried"
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_left_by_a_killed_write_are_removed_by_the_next(emulator, fal_connection, tmp_path):
    leftover = tmp_path / ".gen__image.png.0123456789ab.part"
    leftover.write_bytes(b"half a file from a try killed with -9")
    other = tmp_path / ".other.png.0123456789ab.part"
    other.write_bytes(b"another task's")
    hook = FalHook()
    output = {"image": hook.run("fal-ai/fast-sdxl", {"prompt": "p"})["images"][0]}
    persist_media(output, tmp_path, prefix="gen", **hook.download_limits())
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.png.0123456789ab.part", "gen__image.png"]


def test_an_error_page_reflecting_the_request_headers_never_shows_the_key(hostile, caplog):
    hostile.answer("POST", "/fal-ai/flux", Answer(status=400, reflect=True))
    with pytest.raises(FalError) as raised:
        sync_client(hostile).run("fal-ai/flux", {"prompt": "p"})
    assert "Authorization" in hostile.hits("POST", "/fal-ai/flux")[0].headers
    shown = f"{raised.value}\n{raised.value!r}\n{raised.value.detail}\n{caplog.text}"
    assert API_KEY not in shown and "bad request" in shown
