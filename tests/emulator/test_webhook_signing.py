"""The emulator signs its webhooks as fal does (fal-api.md "Webhooks") and serves the public key as a JWKS.

A real receiver on 127.0.0.1 gets webhooks from real queue submits; the signatures are checked
by a verifier written here from fal's description (not the emulator's code), against the JWKS
fetched over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.emulator.process import spawn_emulator

KEY = "sign-test-key:s3cr3t-value"
AUTH = {"Authorization": f"Key {KEY}"}
MAX_SKEW = 300  # seconds: fal's receivers refuse timestamps further off


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class _Receiver(BaseHTTPRequestHandler):
    deliveries: list[Delivery] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).deliveries.append(Delivery(dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.deliveries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.deliveries
    server.shutdown()
    server.server_close()


@pytest.fixture
def emu():
    with FalEmulator(api_key=KEY) as emulator:
        yield emulator


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ------------------------------------------------------------------ an independent verifier


def jwk_public_keys(jwks: dict) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in jwks["keys"]:
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
        assert jwk["kid"] and "=" not in jwk["x"]  # base64url without padding
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        assert len(raw) == 32
        keys.append(Ed25519PublicKey.from_public_bytes(raw))
    return keys


def verify(jwks: dict, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """fal's receiver check: a fresh timestamp and a signature that one of the JWKS keys accepts."""
    request_id = headers["X-Fal-Webhook-Request-Id"]
    user_id = headers["X-Fal-Webhook-User-Id"]
    timestamp = headers["X-Fal-Webhook-Timestamp"]
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW:
        return False
    message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
    signature = bytes.fromhex(headers["X-Fal-Webhook-Signature"])
    for key in jwk_public_keys(jwks):
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


def fetch_jwks(emu: FalEmulator) -> dict:
    response = requests.get(emu.jwks_url)  # no Authorization: a public key
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    return response.json()


# ------------------------------------------------------------------ tests


def test_an_ok_webhook_is_signed_and_verifies_against_the_served_jwks(emu, receiver):
    hook_url, deliveries = receiver
    job = requests.post(
        f"{emu.queue_url}/emulator/echo", params={"fal_webhook": hook_url}, json={"a": 1}, headers=AUTH
    ).json()
    wait_for(lambda: deliveries)
    delivery = deliveries[0]
    assert delivery.json()["status"] == "OK" and delivery.json()["payload"] == {"a": 1}
    headers = delivery.headers
    assert headers["X-Fal-Webhook-Request-Id"] == job["request_id"]
    assert headers["X-Fal-Webhook-User-Id"] == "emulator-user"
    assert abs(time.time() - int(headers["X-Fal-Webhook-Timestamp"])) <= MAX_SKEW
    assert emu.jwks_url == f"{emu.url}/.well-known/jwks.json"
    jwks = fetch_jwks(emu)
    assert jwks == emu.webhook_jwks() and len(jwks["keys"]) == 1
    assert verify(jwks, headers, delivery.body)

    # what a receiver must refuse
    assert not verify(jwks, headers, delivery.body.replace(b'"a":1', b'"a":2'))
    assert not verify(jwks, {**headers, "X-Fal-Webhook-Request-Id": "another-request"}, delivery.body)
    assert not verify(jwks, {**headers, "X-Fal-Webhook-User-Id": "someone-else"}, delivery.body)
    stamp = int(headers["X-Fal-Webhook-Timestamp"])
    assert not verify(jwks, {**headers, "X-Fal-Webhook-Timestamp": str(stamp + 1)}, delivery.body)
    assert not verify(jwks, headers, delivery.body, now=stamp + MAX_SKEW + 1)  # replayed too late
    with FalEmulator(api_key=KEY) as other:  # another emulator's key does not verify it
        assert not verify(other.webhook_jwks(), headers, delivery.body)

    # the emulator's own record shows what was sent (it records once the receiver has answered)
    wait_for(lambda: emu.webhooks)
    record = emu.webhooks[0]
    assert record.delivered and record.headers["X-Fal-Webhook-Signature"] == headers["X-Fal-Webhook-Signature"]


