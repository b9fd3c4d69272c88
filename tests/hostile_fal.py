"""A small adversarial stand-in for fal (and for the hosts its results point at), for tests.

The bundled emulator behaves as fal documents; this server behaves as fal never should but a
broken proxy, a hostile network path or a malicious result might: it answers garbage, trickles
bytes, sends endless bodies, redirects to other hosts and schemes, and reflects what it was
sent. Each test scripts the answers per path and reads back what was asked.

    with HostileFal() as hostile:
        hostile.answer("GET", "/secret", Answer(body=b"internal"))
        hostile.answer("POST", "/fal-ai/model", Answer(status=307, headers={"Location": "http://evil/"}))
        ... hostile.url("/fal-ai/model") ...
        hostile.hits("POST", "/fal-ai/model")
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    """One scripted answer.

    ``trickle``: send the body one byte every this many seconds. ``endless``: after ``body``,
    keep sending zero bytes in chunks until the client hangs up (no Content-Length).
    ``length``: the Content-Length to announce (default: the body's; None with ``endless``).
    ``reflect``: append the request's headers to the body (as a JSON ``detail``), as a careless
    proxy's error page might.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    trickle: float | None = None
    endless: bool = False
    reflect: bool = False
    length: int | None = None


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HostileFal:
    """A threaded HTTP server on 127.0.0.1 answering from per-path scripts (the last answer repeats)."""

    def __init__(self) -> None:
        self._scripts: dict[tuple[str, str], list[Answer]] = {}
        self._hits: dict[tuple[str, str], list[Hit]] = defaultdict(list)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def answer(self, method: str, path: str, *answers: Answer) -> None:
        """Script the answers of ``method path`` (a path without its query string)."""
        with self._lock:
            self._scripts[(method, path)] = list(answers)

    def hits(self, method: str, path: str) -> list[Hit]:
        with self._lock:
            return list(self._hits[(method, path)])

    def __enter__(self) -> HostileFal:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_answer(self, method: str, path: str, hit: Hit) -> Answer:
        with self._lock:
            self._hits[(method, path)].append(hit)
            script = self._scripts.get((method, path))
            if not script:
                return Answer(status=404, body=b'{"detail": "not scripted"}')
            return script.pop(0) if len(script) > 1 else script[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _serve(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                path = self.path.split("?", 1)[0]
                hit = Hit(self.command, path, dict(self.headers.items()), body)
                answer = hostile._next_answer(self.command, path, hit)
                if answer.reflect:
                    detail = json.dumps({"detail": f"bad request, you sent {hit.headers}"}).encode()
                    answer = Answer(answer.status, detail, answer.headers)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._write(answer)

            def _write(self, answer: Answer) -> None:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.endless:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    length = answer.length if answer.length is not None else len(answer.body)
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if answer.trickle is not None:
                    for byte in answer.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(answer.trickle)
                else:
                    self.wfile.write(answer.body)
                if answer.endless:
                    chunk = b"\0" * 65536
                    while True:
                        self.wfile.write(chunk)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler
