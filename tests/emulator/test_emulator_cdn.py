"""The emulator's CDN upload protocol (fal-api.md "Files and CDN upload"), over real HTTP."""

from __future__ import annotations

import base64
import hashlib

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator

KEY = "cdn-key-6f2a"


@pytest.fixture(scope="module")
def server():
    with FalEmulator(api_key=KEY) as emu:
        yield emu


@pytest.fixture
def emu(server):
    server.reset()
    yield server
    server.reset()


def token(emu) -> dict:
    answer = requests.post(
        f"{emu.url}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers={"Authorization": f"Key {KEY}"}
    )
    assert answer.status_code == 200
    return answer.json()


def auth(grant: dict) -> dict[str, str]:
    return {"Authorization": f"{grant['token_type']} {grant['token']}"}


def describe(emu, url: str) -> dict:
    answer = requests.post(
        f"{emu.url}/emulator/describe-file", json={"file_url": url}, headers={"Authorization": f"Key {KEY}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_token_needs_the_api_key(emu):
    assert requests.post(f"{emu.url}/storage/auth/token?storage_type=fal-cdn-v3", json={}).status_code == 401
    grant = token(emu)
    assert set(grant) == {"token", "token_type", "base_url", "expires_at"}
    assert grant["base_url"] == emu.url
    assert KEY not in str(grant)


def test_single_upload_is_served_back_and_read_by_a_model(emu):
    grant = token(emu)
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100
    refused = requests.post(f"{emu.url}/files/upload", data=data, headers={"Authorization": f"Key {KEY}"})
    assert refused.status_code == 401  # the API key is not a storage token
    answer = requests.post(
        f"{emu.url}/files/upload",
        data=data,
        headers={**auth(grant), "Content-Type": "image/png", "X-Fal-File-Name": "ref.png"},
    )
    assert answer.status_code == 200
    url = answer.json()["access_url"]
    assert url.startswith(f"{emu.url}/files/") and url.endswith("/ref.png")
    served = requests.get(url)
    assert served.content == data and served.headers["Content-Type"] == "image/png"
    seen = describe(emu, url)
    assert seen["size"] == len(data) and seen["sha256"] == hashlib.sha256(data).hexdigest()
    inline = describe(emu, "data:image/png;base64," + base64.b64encode(data).decode())
    assert inline["sha256"] == seen["sha256"] and inline["source"] == "data_uri"


def test_multipart_upload_checks_etags_and_joins_parts(emu):
    grant = token(emu)
    created = requests.post(
        f"{grant['base_url']}/files/upload/multipart",
        headers={**auth(grant), "Content-Type": "video/mp4", "X-Fal-File-Name": "clip.mp4"},
    ).json()
    base = f"{created['access_url']}/multipart/{created['uploadId']}"
    pieces = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    etags = []
    for number, piece in enumerate(pieces, 1):
        put = requests.put(f"{base}/{number}", data=piece, headers=auth(grant))
        assert put.status_code == 200
        etags.append(put.headers["ETag"])
    assert requests.get(created["access_url"]).status_code == 404  # not served before complete
    wrong = [
        {"partNumber": 1, "etag": '"nope"'},
        {"partNumber": 2, "etag": etags[1]},
        {"partNumber": 3, "etag": etags[2]},
    ]
    assert requests.post(f"{base}/complete", json={"parts": wrong}, headers=auth(grant)).status_code == 400
    parts = [{"partNumber": n, "etag": e} for n, e in enumerate(etags, 1)]
    done = requests.post(f"{base}/complete", json={"parts": parts}, headers=auth(grant))
    assert done.status_code == 200 and done.json()["access_url"] == created["access_url"]
    assert requests.get(created["access_url"]).content == b"".join(pieces)


def test_injected_upload_faults_and_expired_tokens(emu):
    grant = token(emu)
    emu.fail_upload("upload", times=1, status=503)
    assert requests.post(f"{emu.url}/files/upload", data=b"x", headers=auth(grant)).status_code == 503
    assert requests.post(f"{emu.url}/files/upload", data=b"x", headers=auth(grant)).status_code == 200
    emu.fail_upload("token", times=1, status=500)
    with pytest.raises(AssertionError):
        token(emu)
    emu.state.cdn_token_ttl = 0.0
    expired = token(emu)
    assert requests.post(f"{emu.url}/files/upload", data=b"x", headers=auth(expired)).status_code == 401


def test_describe_file_refuses_a_url_it_cannot_fetch(emu):
    answer = requests.post(
        f"{emu.url}/emulator/describe-file",
        json={"image_url": "https://example.com/cat.png"},
        headers={"Authorization": f"Key {KEY}"},
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_upload_faults_over_the_control_api(emu):
    control = f"{emu.url}/_emulator/upload-fault"
    key = {"Authorization": f"Key {KEY}"}
    assert requests.post(control, json={"step": "part", "part": 2, "status": 502}).status_code == 401
    assert requests.post(control, json={"step": "nope"}, headers=key).status_code == 400
    assert requests.post(control, json={"step": "part", "part": 2, "status": 502}, headers=key).status_code == 200
    grant = token(emu)
    created = requests.post(f"{emu.url}/files/upload/multipart", headers=auth(grant)).json()
    base = f"{created['access_url']}/multipart/{created['uploadId']}"
    assert requests.put(f"{base}/1", data=b"a", headers=auth(grant)).status_code == 200
    assert requests.put(f"{base}/2", data=b"b", headers=auth(grant)).status_code == 502
    assert requests.put(f"{base}/2", data=b"b", headers=auth(grant)).status_code == 200
