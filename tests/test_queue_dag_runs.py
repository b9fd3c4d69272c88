"""Queue and deferrable FalRunOperator runs in real Airflow (``airflow dags test``).

``airflow dags test`` runs a deferred task's trigger in-process (on 3.0 with the trigger
object itself, on 3.3 rebuilt from ``serialize()`` like a triggerer would), then resumes the
task on the worker side with the trigger's event, so these runs go through the real
defer -> trigger -> ``execute_complete`` path. Assertions are on what the emulator saw (one
submit, polls, cancels) and on what the downstream tasks received through XCom.

Each DAG holds several independent fal tasks (one per case) so that one Airflow start-up
serves them all; every task sends its own task id as the prompt, which ties the emulator's
records to it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import AIRFLOW_ENV, API_KEY
from tests.test_operator_dag_runs import task_attempts

pytestmark = pytest.mark.e2e

DAG_HEAD = """
import json, os
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.operators.fal import FalRunOperator, QUEUE_REQUEST_XCOM_KEY, REQUEST_ID_XCOM_KEY

@task
def receive(name, result, request_id, request):
    with open(os.path.join(os.environ["OUT"], name + ".json"), "w") as handle:
        json.dump({{"result": result, "request_id": request_id, "request": request}}, handle)

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={{"retries": {retries}, "retry_delay": timedelta(seconds=0)}}) as dag:
"""
TASK = """
    {name} = FalRunOperator(task_id="{name}", model_id="{model}", arguments={{"prompt": "{name}"}},
                            poll_interval=0.2, {kwargs})
    receive.override(task_id="receive_{name}")("{name}", {name}.output, XComArg({name}, key=REQUEST_ID_XCOM_KEY),
                                              XComArg({name}, key=QUEUE_REQUEST_XCOM_KEY))
"""

SYNC_TASK = """
    {name} = FalRunOperator(task_id="{name}", model_id="{model}", arguments={{"prompt": "{name}"}},
                            fal_retry_policy={{"initial_backoff": 0.01}})
    receive.override(task_id="receive_{name}")("{name}", {name}.output, XComArg({name}, key=REQUEST_ID_XCOM_KEY), None)
