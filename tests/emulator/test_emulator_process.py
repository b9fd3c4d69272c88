"""spawn_emulator: the emulator in its own process, as the benchmarks use it."""

from __future__ import annotations

import sys

import pytest
import requests

from airflow_provider_fal.emulator.process import spawn_emulator


def test_spawned_emulator_serves_with_the_given_key_and_options():
    process, url = spawn_emulator("spawn-key-9b1", "--latency", "0")
    try:
        assert "spawn-key-9b1" not in " ".join(process.args), "the key is not on the command line"
        ok = requests.post(
            f"{url}/emulator/echo", json={"a": 1}, headers={"Authorization": "Key spawn-key-9b1"}, timeout=10
        )
        assert ok.status_code == 200 and ok.json() == {"a": 1}
        denied = requests.post(f"{url}/emulator/echo", json={}, headers={"Authorization": "Key other"}, timeout=10)
        assert denied.status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_failed_start_is_reported_with_the_emulators_error():
    with pytest.raises(RuntimeError, match=r"(?s)did not start.*--no-such-option"):
        spawn_emulator("k3y-long", "--no-such-option", python=sys.executable, startup_timeout=20)
