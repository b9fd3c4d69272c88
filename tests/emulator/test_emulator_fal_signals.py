"""The emulator answers as fal does where the provider's retry decisions depend on it (fal-api.md)."""

from __future__ import annotations

import pytest
import requests

from airflow_provider_fal.emulator import FalEmulator

KEY = "test-key-signals"


@pytest.fixture
def emu():
    with FalEmulator(api_key=KEY) as emulator:
        yield emulator


def post(emu: FalEmulator) -> requests.Response:
    return requests.post(f"{emu.url}/fal-ai/fast-sdxl", json={"prompt": "x"}, headers={"Authorization": f"Key {KEY}"})


def test_a_proxy_error_page_before_fal_carries_no_request_id(emu):
    emu.inject_fault(status=502, error_type=None, html=True)
    answer = post(emu)
    assert answer.status_code == 502 and answer.headers["Content-Type"].startswith("text/html")
    assert "x-fal-request-id" not in answer.headers


def test_fals_own_errors_and_results_carry_a_request_id(emu):
    emu.inject_fault(status=503, error_type="runner_disconnected")
    error = post(emu)
    assert error.status_code == 503 and error.headers["x-fal-request-id"]
    assert error.json()["error_type"] == "runner_disconnected"
    result = post(emu)
    assert result.status_code == 200 and result.headers["x-fal-request-id"]