def test_an_error_webhook_is_signed_too(emu, receiver):
    hook_url, deliveries = receiver
    # fal's queue accepts an invalid input, runs it and answers 422 on the result
    job = requests.post(
        f"{emu.queue_url}/fal-ai/flux/dev", params={"fal_webhook": hook_url}, json={"seed": 1}, headers=AUTH
    ).json()
    wait_for(lambda: deliveries)
    result = requests.get(job["response_url"], headers=AUTH)
    assert result.status_code == 422
    delivery = deliveries[0]
    body = delivery.json()
    assert body["status"] == "ERROR" and body["error"] == "Invalid status code: 422"
    assert body["payload"] == result.json()
    assert verify(fetch_jwks(emu), delivery.headers, delivery.body)


def test_the_api_key_is_in_no_webhook_and_not_in_the_jwks(emu, receiver):
    hook_url, deliveries = receiver
    requests.post(
        f"{emu.queue_url}/emulator/echo", params={"fal_webhook": hook_url}, json={"prompt": "p"}, headers=AUTH
    )
    wait_for(lambda: deliveries and emu.webhooks)  # recorded once the receiver has answered
    delivery, record = deliveries[0], emu.webhooks[0].to_dict()
    secret = KEY.split(":")[1]
    texts = (delivery.body.decode(), json.dumps(delivery.headers), json.dumps(record), requests.get(emu.jwks_url).text)
    for text in texts:
        assert KEY not in text and secret not in text


def test_the_jwks_needs_no_auth_even_when_the_account_is_locked(emu):
    emu.lock_account()
    assert requests.get(emu.jwks_url, headers={"Authorization": "Key wrong"}).json() == emu.webhook_jwks()
    assert requests.post(f"{emu.url}/emulator/echo", json={}, headers=AUTH).status_code == 403


def test_a_seed_fixes_the_key_and_the_user_id_is_configurable(receiver):
    hook_url, deliveries = receiver
    seed = bytes(range(32))
    with FalEmulator(api_key=KEY, webhook_key_seed=seed, webhook_user_id="user-42") as first:
        jwks = fetch_jwks(first)
        requests.post(f"{first.queue_url}/emulator/echo", params={"fal_webhook": hook_url}, json={}, headers=AUTH)
        wait_for(lambda: deliveries)
    with FalEmulator(api_key="another-key", webhook_key_seed=seed) as second:
        assert second.webhook_jwks() == jwks  # same seed, same key (and kid)
    with FalEmulator(api_key=KEY) as fresh_a, FalEmulator(api_key=KEY) as fresh_b:
        assert fresh_a.webhook_jwks() != fresh_b.webhook_jwks()  # no seed: a key per instance
        assert fresh_a.webhook_jwks()["keys"][0]["kid"] != fresh_b.webhook_jwks()["keys"][0]["kid"]
    assert deliveries[0].headers["X-Fal-Webhook-User-Id"] == "user-42"
    assert verify(jwks, deliveries[0].headers, deliveries[0].body)


def test_the_command_line_takes_a_seed_and_a_user_id(receiver):
    hook_url, deliveries = receiver
    seed = "ab" * 32
    process, url = spawn_emulator(KEY, "--webhook-key-seed", seed, "--webhook-user-id", "cli-user")
    try:
        jwks = requests.get(f"{url}/.well-known/jwks.json").json()
        requests.post(f"{url}/queue/emulator/echo", params={"fal_webhook": hook_url}, json={}, headers=AUTH)
        wait_for(lambda: deliveries)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert jwks == FalEmulator(api_key=KEY, webhook_key_seed=bytes.fromhex(seed)).webhook_jwks()
    assert deliveries[0].headers["X-Fal-Webhook-User-Id"] == "cli-user"
    assert verify(jwks, deliveries[0].headers, deliveries[0].body)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"webhook_key_seed": b"short"}, "webhook_key_seed"),
        ({"webhook_key_seed": "00" * 32}, "webhook_key_seed"),
        ({"webhook_user_id": ""}, "webhook_user_id"),
        ({"webhook_user_id": "a\nb"}, "webhook_user_id"),
        ({"webhook_user_id": 42}, "webhook_user_id"),
    ],
)
def test_bad_signing_settings_are_refused_naming_the_setting(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FalEmulator(api_key=KEY, **kwargs)
