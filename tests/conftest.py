"""Shared fixtures: a throwaway Airflow home, the fal emulator, and real DAG runs.

Airflow reads its configuration at import time, so the environment is set up here, before
any test module imports Airflow. Each pytest session gets a fresh ``AIRFLOW_HOME`` with a
SQLite metadata DB migrated once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DAGS = REPO / "example_dags"
API_KEY = "test-key-7f3a9c"  # the emulator's key; tests also check it never leaks

_HOME = Path(tempfile.mkdtemp(prefix="fal-airflow-home-"))
_DAGS = _HOME / "dags"
_DAGS.mkdir()
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(_DAGS),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    # The OpenLineage provider is installed for tests/test_lineage.py, which turns it on for its run.
    "AIRFLOW__OPENLINEAGE__DISABLED": "True",
}
os.environ.update(AIRFLOW_ENV)
_AIRFLOW_VERSION = tuple(int(part) for part in version("apache-airflow").split(".")[:2])
#: ``airflow dags test`` parses the DAG folder itself from 3.3 on; older releases read the DAG
#: from the metadata DB, so it has to be serialized there first.
DAGS_TEST_NEEDS_RESERIALIZE = _AIRFLOW_VERSION < (3, 3)
os.environ.pop("FAL_KEY", None)  # tests decide themselves whether FAL_KEY is set


def airflow_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, merge_output: bool = False
) -> subprocess.CompletedProcess:
    """Run ``airflow <args>`` in the test Airflow home; output is captured as text.

    With ``merge_output``, stderr goes into stdout in the order it was written (unbuffered), as
    a terminal shows it: Airflow 3.1 prints task logs and ``dags test`` markers on different streams.
    """
    full_env = {**os.environ, **AIRFLOW_ENV, **(env or {})}
    if merge_output:
        full_env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=str(_HOME),
    )


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the metadata DB once per session; returns the Airflow home."""
    result = airflow_cli("db", "migrate")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _HOME


@pytest.fixture(scope="session")
def emulator_server():
    from airflow_provider_fal.emulator import FalEmulator

    with FalEmulator(api_key=API_KEY) as emu:
        yield emu


@pytest.fixture
def emulator(emulator_server):
    """The session's emulator, reset to a clean state for each test."""
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


def connection_json(emu, api_key: str = API_KEY, **extra: object) -> str:
    return json.dumps(
        {
            "conn_type": "fal",
            "host": emu.url,
            "password": api_key,
            "extra": {"queue_url": emu.queue_url, "api_url": emu.url, "rest_url": emu.url, "cdn_url": emu.url, **extra},
        }
    )


@pytest.fixture
def fal_connection(emulator, monkeypatch) -> str:
    """``fal_default`` pointing at the emulator, through ``AIRFLOW_CONN_FAL_DEFAULT``."""
    value = connection_json(emulator)
    monkeypatch.setenv("AIRFLOW_CONN_FAL_DEFAULT", value)
    return value


@dataclass
class DagRunResult:
    returncode: int
    output: str

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and "state=success" in self.output


@pytest.fixture
def run_dag(airflow_db, tmp_path):
    """Run a DAG for real with ``airflow dags test`` and return its exit code and log.

    ``source`` is DAG file text (dedented) or a path to copy into the dags folder.
    """
    written: list[Path] = []

    def run(dag_id: str, source: str | Path, *, env: dict[str, str] | None = None, conf: dict | None = None):
        target = _DAGS / f"{dag_id}.py"
        if isinstance(source, Path):
            shutil.copy(source, target)
        else:
            target.write_text(textwrap.dedent(source))
        written.append(target)
        if DAGS_TEST_NEEDS_RESERIALIZE:
            reserialize = airflow_cli("dags", "reserialize", env=env)
            assert reserialize.returncode == 0, reserialize.stderr[-3000:]
        args = ["dags", "test", dag_id]
        if conf is not None:
            args += ["--conf", json.dumps(conf)]
        result = airflow_cli(*args, env=env, merge_output=True)
        return DagRunResult(result.returncode, result.stdout)

    yield run
    for path in written:
        path.unlink(missing_ok=True)


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes; returns its last value.

    The emulator records a request when it has answered it, which can be a moment after the
    client gave up on it.
    """
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return bool(result)


def refuses_connections(port: int) -> bool:
    """Whether 127.0.0.1:``port`` refuses a TCP connection (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # the listener closed while this connection waited in its backlog: ask again
    return False


@pytest.fixture
def logs(caplog, capsys):
    """Everything logged during a test: stdlib logging and Airflow's structlog console output."""
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        captured = capsys.readouterr()
        return caplog.text + captured.out + captured.err

    return read


@pytest.fixture
def out_file(tmp_path) -> Iterator[Path]:
    """A file a DAG's downstream task writes what it received to."""
    yield tmp_path / "received.json"
