"""fal's webhook signatures: an Ed25519 key pair, the signed headers and the JWKS that publishes the key.

fal signs each webhook POST (fal-api.md "Webhooks"): ``X-Fal-Webhook-Signature`` is the hex of an
Ed25519 signature over ``request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256_hex(body)``,
sent with ``X-Fal-Webhook-Request-Id``, ``-User-Id`` and ``-Timestamp`` (unix seconds); receivers
check the signature against every key of fal's JWKS and refuse timestamps more than 300 s off.

This is the one emulator module that imports something outside the standard library:
``cryptography`` (Airflow installs it), for Ed25519, which the standard library lacks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DEFAULT_USER_ID = "emulator-user"
SEED_BYTES = 32
#: Where the emulator serves its JWKS (fal: ``https://rest.alpha.fal.ai/.well-known/jwks.json``).
JWKS_PATH = "/.well-known/jwks.json"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes fal signs for one webhook delivery."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((request_id, user_id, timestamp, digest)).encode("utf-8")


def check_user_id(user_id: Any) -> str:
    """A user id that fits in one header line and cannot shift the newline-separated signed fields."""
    if not isinstance(user_id, str) or not user_id or not user_id.isprintable() or not user_id.isascii():
        raise ValueError("webhook_user_id must be a non-empty string of printable ASCII characters")
    return user_id


class WebhookSigner:
    """One Ed25519 key pair; signs webhook bodies and describes its public key as a JWKS.

    ``seed`` (32 bytes) makes the key pair reproducible; without it a fresh key is generated.
    """

    def __init__(self, seed: bytes | None = None, user_id: str = DEFAULT_USER_ID) -> None:
        if seed is None:
            self._key = Ed25519PrivateKey.generate()
        elif isinstance(seed, (bytes, bytearray)) and len(seed) == SEED_BYTES:
            self._key = Ed25519PrivateKey.from_private_bytes(bytes(seed))
        else:
            raise ValueError(f"webhook_key_seed must be {SEED_BYTES} bytes (or None for a fresh key)")
        self.user_id = check_user_id(user_id)
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = self._thumbprint()

    def _thumbprint(self) -> str:
        """The key's RFC 7638 JWK thumbprint: stable for a given key, different for another."""
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(self.public_key)}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
        return _b64url(hashlib.sha256(canonical).digest())

    def jwks(self) -> dict[str, Any]:
        """The public key as a JSON Web Key Set (OKP / Ed25519, RFC 8037)."""
        x = _b64url(self.public_key)
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """fal's four webhook headers for POSTing ``body`` now (or at ``timestamp``, unix seconds)."""
        stamp = str(int(time.time()) if timestamp is None else int(timestamp))
        signature = self._key.sign(signed_message(request_id, self.user_id, stamp, body))
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": signature.hex(),
        }
