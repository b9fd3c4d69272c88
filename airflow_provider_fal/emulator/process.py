"""Run the emulator in a separate process, e.g. so that a benchmark does not count its CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def spawn_emulator(
    api_key: str, *cli_args: str, python: str = sys.executable, startup_timeout: float = 30.0
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m airflow_provider_fal.emulator --port 0`` and wait until it listens.

    ``cli_args`` are further CLI options, e.g. ``("--latency", "0.1")``. The key travels in
    the environment (``FAL_EMULATOR_KEY``), not on the command line. Returns the process
    (the caller stops it) and the emulator's base URL. The temporary directory of the startup
    handshake is removed before returning; the emulator's stderr after startup is discarded.
    """
    with tempfile.TemporaryDirectory(prefix="fal-emulator-") as name:  # removed once started (or not)
        workdir = Path(name)
        ready = workdir / "ready"
        with (workdir / "stderr").open("wb") as stderr:
            process = subprocess.Popen(
                [python, "-m", "airflow_provider_fal.emulator", "--port", "0", "--ready-file", str(ready), *cli_args],
                env={**os.environ, "FAL_EMULATOR_KEY": api_key},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + startup_timeout
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                detail = (workdir / "stderr").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the fal emulator did not start: {detail}")
            time.sleep(0.05)
        return process, ready.read_text().strip()


def emulator_control(url: str, api_key: str, route: str, body: dict | None = None, *, timeout: float = 30.0) -> Any:
    """Call the control API of the emulator at ``url``: GET ``/_emulator/<route>`` without
    ``body``, else POST ``body`` as JSON; returns the decoded answer (an HTTP error raises)."""
    request = urllib.request.Request(
        f"{url}/_emulator/{route}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Key {api_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read() or b"null")
