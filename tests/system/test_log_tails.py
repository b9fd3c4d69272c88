"""The log tails a failed system test prints (no deployment needed: runs in the main test suite)."""

from __future__ import annotations

from tests.system.services import log_tails


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
