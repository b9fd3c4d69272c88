"""spawn_emulator: the emulator in its own process, as the benchmarks use it."""

from __future__ import annotations

import sys
import tempfile
import urllib.error

import pytest
import requests

from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """tempfile's directory for this test alone, to see what spawn_emulator leaves there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_spawned_emulator_serves_with_the_given_key_and_options(own_tempdir):
    process, url = spawn_emulator("spawn-key-9b1", "--latency", "0")
    assert list(own_tempdir.iterdir()) == []  # the startup handshake's directory is gone
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


def test_a_failed_start_is_reported_with_the_emulators_error(own_tempdir):
    with pytest.raises(RuntimeError, match=r"(?s)did not start.*--no-such-option"):
        spawn_emulator("k3y-long", "--no-such-option", python=sys.executable, startup_timeout=20)
    assert list(own_tempdir.iterdir()) == []


def test_emulator_control_sets_and_reads_over_http(own_tempdir):
    process, url = spawn_emulator("spawn-key-c7e")
    try:
        assert emulator_control(url, "spawn-key-c7e", "concurrency-limit", {"limit": 0}) == {"ok": True}
        refused = requests.post(f"{url}/emulator/echo", json={}, headers={"Authorization": "Key spawn-key-c7e"})
        assert refused.status_code == 429  # the limit set through emulator_control holds
        assert [record["status"] for record in emulator_control(url, "spawn-key-c7e", "requests")] == [429]
        with pytest.raises(urllib.error.HTTPError):
            emulator_control(url, "other-key", "requests")
    finally:
        process.terminate()
        process.wait(timeout=10)
