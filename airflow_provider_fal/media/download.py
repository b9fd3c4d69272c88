"""Streamed, verified downloads of the media files in a fal result (no Airflow here).

:class:`MediaPersister` finds every fal file object in a result (see :mod:`media.files`),
streams each file into an ``output_path`` (see :mod:`media.storage`) and returns the result
with ``stored_path`` set beside each ``url`` (the URL is kept).

* Downloads stream in chunks (memory does not grow with the file), send no credentials
  (fal's media URLs are public; the API key is never sent to them), check the status, length
  and content type the result promised, and are retried with the client's :class:`RetryPolicy`:
  a GET is idempotent, so connection failures, 5xx/429 answers and truncated bodies are all
  safe to retry.
* ``data:`` URLs are decoded, not downloaded.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import requests
import urllib3

from airflow_provider_fal import __version__
from airflow_provider_fal.core.bounded import (
    DEFAULT_MAX_DOWNLOAD_BYTES,
    DeadlineExceeded,
    bounded_chunks,
    check_announced,
)
from airflow_provider_fal.core.client import pooled_session
from airflow_provider_fal.core.retry import RetryPolicy, retrying
from airflow_provider_fal.exceptions import FalError
from airflow_provider_fal.media.files import (
    MediaRef,
    extension_for,
    file_names,
    find_media,
    media_type,
    safe_component,
    with_locations,
)
from airflow_provider_fal.media.hosts import DownloadHosts, FalDownloadRefusedError
from airflow_provider_fal.media.storage import open_store

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
#: Redirects followed (each hop checked) before a download gives up.
MAX_REDIRECTS = 5
#: The longest one download may take in all, however steadily bytes arrive.
DEFAULT_DOWNLOAD_TIMEOUT = 1800.0
MAX_DOWNLOAD_SETTING = "the fal connection's `max_download_mb` extra (or MediaPersister(max_bytes=...))"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Longest silence between two chunks of a download before it counts as stalled (and is retried).
DEFAULT_READ_TIMEOUT = 60.0
#: Served types that say nothing about the content; accepted for any promised type.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})


class FalDownloadError(FalError):
    """A media file of a fal result could not be stored.

    ``retryable`` is set per instance: transport failures, truncated bodies, 408/429 and 5xx
    answers are retried; a missing (expired) file or a content mismatch is not.
    """


@dataclass(frozen=True)
class StoredFile:
    """One file written by :class:`MediaPersister`."""

    position: tuple[str | int, ...]
    url: str
    location: str
    size: int
    content_type: str | None


@dataclass(frozen=True)
class PersistedResult:
    """The result with ``stored_path`` beside each file URL, and the files written."""

    output: Any
    files: list[StoredFile]

    @property
    def locations(self) -> list[str]:
        return [stored.location for stored in self.files]


def display_url(url: str) -> str:
    """A URL for messages: no query string or credentials, ``data:`` URIs abbreviated."""
    if url.startswith("data:"):
        return url[: url.find(",")] + ",..." if "," in url else "data:..."
    parts = urlsplit(url)
    text = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    return text if len(text) <= 200 else text[:197] + "..."


class MediaPersister:
    """Streams the media of fal results into one ``output_path``. Reusable and thread-safe.

    :param output_path: a directory: absolute local path, ``file://`` URI, object storage URI
        (``s3://conn_id@bucket/prefix/``) or ``ObjectStoragePath``.
    :param retry_policy: retries of each download (a :class:`RetryPolicy` or dict of its fields).
    :param connect_timeout: seconds to connect to the media host.
    :param read_timeout: longest wait for the next bytes of a download, in seconds.
    :param chunk_size: bytes read and written at a time.
    :param pool_maxsize: HTTP connections kept per media host (raise it for threaded use).
    :param download_hosts: where media may come from (:class:`~.hosts.DownloadHosts`); by default
        fal's hosts only. The operators pass the connection's (its own hosts and ``download_hosts``).
    :param max_bytes: the largest file stored; a bigger one fails naming the cap.
    :param download_timeout: seconds one download may take in all (a trickle ends there).
    """

    def __init__(
        self,
        output_path: Any,
        *,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        chunk_size: int = CHUNK_SIZE,
        pool_maxsize: int = 4,
        download_hosts: DownloadHosts | None = None,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = open_store(output_path)
        self.hosts = download_hosts or DownloadHosts.for_connection(())
        self.max_bytes = int(max_bytes)
        self.download_timeout = float(download_timeout)
        self.retry_policy = RetryPolicy.from_value(retry_policy)
        self.timeout = (float(connect_timeout), float(read_timeout))
        self.chunk_size = max(1024, int(chunk_size))
        self.pool_maxsize = max(1, int(pool_maxsize))
        self.log = logger or log
        self._session: requests.Session | None = None
        self._prepared = False

    def __repr__(self) -> str:
        return f"MediaPersister({self.store!r})"

    @property
    def session(self) -> requests.Session:
        """A session of its own, without the fal API key: media URLs are public and need none."""
        if self._session is None:
            self._session = pooled_session(
                self.pool_maxsize,
                {"User-Agent": f"airflow-provider-fal/{__version__}", "Accept-Encoding": "identity"},
            )
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> MediaPersister:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prepare(self) -> None:
        """Create the output directory (once); raises :class:`FalConfigurationError` if it cannot be."""
        if not self._prepared:
            self.store.prepare()
            self._prepared = True

    def persist(self, result: Any, prefix: str) -> PersistedResult:
        """Store every file object of ``result``; names start with ``prefix`` (see :func:`.files.file_prefix`)."""
        refs = find_media(result)
        if not refs:
            return PersistedResult(result, [])
        self.prepare()
        stored = [
            self.store_one(ref, base) for ref, base in zip(refs, file_names(refs, safe_component(prefix)), strict=True)
        ]
        by_position = {item.position: item.location for item in stored}
        return PersistedResult(with_locations(result, (), by_position), stored)

    def store_one(self, ref: MediaRef, base_name: str) -> StoredFile:
        """Download (or decode, for ``data:`` URLs) one file and write it as ``base_name.<ext>``."""
        if ref.url.startswith("data:"):
            content_type, data = decode_data_url(ref.url)
            name = f"{base_name}.{extension_for(ref, content_type)}"
            size = self.store.write(name, [data])
            return StoredFile(ref.position, ref.url, self.store.location(name), size, content_type)
        what = f"download of {display_url(ref.url)}"
        for attempt in retrying(self.retry_policy, self.log, what):
            with attempt:
                return self._download_once(ref, base_name)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _download_once(self, ref: MediaRef, base_name: str) -> StoredFile:
        shown = display_url(ref.url)
        deadline = time.monotonic() + self.download_timeout
        response = self._follow(ref.url, shown)
        with response:
            _check_status(response, shown)
            served_type = response.headers.get("Content-Type")
            _check_content_type(ref, served_type, shown)
            check_announced(response.headers.get("Content-Length"), self.max_bytes, shown, MAX_DOWNLOAD_SETTING)
            expected = _expected_length(ref, response.headers.get("Content-Length"), shown)
            name = f"{base_name}.{extension_for(ref, served_type)}"
            size = self.store.write(name, self._verified_chunks(response, expected, shown, deadline))
        self.log.info("Stored %s (%d bytes) at %s", shown, size, self.store.location(name))
        return StoredFile(ref.position, ref.url, self.store.location(name), size, media_type(served_type) or None)

    def _follow(self, url: str, shown: str) -> requests.Response:
        """GET ``url`` (headers only so far), following redirects by hand: every hop's host is checked
        against :attr:`hosts`, and an https URL never leads to plain http."""
        for _hop in range(MAX_REDIRECTS + 1):
            self.hosts.check(url)
            try:
                response = self.session.get(url, stream=True, timeout=self.timeout, allow_redirects=False)
            except requests.exceptions.RequestException as error:
                raise _transient(f"Could not download {shown}: {_short_reason(error)}") from None
            if not response.is_redirect:
                return response
            target = urljoin(url, response.headers["Location"])
            response.close()
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                raise FalDownloadRefusedError(
                    f"{shown} redirects from https to {urlsplit(target).scheme or 'another scheme'}; "
                    "refusing to follow."
                )
            url = target
        raise FalDownloadError(f"{shown} redirected more than {MAX_REDIRECTS} times; giving up.")

    def _verified_chunks(
        self, response: requests.Response, expected: int | None, shown: str, deadline: float
    ) -> Iterator[bytes]:
        received = 0
        chunks = bounded_chunks(
            response.raw, max_bytes=self.max_bytes, deadline=deadline, what=shown, setting=MAX_DOWNLOAD_SETTING
        )
        try:
            for chunk in chunks:
                received += len(chunk)
                if expected is not None and received > expected:
                    raise _transient(f"{shown} sent more than the {expected} bytes it announced")
                yield chunk
        except DeadlineExceeded:
            raise FalDownloadError(
                f"Download of {shown} did not finish within download_timeout of {self.download_timeout:g} s "
                f"({received} of {expected or 'unknown'} bytes arrived)."
            ) from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise _transient(
                f"Download of {shown} broke off after {received} of {expected or 'unknown'} bytes: "
                f"{_short_reason(error)}"
            ) from None
        if expected is not None and received != expected:
            raise _transient(f"Download of {shown} was truncated: {received} of {expected} bytes arrived")


def _transient(message: str) -> FalDownloadError:
    error = FalDownloadError(message)
    error.retryable = True
    return error


def _check_status(response: requests.Response, shown: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if status in (404, 410):
        error = FalDownloadError(
            f"{shown} is gone (HTTP {status}): fal media URLs expire (see object_lifecycle); persist them "
            "in the same task that generates them.",
            status_code=status,
        )
    elif status in (408, 425, 429) or status >= 500:
        error = _transient(f"{shown} answered HTTP {status}")
        error.status_code = status
    elif status in (401, 403):
        error = FalDownloadError(
            f"{shown} refused the download (HTTP {status}): the URL may have expired, or it needs credentials "
            "this provider does not send (it never sends the fal API key to media hosts).",
            status_code=status,
        )
    else:
        error = FalDownloadError(f"{shown} answered HTTP {status}", status_code=status)
    raise error


def _check_content_type(ref: MediaRef, served: str | None, shown: str) -> None:
    promised, actual = media_type(ref.content_type), media_type(served)
    if not promised or actual in _GENERIC_TYPES or promised in _GENERIC_TYPES or promised == actual:
        return
    raise FalDownloadError(
        f"{shown} was promised as {promised} but is served as {actual}; refusing to store it "
        "(an error page or a different file?)."
    )


def _expected_length(ref: MediaRef, header: str | None, shown: str) -> int | None:
    announced: int | None = None
    if header is not None:
        try:
            announced = int(header)
        except ValueError:
            raise _transient(f"{shown} answered with a malformed Content-Length {header!r}") from None
    if announced is not None and ref.file_size is not None and announced != ref.file_size:
        raise FalDownloadError(
            f"{shown} is {announced} bytes, but the result promised file_size {ref.file_size}; refusing to store it."
        )
    return announced if announced is not None else ref.file_size


def _short_reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    inner = re.search(r"(\[Errno -?\d+\][^'\")]*|timed out|Connection refused|Connection reset by peer)", text)
    if inner:
        return inner.group(1).strip()
    return text if len(text) <= 300 else text[:300] + "..."


def decode_data_url(url: str) -> tuple[str, bytes]:
    """``data:[<type>][;base64],<data>`` -> (content type, bytes)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise FalDownloadError("a data: URL in the result has no ',' separating its header from its data")
    params = [part.strip() for part in header.split(";")]
    content_type = params[0] or "text/plain"
    try:
        if "base64" in (part.lower() for part in params[1:]):
            return content_type, base64.b64decode(payload, validate=False)
        return content_type, unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as error:
        raise FalDownloadError(f"a data: URL in the result is not valid base64: {error}") from None


def persist_media(
    result: Any,
    output_path: Any,
    *,
    prefix: str,
    retry_policy: RetryPolicy | dict[str, Any] | None = None,
    logger: logging.Logger | None = None,
    **limits: Any,
) -> PersistedResult:
    """One-shot :meth:`MediaPersister.persist`: store the media of ``result`` under ``output_path``.

    ``limits``: ``download_hosts``, ``max_bytes``, ``download_timeout`` of :class:`MediaPersister`."""
    with MediaPersister(output_path, retry_policy=retry_policy, logger=logger, **limits) as persister:
        return persister.persist(result, prefix)
