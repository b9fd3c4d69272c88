"""What the sync client and the async trigger share about HTTP with fal, and the sync session.

* :class:`FalResponse` and :func:`decode_answer`: one reading of fal's answers (status, headers,
  body) into a result or the typed :class:`~airflow_provider_fal.exceptions.FalError` it means.
* :func:`base_headers`: the headers of every call.
* :func:`pooled_session`: the session (:class:`FalSession`, a ``requests.Session``) of
  :class:`~airflow_provider_fal.core.client.FalClient` and of the media downloader.
* :func:`send_once`: one attempt of a call to fal's API, sent through the session's urllib3 pools
  (:meth:`FalSession.open`), its answer read within the size cap and the call's time limit.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)

from airflow_provider_fal import __version__
from airflow_provider_fal.core.billing import billable_units
from airflow_provider_fal.core.bounded import (
    DEFAULT_MAX_ANSWER_BYTES,
    DeadlineExceeded,
    bounded_chunks,
    check_announced,
)
from airflow_provider_fal.core.classify import REQUEST_ID_HEADER, error_from_response, scrub_secret
from airflow_provider_fal.exceptions import FalConfigurationError, FalConnectError, FalError, FalRequestLostError

DEFAULT_CONNECT_TIMEOUT = 10.0
#: Read timeout of one queue call (submit, status, result, cancel): fal answers them at once.
QUEUE_CALL_TIMEOUT = 60.0


#: How to raise the answer size cap, for error messages.
MAX_ANSWER_SETTING = "the fal connection's `max_answer_mb` extra (or FalClient(max_answer_bytes=...))"

#: A status poll of a known request changes nothing on fal, so these answers are polled again
#: (within the retry policy) whatever their headers say, as fal's JS client does.
STATUS_POLL_RESENDABLE = frozenset({429, 500, 502, 503, 504})


def queue_call_timeout(timeout: float | None) -> float:
    """Read timeout of a queue call, sync or async: the configured ``timeout`` if set, else 60 s."""
    return timeout if timeout is not None else QUEUE_CALL_TIMEOUT


@dataclass(frozen=True)
class FalResponse:
    """A successful answer: the model's JSON output and fal's request id."""

    output: Any
    request_id: str | None
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def billable_units(self) -> float | None:
        """What fal billed for this result (``X-Fal-Billable-Units``), where it says."""
        return billable_units(self.headers)


def decode_answer(
    status_code: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    secret: str | None = None,
    resend_statuses: frozenset[int] = frozenset(),
) -> FalResponse:
    """An HTTP answer from fal as a :class:`FalResponse`, or the typed :class:`FalError` it stands for.

    Shared by the requests-based client and the httpx-based trigger (both pass case-insensitive
    header mappings).
    """
    error = error_from_response(status_code, headers, content, secret=secret)
    if error is not None:
        if status_code in resend_statuses:  # e.g. a status poll: asking again changes nothing on fal
            error.retryable, error.permanent = True, False
        raise error
    request_id = headers.get(REQUEST_ID_HEADER)
    try:
        output = json.loads(content) if content else None
    except ValueError:
        garbled = FalError(
            f"fal answered {status_code} with a body that is not JSON", status_code=status_code, request_id=request_id
        )
        # An answer to a call that may be repeated (a status poll) is as good as lost: ask again.
        garbled.retryable = bool(resend_statuses)
        raise garbled from None
    return FalResponse(output, request_id, status_code, dict(headers))


def base_headers(api_key: str) -> dict[str, str]:
    """Headers of every call to fal: the key, our user agent, JSON. Shared with the async trigger."""
    return {
        "Authorization": f"Key {api_key}",
        "User-Agent": f"airflow-provider-fal/{__version__}",
        "Accept": "application/json",
    }


def failed_before_send(error: BaseException) -> bool:
    """Whether a connection error happened before any byte of the request left (safe to resend)."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (NewConnectionError, ConnectTimeoutError, NameResolutionError, ClosedPoolError)):
            return True
        pending.extend([getattr(current, "reason", None), current.__cause__, current.__context__])
        pending.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return False


class KeyAuth(requests.auth.AuthBase):
    """``Authorization: Key <key>`` as the session's ``auth``.

    With no ``auth`` set, requests looks up ``~/.netrc`` (or ``$NETRC``) on every call and, when
    an entry matches (a ``default`` entry matches every host), replaces the fal key with Basic
    credentials: fal then answers 401. Setting ``auth`` skips that lookup, so the key always wins.
    """

    def __init__(self, api_key: str) -> None:
        self._header = f"Key {api_key}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "KeyAuth(***)"


class _CallTarget:
    """What a ``requests`` adapter reads of a request to choose its pool and the URL to ask for."""

    __slots__ = ("host", "path_url", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = (parts.scheme, parts.netloc)
        self.path_url = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


@functools.lru_cache(maxsize=64)
def _call_target(url: str) -> _CallTarget:
    """:class:`_CallTarget` of ``url``, remembered: a batch submits every input to the same URL."""
    return _CallTarget(url)


#: urllib3 retries nothing: what is retried is decided by :mod:`retry` (as ``HTTPAdapter(max_retries=0)``).
NO_RETRIES = urllib3.Retry(0, read=False)


class FalSession(requests.Session):
    """A ``requests.Session`` that reads proxy and CA settings from the environment once per host,
    and sends fal's API calls straight through its adapter's urllib3 pools (:meth:`open`).

    ``requests`` re-reads the environment on every call, scanning ``os.environ`` several times:
    about 0.2 ms per call (see bench/hook_overhead.py). httpx reads it once per client; this reads
    it on the first call to each scheme and host, so ``HTTPS_PROXY``/``NO_PROXY``/
    ``REQUESTS_CA_BUNDLE`` still apply, as they were when the session first reached that host.
    """

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[str, str], dict[str, Any]] = {}
        self._routes: dict[tuple[str, str], tuple[urllib3.HTTPConnectionPool, bool]] = {}

    def environment_for(self, url: str) -> dict[str, Any]:
        """Proxies, CA bundle and client certificate for ``url``'s scheme and host, read once."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        settings = self._environment.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, {}, None, None, None)
            self._environment[key] = settings
        return settings

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        if proxies or verify is not None or cert is not None:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings = self.environment_for(url)
        # ``stream`` is not read from the environment: the call's own, else the session's (as requests does).
        chosen = self.stream if stream is None else stream
        return {**settings, "proxies": dict(settings["proxies"]), "stream": chosen}

    def _route(self, target: _CallTarget) -> tuple[urllib3.HTTPConnectionPool, bool]:
        """The adapter's pool for ``target``'s scheme and host, and whether the request line names
        the whole URL (a plain-HTTP proxy) rather than its path; looked up once per host while
        the pool stays open (the pool manager closes a pool it drops, or all on ``close``)."""
        route = self._routes.get(target.host)
        if route is None or route[0].pool is None:
            settings = self.environment_for(target.url)
            adapter = self.get_adapter(target.url)
            proxies = settings["proxies"]
            pool = adapter.get_connection_with_tls_context(target, settings["verify"], proxies, settings["cert"])
            route = (pool, adapter.request_url(target, proxies) != target.path_url)
            self._routes[target.host] = route
        return route

    def open(
        self, method: str, url: str, *, body: bytes | None, headers: Any, timeout: tuple[float, float]
    ) -> urllib3.BaseHTTPResponse:
        """Send one request and return urllib3's answer unread (the caller reads and releases it).

        The same pools, proxies, CA settings and session headers as ``session.request``, without
        what a fal API call does not use (preparing a ``Request``, cookies, hooks, ``~/.netrc``,
        redirects, a ``Response``): that machinery was about 40 % of a queue call's CPU. Raises
        urllib3's (and the socket's) exceptions as they are; :func:`send_once` classifies them.
        """
        call_headers = dict(headers or {})
        for item in call_headers.items():
            requests.utils.check_header_validity(item)
        # the session's headers, a call's header replacing one of the same name in any case (as
        # requests merges them), in a plain dict: a CaseInsensitiveDict was ~5 % of a submit's CPU
        by_name = {name.lower(): (name, value) for name, value in self.headers.items()}
        for name, value in call_headers.items():
            by_name[name.lower()] = (name, value)
        merged = dict(by_name.values())
        target = _call_target(url)
        pool, full_url = self._route(target)
        return pool.urlopen(
            method,
            target.url if full_url else target.path_url,
            body=body,
            headers=merged,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            retries=NO_RETRIES,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        )


def pooled_session(pool_maxsize: int, headers: Mapping[str, str]) -> FalSession:
    """A session with a pool of ``pool_maxsize`` connections per host and no urllib3-level
    retries (what is retried is decided by :mod:`retry`), environment settings read once per host."""
    session = FalSession()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update(headers)
    return session


def send_once(
    session: FalSession,
    method: str,
    url: str,
    *,
    body: bytes | None,
    headers: Any,
    timeout: tuple[float, float],
    idempotent: bool,
    secret: str | None,
    resend_statuses: frozenset[int] = frozenset(),
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
) -> FalResponse:
    """One attempt of a call on ``session``: the decoded answer, or the typed error of what went wrong.

    A connection that failed before the request left is :class:`FalConnectError` (safe to send
    again); an answer that never came is :class:`FalRequestLostError`, retryable only for an
    ``idempotent`` call, since fal may be running (and billing) the request. The whole call,
    body included, must finish within connect + read timeout, and the body may not exceed
    ``max_answer_bytes``; redirects are refused, never followed.
    """
    deadline = time.monotonic() + timeout[0] + timeout[1]
    try:
        answer = session.open(method, url, body=body, headers=headers, timeout=timeout)
    except ReadTimeoutError as error:
        lost = FalRequestLostError(
            f"No answer from {url} within the read timeout of {timeout[1]:g} s ({short_reason(error)}). "
            "The request was sent and fal may bill it; it is not resent automatically. Raise "
            "`timeout`, or use the queue for long generations."
        )
        lost.retryable = idempotent
        raise lost from None
    except (requests.exceptions.InvalidHeader, UnicodeEncodeError):
        raise FalConfigurationError(refused_header(url)) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.LocationValueError) as error:
        # e.g. a proxy URL from the environment that cannot be used: nothing was sent
        raise FalError(f"HTTP request to {url} failed: {scrub_secret(short_reason(error), secret)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        if failed_before_send(error):
            raise FalConnectError(f"Could not connect to fal at {url}: {short_reason(error)}") from None
        lost = FalRequestLostError(
            f"The request to {url} was sent but no answer arrived ({short_reason(error)}). fal may "
            "still bill it; it is not resent automatically."
        )
        lost.retryable = idempotent
        raise lost from None
    except ValueError:  # http.client refuses a header value it cannot send (its message quotes the value)
        raise FalConfigurationError(refused_header(url)) from None
    try:
        if 300 <= answer.status < 400:
            raise redirect_error(method, url, answer.status, answer.headers)
        content = read_answer(answer, url, deadline, timeout, idempotent, max_answer_bytes)
    except BaseException:
        answer.close()  # a connection with bytes left unread is never reused
        raise
    finally:
        answer.release_conn()
    return decode_answer(answer.status, answer.headers, content, secret=secret, resend_statuses=resend_statuses)


def read_answer(
    answer: urllib3.BaseHTTPResponse,
    url: str,
    deadline: float,
    timeout: tuple[float, float],
    idempotent: bool,
    max_answer_bytes: int,
) -> bytes:
    """The whole body of an answer, within ``max_answer_bytes`` and the call's total time limit."""
    what = f"The answer from {url}"
    check_announced(answer.headers.get("Content-Length"), max_answer_bytes, what, MAX_ANSWER_SETTING)
    try:
        return b"".join(
            bounded_chunks(answer, max_bytes=max_answer_bytes, deadline=deadline, what=what, setting=MAX_ANSWER_SETTING)
        )
    except DeadlineExceeded as stalled:
        lost = FalRequestLostError(
            f"{what} did not finish arriving within the call's time limit of {timeout[0] + timeout[1]:g} s "
            f"(connect + read timeout; {stalled.received} bytes arrived). The request was sent and fal may bill "
            "it; it is not resent automatically."
        )
    except (urllib3.exceptions.HTTPError, OSError) as error:
        lost = FalRequestLostError(
            f"{what} broke off ({short_reason(error)}). The request was sent and fal may bill it; it is not "
            "resent automatically."
        )
    lost.retryable = idempotent
    raise lost from None


