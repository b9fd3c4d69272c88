"""Helpers of the browser test: the system Chromium, a real Airflow API server, the UI's pieces.

Nothing here downloads a browser: Playwright (a pip package) drives Debian's Chromium at
``/usr/bin/chromium``; ``install_browser.sh`` installs either where it is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests

CHROMIUM = "/usr/bin/chromium"
#: Flags for a quiet, offline, sandbox-free headless Chromium (the test runs as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_SCRIPT = Path(__file__).with_name("install_browser.sh")
AIRFLOW_VERSION = importlib.metadata.version("apache-airflow")
#: uvicorn's message when the port it was given is taken.
ADDRESS_IN_USE = "address already in use"
#: Bounds for the UI: generous, for a loaded 2-core machine (milliseconds).
UI_TIMEOUT = 60_000
NAVIGATION_TIMEOUT = 120_000


class ApiServerNotReady(RuntimeError):
    """The API server did not become ready in time (a timeout; the test may retry once)."""


class ServerUnreachable(RuntimeError):
    """The browser's first request to a server said ready was refused (the test may retry once)."""


def browser_ready() -> bool:
    return os.access(CHROMIUM, os.X_OK) and importlib.util.find_spec("playwright") is not None


def ensure_browser() -> str | None:
    """Make Chromium and Playwright available; ``None`` when ready, else why they cannot be."""
    if browser_ready():
        return None
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), sys.executable],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not run {INSTALL_SCRIPT.name}: {error}"
    importlib.invalidate_caches()
    if result.returncode != 0 or not browser_ready():
        output = (result.stdout + result.stderr).strip()[-600:]
        return f"{INSTALL_SCRIPT.name} could not install Chromium and Playwright (exit {result.returncode}): {output}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiServer:
    """``airflow api-server`` on 127.0.0.1 in its own process group; stopped with :meth:`stop`."""

    env: dict[str, str]
    cwd: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    admin_password: str = ""
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0, port_attempts: int = 3) -> ApiServer:
        """Start the server and wait until it is ready (see :meth:`unready`).

        The port comes from :func:`free_port`, which releases it again: until uvicorn binds it
        (after importing the whole app, a minute on a loaded machine) any process may take it.
        Then the server exits with "address already in use"; start again on another port.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(1, port_attempts + 1):
            if attempt > 1:
                self.port = free_port()
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(attempt)
            if self._wait_ready(deadline):
                return self
            if ADDRESS_IN_USE not in self.log_path.read_bytes()[log_start:].decode(errors="replace"):
                raise RuntimeError(f"airflow api-server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        raise RuntimeError(f"airflow api-server found no free port in {port_attempts} attempts:\n{self.log()[-4000:]}")

    def _spawn(self, attempt: int) -> None:
        with self.log_path.open("ab") as log:
            if attempt > 1:
                log.write(f"\n=== attempt {attempt}: port {self.port} ===\n".encode())
                log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(self.port), "-w", "1"],
                env=self.env,
                cwd=str(self.cwd),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, deadline: float) -> bool:
        """``True`` once ready, ``False`` if the process exited; :class:`ApiServerNotReady` at the deadline."""
        missing = "nothing checked yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            missing = self.unready()
            if missing is None:
                return True
            time.sleep(0.5)
        self.stop()
        raise ApiServerNotReady(f"airflow api-server not ready in time ({missing}):\n{self.log()[-4000:]}")

    def unready(self) -> str | None:
        """What the server still lacks to serve the UI, or ``None`` when it is ready.

        Ready means: this process (not whoever else holds the port) listens on it, the
        health endpoint reports a healthy metadata DB, ``/api/v2/version`` names the Airflow
        this test imports, and the UI's ``/`` page answers with its HTML.
        """
        if not self.owns_port():
            return f"no process of the api-server listens on port {self.port}"
        try:
            health = requests.get(f"{self.url}/api/v2/monitor/health", timeout=10)
            if health.status_code != 200 or health.json().get("metadatabase", {}).get("status") != "healthy":
                return f"/api/v2/monitor/health answered {health.status_code}: {health.text[:200]}"
            answer = requests.get(f"{self.url}/api/v2/version", timeout=10)
            if answer.status_code != 200 or answer.json().get("version") != AIRFLOW_VERSION:
                return f"/api/v2/version answered {answer.status_code}: {answer.text[:200]}"
            page = requests.get(f"{self.url}/", timeout=10)
            if page.status_code != 200 or 'id="root"' not in page.text:
                return f"/ answered {page.status_code}: {page.text[:200]}"
        except (requests.RequestException, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    def owns_port(self) -> bool:
        """Whether the server process (or a child of it) listens on :attr:`port`."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == self.port:
                        return True
        except psutil.Error:
            return False
        return False

    def stop(self) -> None:
        """Terminate the server and its workers (its own process group, by id)."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Traffic:
    """What the browser exchanged with the API server, and what it was kept from reaching."""

    bodies: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    #: ``(method, path, status)`` of every answer from the API server, in order of arrival.
    answers: list[tuple[str, str, int]] = field(default_factory=list)

    def record(self, response: Any) -> None:
        if "/api/" in response.url or "/ui/" in response.url:
            self.answers.append((response.request.method, urlsplit(response.url).path, response.status))
            with contextlib.suppress(Exception):  # redirects and aborted requests have no body
                self.bodies.append(f"{response.request.method} {response.url} {response.status}\n{response.text()}")

    def guard(self, route: Any) -> None:
        """Let requests to this machine through; abort anything else (the test is offline)."""
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def containing(self, text: str) -> list[str]:
        return [body.split("\n", 1)[0] for body in self.bodies if text in body]

    def mark(self) -> int:
        """A position in :attr:`answers`; :meth:`wait_answered` looks at answers after it."""
        return len(self.answers)

    def wait_answered(self, page: Any, since: int, *paths: str, timeout: float = UI_TIMEOUT) -> None:
        """Wait until each ``GET`` of ``paths`` has been answered 200 since ``since`` (a :meth:`mark`)."""
        deadline = time.monotonic() + timeout / 1000
        while True:
            seen = {path for method, path, status in self.answers[since:] if method == "GET" and status == 200}
            missing = [path for path in paths if path not in seen]
            if not missing:
                return
            if time.monotonic() > deadline:
                answered = [f"{m} {p} {s}" for m, p, s in self.answers[since:]]
                raise playwright_timeout(f"no 200 answer to {missing} within {timeout:g} ms; answers: {answered}")
            page.wait_for_timeout(100)  # lets Playwright deliver the response events


def playwright_timeout(message: str) -> Exception:
    return importlib.import_module("playwright.sync_api").TimeoutError(message)


#: Keeps the text of every toast the page shows, in order, in ``window.__toasts``: Airflow's
#: toasts close after about 2 s, which a loaded machine can let pass before the test looks.
TOAST_RECORDER = """
(() => {
  const seen = (window.__toasts = []);
  const index = new Map();
  const scan = () => {
    for (const el of document.querySelectorAll('[data-scope="toast"][data-part="root"]')) {
      if (!index.has(el)) { index.set(el, seen.length); seen.push(""); }
      const text = el.innerText;
      if (text) seen[index.get(el)] = text;
    }
  };
  new MutationObserver(scan).observe(document, { subtree: true, childList: true, characterData: true });
})();
"""


@contextlib.contextmanager
def chromium_page(traffic: Traffic, width: int = 1200, height: int = 860) -> Iterator[Any]:
    """A Playwright page in the system Chromium, offline but for 127.0.0.1."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    sync_api = importlib.import_module("playwright.sync_api")
    sync_api.expect.set_options(timeout=UI_TIMEOUT)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.route("**/*", traffic.guard)
            context.add_init_script(TOAST_RECORDER)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT)
            page.set_default_navigation_timeout(NAVIGATION_TIMEOUT)
            page.on("response", traffic.record)
            yield page
        finally:
            browser.close()


