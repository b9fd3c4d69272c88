"""The emulator's listening socket and its serving thread, which can go away for a while.

An outage closes the listening socket (new connections are refused, as when fal's hosts are
unreachable) and shuts every open connection, then listens again on the same port. The
emulator's state (queued and running requests, files, records) lives elsewhere and is kept:
requests keep running through the outage, as fal's do while a client cannot reach it.
"""

from __future__ import annotations

import threading

from .host import EmulatorHost
from .server import EmulatorHTTPServer, logger

#: Seconds between the control call that starts an outage and the listener closing, so that
#: call still gets its answer.
OUTAGE_GRACE = 0.2


class Listener:
    """Serves ``emulator`` on ``host:port`` in a daemon thread until :meth:`close`."""

    def __init__(self, emulator: EmulatorHost, host: str, port: int) -> None:
        self._emulator = emulator
        self._host = host
        self._server = self._serve(port)
        self._serving = True
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._outage: threading.Thread | None = None

    def _serve(self, port: int) -> EmulatorHTTPServer:
        server = EmulatorHTTPServer((self._host, port), self._emulator)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fal-emulator", daemon=True
        )
        thread.start()
        server.serving_thread = thread  # type: ignore[attr-defined]
        return server

    @staticmethod
    def _shut(server: EmulatorHTTPServer) -> None:
        server.shutdown()
        server.close_connections()
        server.server_close()
        server.serving_thread.join(timeout=5)  # type: ignore[attr-defined]

    @property
    def offline(self) -> bool:
        """Whether an outage is under way (connections are refused)."""
        return self._outage is not None and self._outage.is_alive()

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds`` (starting :data:`OUTAGE_GRACE` from now), then serve again."""
        with self._lock:
            if self.offline:
                raise ValueError("an outage is already under way")
            self._outage = threading.Thread(
                target=self._go_away, args=(seconds,), name="fal-emulator-outage", daemon=True
            )
            self._outage.start()

    def _go_away(self, seconds: float) -> None:
        if self._closed.wait(OUTAGE_GRACE):
            return
        with self._lock:
            if self._closed.is_set():
                return
            self._shut(self._server)
            self._serving = False
        logger.info("outage: port %d refuses connections for %.1fs", self.port, seconds)
        if self._closed.wait(seconds):
            return
        with self._lock:
            if not self._closed.is_set():
                self._server = self._serve(self.port)
                self._serving = True
        logger.info("outage over: port %d serves again", self.port)

    def close(self) -> None:
        """Stop serving for good (also during an outage) and close every open connection."""
        with self._lock:
            self._closed.set()
            if self._serving:
                self._shut(self._server)
                self._serving = False
        if self._outage is not None:
            self._outage.join(timeout=5)