def redirect_error(method: str, url: str, status: int, headers: Mapping[str, str]) -> FalError:
    """A 3xx answer: never followed, since that would send the input (and the key) to another URL."""
    target = urlsplit(headers.get("Location") or "")
    where = f"{target.scheme}://{target.hostname}" if target.hostname else "another URL"
    error = FalError(
        f"{method} {url} was answered with a redirect (HTTP {status}) to {where}. fal's API "
        "does not redirect and redirects are never followed (they would send the model input elsewhere). "
        "Check the fal connection's host (https, no proxy rewriting it).",
        status_code=status,
        request_id=headers.get(REQUEST_ID_HEADER),
    )
    error.permanent = True
    return error


def refused_header(url: str) -> str:
    """The error text of a request the HTTP library refused to send for a bad header.

    Never the library's own message: it quotes the header value, which may be the API key.
    """
    return (
        f"The request to {url} was not sent: a header name or value holds a line break, a leading "
        "space, a control character or a character HTTP cannot carry (values are not shown, as one "
        "may hold the API key). Check the fal connection's API key and any `headers` or `hint`."
    )


def short_reason(error: BaseException) -> str:
    """A short reason: the innermost socket-level message when urllib3 wrapped one."""
    text = str(error) or type(error).__name__
    inner = re.search(r"(\[Errno -?\d+\][^'\")]*|timed out|Connection refused|Connection reset by peer)", text)
    if inner:
        return inner.group(1).strip()
    return text if len(text) <= 300 else text[:300] + "..."