"""


def write_dag(dag_id: str, tasks: dict[str, tuple[str, str]], retries: int = 0) -> str:
    """A DAG with one FalRunOperator (and a downstream receiver) per ``name: (model, kwargs)``."""
    body = "".join(TASK.format(name=name, model=model, kwargs=kwargs) for name, (model, kwargs) in tasks.items())
    return DAG_HEAD.format(dag_id=dag_id, retries=retries) + body


def submits(emulator, name: str) -> list:
    return [r for r in emulator.requests if r.method == "POST" and (r.json or {}).get("prompt") == name]


def polls_of(emulator, request_id: str, suffix: str = "") -> list:
    return [r for r in emulator.requests if r.path.endswith(f"/requests/{request_id}{suffix}")]


def received(out_dir: Path, name: str) -> dict | None:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def task_section(output: str, task_id: str) -> str:
    """The part of a ``dags test`` log that belongs to one task (all its tries)."""
    parts = re.split(r"(?=\[DAG TEST\] running task <TaskInstance: \S+\.)", output)
    return "\n".join(
        part for part in parts if re.match(rf"\[DAG TEST\] running task <TaskInstance: \S+\.{task_id} ", part)
    )


def runner_lines(text: str) -> list[str]:
    """The runner log lines copied into a task log, as one log handler printed them.

    ``dags test`` on Airflow 3.0 prints each task log record through two handlers with
    different time formats; lines are grouped by that format and the fullest group is returned,
    so a line logged twice by the operator still shows up twice.
    """
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        found = re.search(r"fal runner: \S+Z \S+(?: \d/4)?", line)
        if found:
            groups.setdefault(re.sub(r"\d", "#", line[:24]), []).append(found.group(0))
    return max(groups.values(), key=len, default=[])


@pytest.fixture
def out_dir(tmp_path) -> Path:
    path = tmp_path / "received"
    path.mkdir()
    return path


def test_deferrable_and_worker_queue_runs_deliver_results(emulator, fal_connection, run_dag, out_dir):
    emulator.set_queue_timing(queue_wait=0.4, run_time=1.0)
    media = out_dir.parent / "media"
    source = write_dag(
        "fal_q_success",
        {
            "deferred": ("fal-ai/flux/dev", "deferrable=True"),
            "on_worker": ("fal-ai/flux/dev", "use_queue=True"),
            # the same post-processing as the synchronous mode: media copied before fal's URLs expire
            "persisted": ("fal-ai/flux/schnell", f'deferrable=True, output_path="{media}"'),
        },
    )
    result = run_dag("fal_q_success", source, env={"OUT": str(out_dir)})
    assert result.succeeded, result.output[-4000:]

    persisted = received(out_dir, "persisted")["result"]["images"][0]
    assert persisted["url"].startswith(emulator.url + "/files/")
    stored = Path(persisted["stored_path"].removeprefix("file://"))
    assert stored.is_relative_to(media) and stored.read_bytes().startswith(b"\x89PNG")

    for name in ("deferred", "on_worker"):
        got = received(out_dir, name)
        assert got is not None, name
        assert got["result"]["prompt"] == name
        assert got["result"]["images"][0]["url"].startswith(emulator.url + "/files/")
        request_id = got["request_id"]
        assert len(submits(emulator, name)) == 1
        assert got["request"]["request_id"] == request_id
        assert got["request"]["status_url"] == f"{emulator.queue_url}/fal-ai/flux/requests/{request_id}/status"
        assert len(polls_of(emulator, request_id, "/status")) >= 2
        assert len(polls_of(emulator, request_id)) == 1  # the result, fetched once, as soon as COMPLETED
        section = task_section(result.output, name)
        lines = runner_lines(section)
        assert [line.split()[-1] for line in lines if "Step" in line] == ["1/4", "2/4", "3/4", "4/4"], section
        assert len(lines) == len(set(lines)) == 6  # every runner line once, however often it was polled
    assert emulator.count("POST", "/fal-ai/") == 0  # nothing went to the synchronous endpoint

    deferred_log = task_section(result.output, "deferred")
    assert "Deferring" in deferred_log and "running trigger in line" in result.output
    assert f"Fetched the result of fal request {received(out_dir, 'deferred')['request_id']}" in result.output
    assert "running trigger in line" not in task_section(result.output, "on_worker")

    home = Path(AIRFLOW_ENV["AIRFLOW_HOME"])
    with sqlite3.connect(home / "airflow.db") as db:  # XCom, trigger rows, task state, variables ...
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for row in db.execute(f'select * from "{table}"'):
                assert API_KEY not in repr(row), table


def test_timeouts_and_failures_cancel_or_report(emulator, fal_connection, run_dag, out_dir):
    emulator.set_queue_timing(queue_wait=120, run_time=1)  # flux never starts within the test
    emulator.set_queue_timing(queue_wait=0, run_time=0.3, model_id="fal-ai/fast-sdxl")
    emulator.fail_queued(
        model_id="fal-ai/fast-sdxl",
        error="Generated content flagged by the safety checker",
        error_type="content_policy",
    )
    cases = {
        "deferred_poll": ("fal-ai/flux/dev", "deferrable=True, poll_timeout=1"),
        "worker_poll": ("fal-ai/flux/dev", "use_queue=True, poll_timeout=1"),
        "deferred_exec": ("fal-ai/flux/dev", "deferrable=True, execution_timeout=timedelta(seconds=2)"),
        "failed": ("fal-ai/fast-sdxl", "deferrable=True"),
        # Last: on Airflow 3.0 `dags test` lets the worker's AirflowTaskTimeout end the whole run.
        "worker_exec": (
            "fal-ai/flux/dev",
            'use_queue=True, execution_timeout=timedelta(seconds=2), trigger_rule="all_done"',
        ),
    }
    source = write_dag("fal_q_fail", cases) + "    [deferred_poll, worker_poll, deferred_exec, failed] >> worker_exec\n"
    result = run_dag("fal_q_fail", source, env={"OUT": str(out_dir)})
    assert not result.succeeded
    assert list(out_dir.iterdir()) == []  # no downstream task ran

    expected_reason = {
        "deferred_poll": "did not complete within poll_timeout of 1 s; the request was cancelled",
        "worker_poll": "did not complete within poll_timeout of 1 s; the request was cancelled",
        "deferred_exec": "did not complete within execution_timeout of 2 s; the request was cancelled",
        "worker_exec": "execution_timeout of 2 s reached: cancel of fal request",
    }
    for name, reason in expected_reason.items():
        assert len(submits(emulator, name)) == 1, name
        request_ids_of_task = {
            m.group(1) for r in emulator.requests if (m := re.search(r"/requests/([^/]+)/status", r.path))
        }
        section = task_section(result.output, name)
        (request_id,) = {rid for rid in request_ids_of_task if rid in section}
        cancels = [r for r in polls_of(emulator, request_id, "/cancel") if r.method == "PUT"]
        assert [r.status for r in cancels] == [202], name  # cancelled exactly once
        assert reason in section, (name, section[-3000:])

    section = task_section(result.output, "failed")
    assert "Generated content flagged by the safety checker" in section
    # Read like a sync answer: the result GET carries the model's 500 and body (not billed by fal).
    assert "FalServerError" in section and "error_type=content_policy" in section and "HTTP 500" in section
    assert len(submits(emulator, "failed")) == 1
    assert emulator.count("GET", "/queue/fal-ai/fast-sdxl/requests/") >= 1
    results = [r for r in emulator.requests if re.fullmatch(r"/queue/fal-ai/fast-sdxl/requests/[^/]+", r.path)]
    assert [r.status for r in results] == [500]  # the failed request's result, read once
    assert stored_requests("fal_q_fail") == []  # retries=0: each failure was final, nothing left behind


DIES_AFTER_SUBMIT = """
class DiesAfterSubmit(FalRunOperator):
    \"\"\"Its first try ends right after fal accepted the submit, as a killed worker's would.\"\"\"

    def execute(self, context):
        self.first_try = context["ti"].try_number == 1
        return super().execute(context)

    def _submit(self, store, request, fingerprint):
        handle = super()._submit(store, request, fingerprint)
        if self.first_try:
            raise RuntimeError("worker lost right after submitting " + handle.request_id)
        return handle

"""


def test_retry_after_submitting_reattaches_instead_of_paying_twice(emulator, fal_connection, run_dag, out_dir):
    """The first try of each task ends right after its submit, its request running on and stored
    (what a killed worker leaves behind); the retry finds the stored request, reattaches and
    delivers its result. (Polls that fail or come back garbled no longer end a try: they are asked
    again, so the end of the try is staged by the operator subclass above.)"""
    emulator.set_queue_timing(queue_wait=0, run_time=1.0)
    cases = {"worker": ("fal-ai/flux/dev", "use_queue=True"), "deferred": ("fal-ai/fast-sdxl", "deferrable=True")}
    source = write_dag("fal_q_retry", cases, retries=1).replace("FalRunOperator(task_id=", "DiesAfterSubmit(task_id=")
    source = source.replace("\n@task\n", "\n" + DIES_AFTER_SUBMIT + "@task\n", 1)
    result = run_dag("fal_q_retry", source, env={"OUT": str(out_dir)})
    assert result.succeeded, result.output[-4000:]

    for name in cases:
        got = received(out_dir, name)
        assert got is not None and got["result"]["prompt"] == name
        assert len(submits(emulator, name)) == 1  # one generation paid for
        section = task_section(result.output, name)
        assert f"worker lost right after submitting {got['request_id']}" in section  # the first try's end
        assert f"Reattaching to fal request {got['request_id']}" in section
        assert [r.status for r in polls_of(emulator, got["request_id"])] == [200]


def test_a_result_fal_no_longer_has_fails_retryably_and_the_retry_submits_once_more(
    emulator, fal_connection, run_dag, out_dir
):
    """fal forgot the request (404 on its status: the result outlived fal's retention while nobody
    polled). The try fails retryably, saying the result expired and was billed; the retry submits
    again, once, and delivers. Worker and deferred modes."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.5)
    gone = {"status": 404, "error_type": None, "detail": "Request not found", "times": 1}
    emulator.inject_fault(model_id="fal-ai/flux/requests", **gone)
    emulator.inject_fault(model_id="fal-ai/fast-sdxl/requests", **gone)
    cases = {
        "worker_gone": ("fal-ai/flux/dev", "use_queue=True"),
        "deferred_gone": ("fal-ai/fast-sdxl", "deferrable=True"),
    }
    result = run_dag("fal_q_gone", write_dag("fal_q_gone", cases, retries=1), env={"OUT": str(out_dir)})
    assert result.succeeded, result.output[-4000:]
    for name in cases:
        got = received(out_dir, name)
        assert got is not None and got["result"]["prompt"] == name
        assert len(submits(emulator, name)) == 2  # the expired (billed) one, and the retry's
        section = task_section(result.output, name)
        assert "FalResultExpiredError" in section and "most likely completed and was billed" in section
        assert "The task's retry submits the input again" in section
        assert "Reattaching" not in section


def stored_requests(dag_id: str) -> list[tuple]:
    """What the reattach store still holds for a DAG: task-state rows (3.3+) or Variables (3.0-3.2)."""
    with sqlite3.connect(Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "airflow.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
        rows = db.execute(
            "select key, description from variable where key like 'fal_queue_request_%' and description like ?",
            (f"%dag_id={dag_id} %",),
        ).fetchall()
        if "task_state_store" in tables:
            rows += db.execute("select task_id, key from task_state_store where dag_id = ?", (dag_id,)).fetchall()
    return rows


INVALID_TASK = """
    {name} = FalRunOperator(task_id="{name}", model_id="fal-ai/flux/dev", arguments={{"seed": {seed}}},
                            poll_interval=0.2, {kwargs})
"""


def test_a_queue_422_fails_the_task_at_once_with_the_field_list(emulator, fal_connection, run_dag, out_dir):
    """fal's queue accepts an invalid input, runs it, and answers 422 on the result GET: the task
    fails for good on its first try (retries=2 left unspent), saying which field is wrong."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.2)
    cases = {"worker_422": (101, "use_queue=True"), "deferred_422": (102, "deferrable=True")}
    body = "".join(INVALID_TASK.format(name=name, seed=seed, kwargs=kwargs) for name, (seed, kwargs) in cases.items())
    result = run_dag("fal_q_422", DAG_HEAD.format(dag_id="fal_q_422", retries=2) + body, env={"OUT": str(out_dir)})
    assert not result.succeeded

    for name, (seed, _) in cases.items():
        posts = [r for r in emulator.requests if r.method == "POST" and r.json == {"seed": seed}]
        assert [r.status for r in posts] == [200], name  # accepted at submit, never submitted again
        section = task_section(result.output, name)
        assert "prompt: Field required" in section, section[-3000:]
        assert "FalValidationError" in section
        assert task_attempts("fal_q_422", name) == ("failed", 1)  # one try: a 422 is permanent
    results = [r for r in emulator.requests if re.fullmatch(r"/queue/fal-ai/flux/requests/[^/]+", r.path)]
    assert [r.status for r in results] == [422, 422]  # each task read its result once
    assert stored_requests("fal_q_422") == []  # failing for good leaves no stored request behind


def test_fals_retry_signals_in_real_runs(emulator, fal_connection, run_dag, out_dir):
    """A 200 carrying X-Fal-Needs-Retry: 1 is delivered with one POST; a 400 with X-Fal-Retryable:
    true is sent again; a deferred task survives a status poll that answers 500 once."""
    emulator.set_queue_timing(queue_wait=0, run_time=0.5)
    emulator.inject_fault(
        status=200, error_type=None, detail="a billed result", needs_retry=True, model_id="emulator/echo"
    )
    emulator.inject_fault(
        status=400, error_type="downstream_service_error", retryable=True, times=1, model_id="fal-ai/flux/dev"
    )
    emulator.inject_fault(status=500, error_type="internal_error", times=1, model_id="fal-ai/fast-sdxl/requests")
    sync = {"sync_needs_retry": "emulator/echo", "sync_retryable": "fal-ai/flux/dev"}
    source = write_dag("fal_signals", {"deferred_poll_500": ("fal-ai/fast-sdxl", "deferrable=True")}) + "".join(
        SYNC_TASK.format(name=name, model=model) for name, model in sync.items()
    )
    result = run_dag("fal_signals", source, env={"OUT": str(out_dir)})
    assert result.succeeded, result.output[-4000:]
    assert received(out_dir, "sync_needs_retry")["result"] == {"detail": "a billed result"}
    assert [r.status for r in submits(emulator, "sync_needs_retry")] == [200]  # one POST: never sent again
    assert [r.status for r in submits(emulator, "sync_retryable")] == [400, 200]
    deferred = received(out_dir, "deferred_poll_500")
    assert deferred["result"]["prompt"] == "deferred_poll_500"
    polls = [r.status for r in polls_of(emulator, deferred["request_id"], "/status")]
    assert polls[0] == 500 and polls[-1] == 200
    assert len(submits(emulator, "deferred_poll_500")) == 1
