"""The log tails a failed system test prints, and the wait for a component's start (no deployment
needed: runs in the main test suite)."""

from __future__ import annotations

import re
import sys

import pytest

from tests.system.services import Service, log_tails


def test_each_log_is_cut_to_its_last_lines_under_its_name(tmp_path):
    (tmp_path / "scheduler.log").write_text("\n".join(f"scheduler line {n}" for n in range(100)))
    (tmp_path / "triggerer.log").write_text("started\ncrashed: boom\n")
    (tmp_path / "notes.txt").write_text("not a log")
    tails = log_tails(tmp_path, lines=3)
    assert tails.splitlines() == [
        "----- scheduler.log (last 3 lines) -----",
        "scheduler line 97",
        "scheduler line 98",
        "scheduler line 99",
        "----- triggerer.log (last 2 lines) -----",
        "started",
        "crashed: boom",
    ]


def _service(tmp_path, script: str) -> Service:
    service = Service("worker9", tmp_path)
    service.spawn([sys.executable, "-c", script])
    return service


def test_a_component_that_dies_at_start_fails_at_once_with_the_end_of_its_log(tmp_path):
    service = _service(tmp_path, "print('ImportError: cannot import name retry', flush=True); raise SystemExit(1)")
    with pytest.raises(RuntimeError) as raised:
        service.wait_logged(" ready.", timeout=600)  # the exit is noticed, not the timeout
    assert "worker9 exited with 1;" in str(raised.value)
    assert "ImportError: cannot import name retry" in str(raised.value)


def test_only_the_latest_start_counts_and_a_ready_component_passes(tmp_path):
    first = _service(tmp_path, "print('worker9@vm ready.', flush=True)")
    first.process.wait(30)
    service = _service(tmp_path, "import time; time.sleep(60)")
    try:
        with pytest.raises(RuntimeError, match=re.escape("did not log ' ready.' within 0.5 s")):
            service.wait_logged(" ready.", timeout=0.5)  # the first start's line is not this one's
    finally:
        service.kill()
    ready = _service(tmp_path, "import time; print('worker9@vm ready.', flush=True); time.sleep(60)")
    try:
        ready.wait_logged(" ready.", timeout=30)
    finally:
        ready.kill()
