"""Upload input files to fal's CDN, as ``fal_client`` does (fal-api.md "Files and CDN upload").

:class:`CdnUploader` asks fal's REST host for a storage token (``POST {rest_url}/storage/auth/
token?storage_type=fal-cdn-v3`` with the API key), then sends the file

* in one ``POST {cdn_url}/files/upload`` up to 100 MiB, streamed from the source;
* above that, as a multipart upload to the token's ``base_url``: 10 MiB parts, each read, sent
  and retried on its own, then ``complete``;

and returns the ``access_url`` the model reads. Memory stays bounded: a single upload is read
in 64 KiB blocks while it is sent, a multipart upload holds one part at a time.

* The token is cached until shortly before its ``expires_at``; it is registered with the log
  masker and kept out of every message, like the key (the key goes to the REST host only).
* The same content (by SHA-256, read before sending) is uploaded once per uploader: a FalHook
  has one, so one task uploads a reference image shared by all its inputs once.
* A host the token names (``base_url``, the ``access_url`` parts go to) must be https, or one of
  the connection's own hosts (the emulator): the token travels there.
* Errors name the file and the step (token, upload, create, part N, complete); transient ones
  (connection failures, 429, 5xx) are retried by the hook's retry policy, step by step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any
from urllib.parse import urlsplit

import requests

from airflow_provider_fal import __version__
from airflow_provider_fal.core.classify import scrub_secret
from airflow_provider_fal.core.http import pooled_session, short_reason
from airflow_provider_fal.core.retry import RetryPolicy, retrying
from airflow_provider_fal.exceptions import FalConfigurationError, FalError

DEFAULT_REST_URL = "https://rest.fal.ai"
DEFAULT_CDN_URL = "https://v3.fal.media"
#: Files above this many bytes are uploaded; smaller ones become data: URIs.
DEFAULT_UPLOAD_THRESHOLD = 256 * 1024
#: fal_client's multipart threshold and part size.
MULTIPART_THRESHOLD = 100 * 1024 * 1024
PART_SIZE = 10 * 1024 * 1024
#: This provider's cap on one uploaded file (not fal's; the connection's ``max_upload_mb`` extra).
DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024 * 1024
#: A cached token is renewed this many seconds before fal says it expires.
TOKEN_MARGIN = 60.0
BLOCK = 64 * 1024
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
#: Characters kept in the file name header (it must be plain ASCII, with no line breaks).
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class FalUploadError(FalError):
    """Uploading an input file to fal's CDN failed; the message names the file and the step."""


@dataclass(frozen=True)
class StorageToken:
    """A CDN storage token; the token itself is kept out of ``repr``."""

    token: str = field(repr=False)
    token_type: str
    base_url: str
    expires: float  # time.time()

    @property
    def header(self) -> str:
        return f"{self.token_type} {self.token}"


