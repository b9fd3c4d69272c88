"""An outage: the emulator's port refuses connections for a while, then serves again with its state kept."""

from __future__ import annotations

import time

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator
from airflow_provider_fal.emulator.listener import OUTAGE_GRACE
from tests.conftest import refuses_connections as refused
from tests.conftest import wait_until

KEY = "test-key-outage"
AUTH = {"Authorization": f"Key {KEY}"}


@pytest.fixture
def emu():
    with FalEmulator(api_key=KEY) as emulator:
        yield emulator


def test_the_port_refuses_connections_then_serves_the_same_queue_again(emu):
    emu.set_queue_timing(run_time=1.0)
    session = requests.Session()  # a keep-alive connection open before the outage
    submitted = session.post(f"{emu.queue_url}/fal-ai/fast-sdxl", json={"prompt": "p"}, headers=AUTH).json()
    emu.refuse_connections(1.5)
    assert not refused(emu.port)  # the grace period: the call that asked for it gets its answer
    assert wait_until(lambda: refused(emu.port))
    with pytest.raises(requests.ConnectionError):
        session.get(submitted["status_url"], headers=AUTH, timeout=5)
    assert wait_until(lambda: not refused(emu.port))
    status = session.get(submitted["status_url"], headers=AUTH, timeout=5).json()
    assert status["status"] == "COMPLETED"  # it ran on through the outage
    result = session.get(submitted["response_url"], headers=AUTH, timeout=5)
    assert result.status_code == 200 and result.json()["images"]
    assert emu.count(method="POST", path_prefix="/queue/") == 1


def test_an_outage_over_the_control_api(emu):
    answer = requests.post(f"{emu.url}/_emulator/outage", json={"seconds": 0.5}, headers=AUTH, timeout=5)
    assert answer.status_code == 200 and answer.json() == {"ok": True}
    assert wait_until(lambda: refused(emu.port))
    assert wait_until(lambda: not refused(emu.port))
    assert requests.get(f"{emu.url}/_emulator/health", timeout=5).ok


def test_one_outage_at_a_time_and_bad_durations_are_refused(emu):
    with pytest.raises(ValueError, match="seconds"):
        emu.refuse_connections(-1)
    emu.refuse_connections(0.5)
    with pytest.raises(ValueError, match="already under way"):
        emu.refuse_connections(0.5)


def test_stopping_during_an_outage_closes_the_port_for_good(emu):
    port = emu.port
    emu.refuse_connections(30)
    time.sleep(OUTAGE_GRACE + 0.2)
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 5
    assert refused(port)
    assert not emu.running
