"""HTTP plumbing: a threading HTTP/1.1 keep-alive server and its request handler.

The handler reads the whole request, hands a :class:`Request` to the control API
or the gateway, and writes the :class:`Response` back (a JSON body, a streamed
file, server-sent events, or nothing at all when a fault drops the connection).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .host import CONTROL_PREFIX, EmulatorHost
from .messages import Request, Response, error
from .state import FileEntry, RequestRecord

logger = logging.getLogger("airflow_provider_fal.emulator")

MAX_BODY = 256 * 1024 * 1024
IDLE_TIMEOUT = 120.0  # seconds an idle keep-alive connection (or a stalled socket) is kept
DEFAULT_SLOW_RATE = 64 * 1024
REDACTED = "***"
MIN_REDACTED_LENGTH = 4  # shorter keys ("k") would mangle every record and protect nothing


class EmulatorHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads, a deep backlog and tracking of open connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], emulator: EmulatorHost) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, EmulatorHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up between requests (reset, broken pipe) is routine, e.g. a download
        # abandoned on purpose; socketserver would print a traceback for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open client connection (idle keep-alive ones included)."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class EmulatorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fal-emulator"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: EmulatorHTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return self.server_version

    # BaseHTTPRequestHandler logs every request line to stderr; the emulator logs its own way.
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # ------------------------------------------------------------------ request

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    raise ValueError("request body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValueError("bad Content-Length")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client gave up mid-body: nothing of it is taken, as on a real server
            raise ValueError(f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _handle(self) -> None:
        emu = self.server.emulator
        started, clock = time.time(), time.monotonic()
        split = urlsplit(self.path)
        path = split.path or "/"
        request = Request(
            method=self.command,
            path=path,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers=list(self.headers.items()),
            body=b"",
        )
        recorded = False

        def record(status: int | None) -> None:
            nonlocal recorded
            if not recorded and not path.startswith(CONTROL_PREFIX):
                emu._finished(request, status, started, time.monotonic() - clock)
            recorded = True

        try:
            try:
                request.body = self._read_body()
            except ValueError as exc:
                self.close_connection = True
                response = error(400, str(exc))
            else:
                response = emu.respond(request)
            # recorded before answering: a client that has its answer always finds the record
            record(None if response.drop else response.status)
            self._send(response)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            record(None)
        except Exception:  # a bug in the emulator: answer 500 rather than hang the client
            logger.exception("fal emulator: error while handling %s %s", self.command, path)
            self.close_connection = True
            if not recorded:  # nothing sent yet
                record(500)
                with contextlib.suppress(OSError):
                    self._send(error(500, "Internal emulator error", "internal_error"))

    # ------------------------------------------------------------------ response

    def _start(self, status: int, content_type: str, headers: list[tuple[str, str]], length: int | None) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Client Closed Request" if status == 499 else ""
        self.send_response(status, phrase)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        names = {name.lower() for name, _ in headers}
        # fal's gateway names every request it answers; a proxy's HTML error page before it does not.
        if "x-fal-request-id" not in names and not content_type.startswith("text/html"):
            self.send_header("x-fal-request-id", str(uuid.uuid4()))
        for name, value in headers:
            self.send_header(name, value)
        if length is None:
            self.send_header("Connection", "close")
            self.send_header("Cache-Control", "no-cache")
            self.close_connection = True
        self.end_headers()

    def _send(self, response: Response) -> int | None:
        if response.drop:
            self.close_connection = True
            return None
        if response.file is not None:
            return self._send_file(response, response.file)
        if response.events is not None:
            self._start(response.status, response.content_type, response.headers, None)
            for event in response.events:
                self.wfile.write(event)
                self.wfile.flush()
            return response.status
        content_type = response.content_type
        if content_type.startswith("text/") and "charset" not in content_type:
            content_type += "; charset=utf-8"
        self._start(response.status, content_type, response.headers, len(response.body))
        if self.command != "HEAD":
            self.wfile.write(response.body)
        return response.status

    def _send_file(self, response: Response, entry: FileEntry) -> int:
        emu = self.server.emulator
        length = entry.content_length()
        self._start(response.status, entry.content_type, response.headers, length)
        if self.command == "HEAD":
            return response.status
        with emu.state.lock:
            mode, rate = emu.state.file_fault, emu.state.file_fault_rate
        limit = length // 2 if mode == "truncate" else length
        rate = rate or DEFAULT_SLOW_RATE
        sent = 0
        for chunk in entry.chunks():
            if sent >= limit:
                break
            chunk = chunk[: limit - sent]
            if mode == "slow":
                piece = max(1, int(rate / 10))
                for offset in range(0, len(chunk), piece):
                    part = chunk[offset : offset + piece]
                    self.wfile.write(part)
                    self.wfile.flush()
                    if emu.wait(len(part) / rate):
                        break
            else:
                self.wfile.write(chunk)
            sent += len(chunk)
        if mode == "truncate":
            self.wfile.flush()
            self.close_connection = True
        return response.status


@functools.lru_cache(maxsize=16)
def secret_forms(secret: str) -> tuple[str, ...]:
    """``secret`` and the base64 runs any base64 text holding it contains, longest first.

    A key inside base64 (``Basic`` credentials, a ``data:`` URI, a token) is encoded differently
    depending on where it starts within a 3-byte group; for each of the three alignments, the
    characters that depend on the key's bytes alone are a run every such encoding contains. Both
    the standard and the URL-safe alphabets are covered. Empty when ``secret`` is too short.
    """
    if len(secret) < MIN_REDACTED_LENGTH:
        return ()
    raw = secret.encode("utf-8")
    forms = {secret}
    for offset, start in ((0, 0), (1, 2), (2, 3)):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        total = offset + len(raw)
        run = encoded[start : 4 * (total // 3) + total % 3]
        if len(run) >= MIN_REDACTED_LENGTH:
            forms.update((run, run.translate(URL_SAFE)))
    return tuple(sorted(forms, key=len, reverse=True))


URL_SAFE = str.maketrans("+/", "-_")


def redact(value: Any, secret: str) -> Any:
    """``value`` with every occurrence of ``secret`` (or of a base64 form of it) in its strings replaced."""
    forms = secret_forms(secret)
    if not forms:
        return value
    if isinstance(value, str):
        for form in forms:
            if form in value:
                value = value.replace(form, REDACTED)
        return value
    if isinstance(value, dict):
        return {redact(k, secret): redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    return value


def make_record(request: Request, status: int | None, started: float, duration: float, secret: str) -> RequestRecord:
    """A record of ``request`` with the Authorization header removed and the key, and its base64
    forms, redacted everywhere."""
    headers = {name: value for name, value in request.headers if name.lower() != "authorization"}
    body = request.json_or_none()
    record = RequestRecord(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        headers=headers,
        json=body,
        status=status,
        started=started,
        finished=started + duration,
    )
    raw = (request.path, str(request.query), str(headers))
    forms = secret_forms(secret)
    leaked = any(form in part or form.encode("utf-8") in request.body for form in forms for part in raw)
    if leaked:
        record = RequestRecord(
            method=record.method,
            path=redact(record.path, secret),
            query=redact(record.query, secret),
            headers=redact(record.headers, secret),
            json=redact(record.json, secret),
            status=status,
            started=started,
            finished=record.finished,
        )
    return record