class _Auth(requests.auth.AuthBase):
    """A fixed Authorization header (also keeps ``~/.netrc`` from replacing it)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._value
        return request

    def __repr__(self) -> str:
        return "_Auth(***)"


class _Body:
    """``size`` bytes of an open file sent as a stream (requests sees ``__len__``/``__iter__``,
    urllib3 reads it in blocks); hashed on the way, and refusing a file that shrank."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self.handle, self.left, self.digest = handle, size, hashlib.sha256()

    def __len__(self) -> int:
        return self.left

    def read(self, amount: int = -1) -> bytes:
        amount = self.left if amount is None or amount < 0 else min(amount, self.left)
        data = self.handle.read(amount) if amount else b""
        if len(data) < amount:
            raise OSError("the file got shorter while it was being uploaded")
        self.left -= len(data)
        self.digest.update(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while self.left:
            yield self.read(BLOCK)


def parse_expiry(value: Any) -> float:
    """``expires_at`` (ISO 8601 or epoch seconds) as ``time.time()``; unreadable: one minute from now."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    except (TypeError, ValueError):
        return time.time() + 60.0


def _host_key(url: str) -> tuple[str, int | None] | None:
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.hostname.lower(), port


class CdnUploader:
    """Uploads files to fal's CDN for one API key (see the module docstring)."""

    def __init__(
        self,
        api_key: str,
        *,
        rest_url: str = DEFAULT_REST_URL,
        cdn_url: str = DEFAULT_CDN_URL,
        own_hosts: Iterable[str] = (),
        retry_policy: RetryPolicy | None = None,
        timeout: float | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        logger: logging.Logger | None = None,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._api_key = api_key
        self.rest_url, self.cdn_url = rest_url.rstrip("/"), cdn_url.rstrip("/")
        self._own = {key for url in (rest_url, cdn_url, *own_hosts) if (key := _host_key(url))}
        self.retry_policy = retry_policy or RetryPolicy()
        self.timeout = (10.0, timeout or 300.0)
        self.max_upload_bytes = max_upload_bytes
        self.log = logger or logging.getLogger(__name__)
        self._on_secret = on_secret
        self._token: StorageToken | None = None
        self._secrets: list[str] = []  # every token fetched: scrubbed from error texts
        self._lock = threading.RLock()
        self._urls: dict[str, str] = {}  # sha256 -> access_url
        self.digests: dict[str, str] = {}  # access_url -> sha256
        self._session: requests.Session | None = None
        self.tokens_fetched = 0

    def __repr__(self) -> str:
        return f"CdnUploader(rest_url={self.rest_url!r}, cdn_url={self.cdn_url!r})"

    @property
    def session(self) -> requests.Session:
        if self._session is None:  # no API key on it: the key goes to the REST host only
            self._session = pooled_session(4, {"User-Agent": f"airflow-provider-fal/{__version__}"})
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # ------------------------------------------------------------------ token

    def token(self, shown: str = "a file") -> StorageToken:
        """The cached storage token, fetched again when it is within a minute of expiring."""
        with self._lock:
            if self._token is not None and time.time() < self._token.expires - TOKEN_MARGIN:
                return self._token
            url = f"{self.rest_url}/storage/auth/token?storage_type=fal-cdn-v3"
            for attempt in retrying(self.retry_policy, self.log, f"Uploading {shown} (token)"):
                with attempt:
                    answer = self._call(shown, "token", "POST", url, f"Key {self._api_key}", b"{}", None, True)
            try:
                data = answer.json()
                token = StorageToken(
                    str(data["token"]),
                    str(data.get("token_type") or "Bearer"),
                    str(data["base_url"]),
                    parse_expiry(data["expires_at"]),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                raise self._error(shown, "token", "fal's answer is not a storage token") from None
            self._secrets.append(token.token)
            if self._on_secret is not None:
                self._on_secret(token.token)
            self._token = token
            self.tokens_fetched += 1
            return token

    def forget_token(self) -> None:
        with self._lock:
            self._token = None

    # ------------------------------------------------------------------ upload

    def upload(self, opener: Callable[[], IO[bytes]], *, size: int, name: str, content_type: str, shown: str) -> str:
        """Upload the ``size`` bytes ``opener()`` reads and return their URL; content already
        uploaded by this uploader (same SHA-256) is not sent again."""
        if size > self.max_upload_bytes:
            raise FalConfigurationError(
                f"{shown} is {size / 2**20:.1f} MiB, above the upload limit of {self.max_upload_bytes / 2**20:g} MiB "
                "(the fal connection's `max_upload_mb` extra)."
            )
        digest = self._digest(opener, size, shown)
        known = self._urls.get(digest)
        if known is not None:
            self.log.info("%s: same content as an earlier upload (sha256 %s), reusing %s", shown, digest[:12], known)
            return known
        started = time.monotonic()
        headers = {"Content-Type": content_type, "X-Fal-File-Name": _UNSAFE.sub("_", name)[-200:] or "upload.bin"}
        if size <= MULTIPART_THRESHOLD:
            url, sent = self._single(opener, size, headers, shown)
        else:
            url, sent = self._multipart(opener, size, headers, shown)
        if sent != digest:
            raise self._error(shown, "upload", "the file changed while it was being uploaded", permanent=True)
        self._urls[digest], self.digests[url] = url, digest
        self.log.info("Uploaded %s (%d bytes) to fal's CDN in %.1f s: %s", shown, size, time.monotonic() - started, url)
        return url

    def _digest(self, opener: Callable[[], IO[bytes]], size: int, shown: str) -> str:
        digest, seen = hashlib.sha256(), 0
        try:
            with opener() as handle:
                while block := handle.read(1024 * 1024):
                    digest.update(block)
                    seen += len(block)
        except OSError as error:
            raise FalConfigurationError(f"cannot read {shown}: {error}") from None
        if seen != size:
            raise self._error(shown, "upload", f"the file changed size while it was read ({size} -> {seen} bytes)")
        return digest.hexdigest()

    def _single(self, opener: Callable[[], IO[bytes]], size: int, headers: dict[str, str], shown: str) -> Any:
        for attempt in retrying(self.retry_policy, self.log, f"Uploading {shown}"):
            with attempt:
                with opener() as handle:
                    body = _Body(handle, size)
                    answer = self._call(shown, "upload", "POST", f"{self.cdn_url}/files/upload", None, body, headers)
                return self._access_url(answer, shown, "upload"), body.digest.hexdigest()
        raise AssertionError("unreachable")  # pragma: no cover

    def _multipart(self, opener: Callable[[], IO[bytes]], size: int, headers: dict[str, str], shown: str) -> Any:
        base = self.token(shown).base_url.rstrip("/")
        self._check_host(base, shown, "create")
        created = self._with_retries(shown, "create", "POST", f"{base}/files/upload/multipart", b"", headers)
        access_url = self._access_url(created, shown, "create")
        try:
            upload_id = str(created.json()["uploadId"])
        except (ValueError, KeyError, TypeError):
            raise self._error(shown, "create", "fal's answer has no uploadId") from None
        self._check_host(access_url, shown, "create")
        digest, parts = hashlib.sha256(), []
        part_headers = {"Content-Type": headers["Content-Type"], "Accept-Encoding": "identity"}
        with opener() as handle:
            for number in range(1, -(-size // PART_SIZE) + 1):
                data = handle.read(min(PART_SIZE, size - (number - 1) * PART_SIZE))
                digest.update(data)
                url = f"{access_url}/multipart/{upload_id}/{number}"
                answer = self._with_retries(shown, f"part {number}", "PUT", url, data, part_headers)
                etag = answer.headers.get("ETag")
                if not etag:
                    raise self._error(shown, f"part {number}", "fal's answer has no ETag")
                parts.append({"partNumber": number, "etag": etag})
        done = json.dumps({"parts": parts}).encode()
        url = f"{access_url}/multipart/{upload_id}/complete"
        self._with_retries(shown, "complete", "POST", url, done, {"Content-Type": "application/json"})
        return access_url, digest.hexdigest()

    def _with_retries(self, shown: str, step: str, method: str, url: str, data: bytes, headers: Any) -> Any:
        for attempt in retrying(self.retry_policy, self.log, f"Uploading {shown} ({step})"):
            with attempt:
                return self._call(shown, step, method, url, None, data, headers)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ HTTP

    def _call(
        self,
        shown: str,
        step: str,
        method: str,
        url: str,
        authorization: str | None,
        data: Any = None,
        headers: Any = None,
        json_body: bool = False,
    ) -> requests.Response:
        """One HTTP call of ``step``; ``authorization`` None means the storage token."""
        if authorization is None:
            authorization = self.token(shown).header
        sent = dict(headers or {})
        if json_body:
            sent["Content-Type"] = "application/json"
        try:
            answer = self.session.request(
                method, url, data=data, headers=sent, auth=_Auth(authorization), timeout=self.timeout,
                allow_redirects=False,
            )  # fmt: skip
        except (requests.exceptions.RequestException, OSError) as error:
            failed = self._error(shown, step, f"{url}: {short_reason(error)}")
            failed.retryable = "shorter" not in str(error)
            raise failed from None
        if answer.status_code == 401 and step != "token":
            self.forget_token()  # expired early or revoked: the retry fetches a new one
        if not 200 <= answer.status_code < 300:
            failed = self._error(shown, step, f"HTTP {answer.status_code} from {url}: {answer.text[:300]}")
            failed.status_code = answer.status_code
            failed.retryable = answer.status_code in _RETRYABLE or (answer.status_code == 401 and step != "token")
            failed.permanent = not failed.retryable
            raise failed
        return answer

    def _access_url(self, answer: requests.Response, shown: str, step: str) -> str:
        try:
            url = answer.json()["access_url"]
        except (ValueError, KeyError, TypeError):
            url = None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise self._error(shown, step, "fal's answer has no access_url")
        return url

    def _check_host(self, url: str, shown: str, step: str) -> None:
        """The token is sent to ``url``: https, or one of the connection's own hosts."""
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return
        if parts.scheme == "http" and _host_key(url) in self._own:
            return
        where = f"{parts.scheme}://{parts.hostname}" if parts.hostname else "an unreadable URL"
        raise self._error(
            shown, step, f"fal named the upload host {where}, which is neither https nor one of the fal "
            "connection's hosts; refused (the storage token would be sent there)", permanent=True,
        )  # fmt: skip

    def _error(self, shown: str, step: str, reason: str, *, permanent: bool = False) -> FalUploadError:
        text = scrub_secret(reason, self._api_key)
        for secret in self._secrets:
            text = scrub_secret(text, secret)
        error = FalUploadError(f"Uploading {shown} to fal's CDN failed at step '{step}': {text}")
        error.permanent = permanent
        return error


def identity_of(arguments: Any, uploader: CdnUploader | None) -> Any:
    """``arguments`` with every URL ``uploader`` returned replaced by ``fal-upload:sha256:<digest>``;
    None when nothing was uploaded. A request's fingerprint reads this (``FalRequest.identity``),
    so a retried task, whose uploads get new URLs, still recognises the requests it sent."""
    if uploader is None or not uploader.digests:
        return None

    def stable(value: Any) -> Any:
        if isinstance(value, str) and value in uploader.digests:
            return f"fal-upload:sha256:{uploader.digests[value]}"
        if isinstance(value, dict):
            return {key: stable(item) for key, item in value.items()}
        if isinstance(value, list):
            return [stable(item) for item in value]
        return value

    return stable(arguments)
