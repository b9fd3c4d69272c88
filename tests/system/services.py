"""The services around Airflow in a system test, each a real process on this machine.

PostgreSQL (a throw-away cluster run by an unprivileged user), Redis (the Celery broker), moto
in server mode (S3) and the fal emulator. Each has its own log file under the deployment's
directory; ``stop()`` ends it and is safe to call twice.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from airflow_provider_fal.emulator.process import emulator_control

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def ensure_packages() -> str | None:
    """Install PostgreSQL and Redis with apt-get when they are missing; returns why not, or None."""
    if postgres_bin() and shutil.which("redis-server"):
        return None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "PostgreSQL/redis-server are missing and apt-get (as root) is not available to install them"
    result = subprocess.run(["bash", str(HERE / "install_services.sh")], capture_output=True, text=True)
    if result.returncode != 0 or not (postgres_bin() and shutil.which("redis-server")):
        return f"installing postgresql and redis-server failed: {result.stdout[-1500:]}{result.stderr[-1500:]}"
    return None


def log_tails(workdir: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of every service and component log in ``workdir``, each under its name."""
    parts = []
    for log in sorted(workdir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
    return "\n".join(parts)


class Service:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.log_start = 0  # where the latest start's output begins in the (appended) log

    def spawn(self, command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        with self.log.open("ab") as log:
            self.log_start = log.tell()
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or os.environ.copy(),
                cwd=self.workdir,
                start_new_session=True,  # its own process group: kill() takes its children too
                **kwargs,
            )
        return self.process

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_logged(self, marker: str, timeout: float = 120) -> None:
        """Wait until the latest start's log contains ``marker``; a process that exits first, or a
        marker that never comes, fails at once with the end of that log (a Celery worker that dies at
        import would otherwise surface as tasks stuck in the queue for minutes, test after test)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.log.open("rb") as log:
                log.seek(self.log_start)
                output = log.read().decode(errors="replace")
            if marker in output:
                return
            if not self.running:
                code = None if self.process is None else self.process.returncode
                problem = f"exited with {code}"
            elif time.monotonic() >= deadline:
                problem = f"did not log {marker!r} within {timeout} s"
            else:
                time.sleep(0.2)
                continue
            tail = "\n".join(output.splitlines()[-30:])
            raise RuntimeError(f"{self.name} {problem}; the end of its log ({self.log}):\n{tail}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a lost machine would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        self.kill()  # what is left of its group


class Postgres(Service):
    """A cluster in ``workdir/pgdata``; as root it is run by ``nobody`` (Postgres refuses root)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("postgres", workdir)
        self.bin = postgres_bin()
        self.port = free_port()
        self.data = workdir / "pgdata"
        self.user = {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}

    @property
    def dsn(self) -> str:
        return f"airflow@127.0.0.1:{self.port}/airflow"

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.workdir, **self.user)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")

    def start(self) -> None:
        if self.user:
            self.data.mkdir(exist_ok=True)
            shutil.chown(self.data, "nobody", "nogroup")
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "airflow", "--auth=trust", "-E", "UTF8")
        options = ["-p", str(self.port), "-k", str(self.data), "-c", "listen_addresses=127.0.0.1"]
        options += ["-c", "fsync=off", "-c", "max_connections=200", "-c", "full_page_writes=off"]
        self.spawn([str(self.bin / "postgres"), "-D", str(self.data), *options], **self.user)
        wait_for_port(self.port, self.process, "postgres")
        deadline = time.monotonic() + 30
        while True:  # listening is not accepting: wait until a query works
            try:
                self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow",
                          "-d", "postgres", "-c", "select 1")  # fmt: skip
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if not getattr(self, "_created", False):
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", "airflow")
            self._created = True

    def stop(self, timeout: float = 30) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def query(self, sql: str, *args: object) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(f"postgresql://{self.dsn}") as db, db.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()


class Redis(Service):
    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)
        self.port = free_port()

    def start(self) -> None:
        command = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        self.spawn([*command, "--save", "", "--appendonly", "no", "--dir", str(self.workdir)])
        wait_for_port(self.port, self.process, "redis-server")


class Moto(Service):
    def __init__(self, workdir: Path) -> None:
        super().__init__("moto", workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])
        wait_for_port(self.port, self.process, "moto")

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        )  # fmt: skip


class Emulator(Service):
    """``python -m airflow_provider_fal.emulator`` on a fixed port, driven through its control API."""

    def __init__(self, workdir: Path, api_key: str) -> None:
        super().__init__("fal-emulator", workdir)
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.queue_url = f"{self.url}/queue"

    def start(self) -> None:
        command = [sys.executable, "-m", "airflow_provider_fal.emulator", "--port", str(self.port)]
        self.spawn(command, env={**os.environ, "FAL_EMULATOR_KEY": self.api_key})
        wait_for_port(self.port, self.process, "the fal emulator")

    def control(self, route: str, body: dict | None = None):
        return emulator_control(self.url, self.api_key, route, body)

    def requests(self) -> list[dict]:
        return self.control("requests")

    def submits(self, prompt_prefix: str) -> dict[str, int]:
        """Prompt -> number of POSTs (sync runs and queue submits) carrying it."""
        counts: dict[str, int] = {}
        for record in self.requests():
            prompt = (record["json"] or {}).get("prompt") if isinstance(record["json"], dict) else None
            if record["method"] == "POST" and isinstance(prompt, str) and prompt.startswith(prompt_prefix):
                counts[prompt] = counts.get(prompt, 0) + 1
        return counts

    def fetch(self, url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.read()