def sign_in(page: Any, base_url: str, username: str, password: str) -> None:
    """Log in through the simple auth manager's login page."""
    sync_api = importlib.import_module("playwright.sync_api")
    try:
        page.goto(f"{base_url}/")
    except sync_api.Error as error:
        if "ERR_CONNECTION_REFUSED" in str(error):
            raise ServerUnreachable(f"the API server said ready, then refused the browser: {error}") from error
        raise
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base_url}/")


#: What the connections page asks the API server for before its list and form are complete.
CONNECTIONS_PAGE_CALLS = ("/ui/connections/hook_meta", "/api/v2/connections")


def open_connections(page: Any, traffic: Traffic) -> None:
    """Admin -> Connections, through the navigation menu; returns once its data has arrived."""
    since = traffic.mark()
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("menuitem", name="Connections").click()
    page.get_by_role("button", name="Add Connection").wait_for()
    traffic.wait_answered(page, since, *CONNECTIONS_PAGE_CALLS)


def reload_connections(page: Any, traffic: Traffic) -> None:
    since = traffic.mark()
    page.reload()
    page.get_by_role("button", name="Add Connection").wait_for()
    traffic.wait_answered(page, since, *CONNECTIONS_PAGE_CALLS)


def connection_row(page: Any, conn_id: str) -> Any:
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=conn_id, exact=True))


def toast_mark(page: Any) -> int:
    """How many toasts the page has shown so far (since its last load)."""
    return int(page.evaluate("window.__toasts.length"))


def toasts_shown(page: Any) -> list[str]:
    return list(page.evaluate("window.__toasts"))


def wait_toast(page: Any, title: str, text: str, since: int = 0) -> str:
    """The whole text of the toast titled ``title`` that says ``text``, shown after ``since``.

    Reads what :data:`TOAST_RECORDER` kept, so a toast counts even if it has closed already.
    """
    found = page.wait_for_function(
        "([title, text, since]) => window.__toasts.slice(since).find((t) => t.includes(title) && t.includes(text))",
        arg=[title, text, since],
    )
    return str(found.json_value())


def wait_no_toasts(page: Any, timeout: float = UI_TIMEOUT) -> None:
    """Wait until no toast is on screen.

    A toast closes by itself about 2 s after it opens, but not while the pointer rests on
    it (it is then ``data-paused``), and a press of a button below a toast can leave the
    pointer there. Moving the pointer to an empty corner resumes it. (Airflow shows no close
    button on these toasts: it renders one only for toasts created as closable.)
    """
    page.mouse.move(0, 0)
    sync_api = importlib.import_module("playwright.sync_api")
    sync_api.expect(page.get_by_role("status")).to_have_count(0, timeout=timeout)


def field_labels(dialog: Any) -> list[str]:
    return [" ".join(text.replace("*", " ").split()) for text in dialog.locator("label").all_inner_texts()]


def helper_texts(dialog: Any) -> list[str]:
    return [text.strip() for text in dialog.locator('[data-part="helper-text"]').all_inner_texts()]
