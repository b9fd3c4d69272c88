"""A submit whose answer was lost, in real DAG runs: ``on_unknown_submit`` decides, never silence.

The emulator drops the connection after reading a submit (the request was sent, no answer came
back, so no request id is known). With the default ``on_unknown_submit="fail"`` the task fails
for good with a message saying what to check, and fal saw one POST however many retries were
left; with ``"resubmit"`` the retry sends it again and logs that a duplicate may be billed. A
connection that failed before anything was sent leaves no marker: the retry submits normally.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import connection_json
from tests.test_operator_dag_runs import task_attempts
from tests.test_queue_dag_runs import DAG_HEAD, received, submits, task_section

pytestmark = pytest.mark.e2e

TASK = """
    {name} = FalRunOperator(task_id="{name}", model_id="{model}", arguments={{"prompt": "{name}"}},
                            poll_interval=0.2, fal_retry_policy={{"initial_backoff": 0.01}}, {kwargs})
    receive.override(task_id="receive_{name}")("{name}", {name}.output, XComArg({name}, key=REQUEST_ID_XCOM_KEY), None)
"""


@pytest.fixture
def out_dir(tmp_path) -> Path:
    path = tmp_path / "received"
    path.mkdir()
    return path


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_lost_submit_answer_fails_for_good_or_resubmits_when_chosen(emulator, fal_connection, run_dag, out_dir):
    emulator.set_queue_timing(queue_wait=0, run_time=0.2)
    for path in ("fal-ai/flux/dev/lost_fail", "fal-ai/flux/dev/lost_resubmit", "emulator/echo/sync_lost"):
        emulator.inject_fault(drop_connection=True, times=1, model_id=path)
    emulator.inject_fault(drop_connection=True, times=1, model_id="emulator/echo/sync_resubmit")
    # fal took the submit (200) but its answer is unreadable: the try ends with the marker still
    # stored, as a worker killed mid-submit leaves it
    emulator.inject_fault(status=200, html=True, times=1, model_id="fal-ai/flux/dev/garbled")
    down = f"http://127.0.0.1:{closed_port()}"
    cases = {
        "lost_fail": ("fal-ai/flux/dev/lost_fail", "deferrable=True"),
        "lost_resubmit": ("fal-ai/flux/dev/lost_resubmit", 'use_queue=True, on_unknown_submit="resubmit"'),
        # the first try cannot connect at all (nothing sent); the second reaches the emulator
        "connect": (
            "fal-ai/flux/dev/connect",
            "use_queue=True, fal_conn_id=\"{{ 'fal_down' if ti.try_number == 1 else 'fal_default' }}\"",
        ),
        "garbled": ("fal-ai/flux/dev/garbled", "deferrable=True"),
        "sync_lost": ("emulator/echo/sync_lost", ""),
        "sync_resubmit": ("emulator/echo/sync_resubmit", 'on_unknown_submit="resubmit"'),
        "bad_choice": ("emulator/echo", 'on_unknown_submit="maybe"'),
    }
    body = "".join(TASK.format(name=name, model=model, kwargs=kwargs) for name, (model, kwargs) in cases.items())
    source = DAG_HEAD.format(dag_id="fal_unknown_submit", retries=2) + body
    down_connection = json.loads(connection_json(emulator))
    down_connection.update(host=down, extra={"queue_url": f"{down}/queue"})
    env = {"OUT": str(out_dir), "AIRFLOW_CONN_FAL_DOWN": json.dumps(down_connection)}
    result = run_dag("fal_unknown_submit", source, env=env)
    assert not result.succeeded

    # Default: one POST, then the task fails for good, its two retries unspent, saying what to do.
    assert len(submits(emulator, "lost_fail")) == 1
    assert task_attempts("fal_unknown_submit", "lost_fail") == ("failed", 1)
    section = task_section(result.output, "lost_fail")
    assert "queue submit of fal model fal-ai/flux/dev/lost_fail at 20" in section, section[-3000:]
    assert "may have reached fal's queue and been billed" in section
    assert "request id is unknown" in section and "fal dashboard" in section
    assert 'set on_unknown_submit="resubmit"' in section and "AirflowFailException" in section

    # Opted in: the retry finds the in-flight marker, warns, submits again and delivers.
    assert len(submits(emulator, "lost_resubmit")) == 2
    assert task_attempts("fal_unknown_submit", "lost_resubmit") == ("success", 2)
    assert received(out_dir, "lost_resubmit")["result"]["prompt"] == "lost_resubmit"
    section = task_section(result.output, "lost_resubmit")
    assert "The previous try's queue submit of fal model fal-ai/flux/dev/lost_resubmit at 20" in section
    assert "A DUPLICATE MAY BE BILLED" in section

    # The retry after a try that ended mid-submit finds the marker and fails for good.
    assert len(submits(emulator, "garbled")) == 1
    assert task_attempts("fal_unknown_submit", "garbled") == ("failed", 2)
    assert "The previous try's queue submit of fal model fal-ai/flux/dev/garbled at 20" in result.output

    # Nothing was sent: no marker is left, the retry submits without any warning.
    assert len(submits(emulator, "connect")) == 1
    assert task_attempts("fal_unknown_submit", "connect") == ("success", 2)
    section = task_section(result.output, "connect")
    assert "Could not connect to fal" in section and "FalConnectError" in section
    assert "got no answer" not in section and "DUPLICATE" not in section

    # Synchronous mode: the same choice for a run whose answer was lost.
    assert len(submits(emulator, "sync_lost")) == 1
    assert task_attempts("fal_unknown_submit", "sync_lost") == ("failed", 1)
    section = task_section(result.output, "sync_lost")
    assert "synchronous run of fal model emulator/echo/sync_lost at 20" in section, section[-3000:]
    assert 'set on_unknown_submit="resubmit"' in section
    assert len(submits(emulator, "sync_resubmit")) == 2
    assert task_attempts("fal_unknown_submit", "sync_resubmit") == ("success", 2)
    # (the failed try's lines can land in another task's part of the interleaved run log)
    assert "run of fal model emulator/echo/sync_resubmit at 20" in result.output
    assert 'on_unknown_submit="resubmit": a retry of this task sends the input again' in result.output

    # A value that is neither choice fails before anything is sent.
    assert submits(emulator, "bad_choice") == []
    assert task_attempts("fal_unknown_submit", "bad_choice") == ("failed", 1)
    assert "on_unknown_submit must be 'fail' or 'resubmit', got 'maybe'" in task_section(result.output, "bad_choice")
