"""FalRunOperator in real Airflow DAG runs (``airflow dags test``) against the emulator.

Each test writes a small DAG whose downstream task records what it received through XCom,
runs it for real, and checks both what Airflow did and what the emulator saw.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import requests

from tests.conftest import AIRFLOW_ENV, API_KEY

pytestmark = pytest.mark.e2e

DAG_TEMPLATE = """
import json, os
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.operators.fal import FalRunOperator, REQUEST_ID_XCOM_KEY

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         params={{"prompt": "a red fox in snow"}}, default_args={{"retries": {retries}}}) as dag:
    run = FalRunOperator(task_id="run", {operator_kwargs})

    @task
    def receive(result, request_id):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({{"result": result, "request_id": request_id}}, handle)

    receive(run.output, XComArg(run, key=REQUEST_ID_XCOM_KEY))
"""


def write_dag(dag_id: str, operator_kwargs: str, retries: int = 0) -> str:
    return DAG_TEMPLATE.format(dag_id=dag_id, operator_kwargs=operator_kwargs, retries=retries)


def task_log(dag_id: str, task_id: str, run_output: str = "") -> str:
    """What Airflow logged for one task: its log files (if any) plus the run's console output.

    ``airflow dags test`` prints task logs to the console on some versions and writes log
    files on others.
    """
    logs = Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "logs"
    files = [
        p for p in logs.rglob("*") if p.is_file() and f"dag_id={dag_id}" in str(p) and f"task_id={task_id}" in str(p)
    ]
    return "\n".join([run_output, *(p.read_text(errors="replace") for p in files)])


def task_attempts(dag_id: str, task_id: str) -> tuple[str, int]:
    """(state, try_number) of the latest run of a task, from the real metadata DB."""
    with sqlite3.connect(Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "airflow.db") as db:
        state, try_number = db.execute(
            "select state, try_number from task_instance where dag_id = ? and task_id = ? "
            "order by start_date desc limit 1",
            (dag_id, task_id),
        ).fetchone()
    return state, try_number


def decode_xcom(raw: str | bytes) -> object:
    """An XCom value as stored by Airflow (JSON; 3.0 stores JSON inside a JSON string)."""
    value: object = raw.decode() if isinstance(raw, bytes) else raw
    while isinstance(value, str):
        value = json.loads(value)
    return value


def test_result_reaches_downstream_task_through_xcom(emulator, fal_connection, run_dag, out_file):
    source = write_dag(
        "fal_op_success",
        """model_id="fal-ai/fast-sdxl",
        arguments={"prompt": "{{ params.prompt }} on {{ ds }}", "image_size": "square", "seed": 7},
        start_timeout="{{ 30 + 30 }}", object_lifecycle="3600", hint="sdxl-a",
        headers={"X-Fal-Store-IO": "0"}""",
    )
    result = run_dag("fal_op_success", source, env={"OUT": str(out_file)})
    assert result.succeeded, result.output[-4000:]

    received = json.loads(out_file.read_text())
    images = received["result"]["images"]
    assert len(images) == 1 and images[0]["width"] == 512
    assert images[0]["url"].startswith(emulator.url + "/files/")
    assert received["result"]["prompt"].startswith("a red fox in snow on 20")  # the rendered template
    png = requests.get(images[0]["url"], timeout=10)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")

    posts = [r for r in emulator.requests if r.method == "POST"]
    assert len(posts) == 1 and posts[0].path == "/fal-ai/fast-sdxl"
    headers = {k.lower(): v for k, v in posts[0].headers.items()}
    assert headers["x-fal-request-timeout"] == "60"
    assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 3600}
    assert headers["x-fal-runner-hint"] == "sdxl-a"
    assert headers["x-fal-store-io"] == "0"
    assert received["request_id"], "the fal request id is pushed under its own XCom key"


def test_bad_input_fails_before_any_request_without_retries(emulator, fal_connection, run_dag, out_file):
    source = write_dag(
        "fal_op_bad_timeout",
        """model_id="fal-ai/fast-sdxl", arguments={"prompt": "x"}, start_timeout="{{ 'soon' }}",
        retry_delay=0""",
        retries=3,
    )
    result = run_dag("fal_op_bad_timeout", source, env={"OUT": str(out_file)})
    assert not result.succeeded
    assert emulator.count(method="POST") == 0, "nothing may be sent for invalid input"
    log = task_log("fal_op_bad_timeout", "run", result.output)
    assert "start_timeout must be a number of seconds" in log
    assert task_attempts("fal_op_bad_timeout", "run") == ("failed", 1), "failed for good on the first try"
    assert not out_file.exists()


def test_model_validation_error_is_readable_and_not_retried(emulator, fal_connection, run_dag, out_file):
    source = write_dag("fal_op_422", """model_id="fal-ai/flux/dev", arguments={"seed": 1}, retry_delay=0""", retries=2)
    result = run_dag("fal_op_422", source, env={"OUT": str(out_file)})
    assert not result.succeeded
    assert emulator.count(method="POST") == 1, "a 422 is neither retried by the hook nor by Airflow"
    assert "prompt: Field required" in task_log("fal_op_422", "run", result.output)
    assert task_attempts("fal_op_422", "run") == ("failed", 1)
    # Our retry settings do not shadow Airflow's own BaseOperator.retry_policy (Airflow 3.3+).
    assert "Retry policy evaluation failed" not in result.output


def test_transient_errors_are_retried_by_the_hook(emulator, fal_connection, run_dag, out_file):
    emulator.inject_fault(status=503, error_type="runner_disconnected", times=1)
    emulator.inject_fault(status=502, html=True, times=1)
    source = write_dag(
        "fal_op_transient",
        """model_id="emulator/echo", arguments={"n": 1},
        fal_retry_policy={"initial_backoff": 0.05, "max_backoff": 0.1}""",
    )
    result = run_dag("fal_op_transient", source, env={"OUT": str(out_file)})
    assert result.succeeded, result.output[-4000:]
    assert json.loads(out_file.read_text())["result"] == {"n": 1}
    assert emulator.count(method="POST") == 3
    log = task_log("fal_op_transient", "run", result.output)
    assert "retrying in" in log and "runner_disconnected" in log


def test_locked_account_message_reaches_the_user_verbatim(emulator, fal_connection, run_dag, out_file):
    reason = "Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
    emulator.lock_account(reason=reason)
    source = write_dag("fal_op_locked", """model_id="fal-ai/fast-sdxl", arguments={"prompt": "x"}, retry_delay=0""", 2)
    result = run_dag("fal_op_locked", source, env={"OUT": str(out_file)})
    assert not result.succeeded
    assert f"User is locked. Reason: {reason}" in task_log("fal_op_locked", "run", result.output)
    assert emulator.count(method="POST") == 1


def test_mapped_runs_keep_working(emulator, fal_connection, run_dag):
    source = """
    import pendulum
    from airflow.sdk import DAG
    from airflow_provider_fal.operators.fal import FalRunOperator

    with DAG("fal_op_mapped", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
        FalRunOperator.partial(task_id="run", model_id="emulator/echo").expand(
            arguments=[{"i": 0}, {"i": 1}, {"i": 2}]
        )
    """
    result = run_dag("fal_op_mapped", source)
    assert result.succeeded, result.output[-4000:]
    # Read the mapped results from the real XCom table (a downstream task reading a mapped
    # XCom hits an Airflow 3.0.0 bug in `dags test`, unrelated to this provider).
    with sqlite3.connect(Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "airflow.db") as db:
        rows = db.execute(
            "select map_index, value from xcom where dag_id = 'fal_op_mapped' and task_id = 'run' "
            "and key = 'return_value' order by map_index"
        ).fetchall()
    values = [decode_xcom(value) for _, value in rows]
    assert [row[0] for row in rows] == [0, 1, 2]
    assert values == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert emulator.count(method="POST") == 3


def test_api_key_leaks_nowhere_in_airflow(emulator, fal_connection, run_dag, out_file):
    """After real runs (success and an auth failure), the key is in no log, XCom or DB row."""
    source = write_dag("fal_op_secret", """model_id="fal-ai/any-llm", arguments={"prompt": "hello"}""")
    result = run_dag("fal_op_secret", source, env={"OUT": str(out_file)})
    assert result.succeeded, result.output[-4000:]
    assert json.loads(out_file.read_text())["result"]["output"]

    home = Path(AIRFLOW_ENV["AIRFLOW_HOME"])
    assert API_KEY not in result.output
    for path in (home / "logs").rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(errors="replace"), path
    with sqlite3.connect(home / "airflow.db") as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for row in db.execute(f'select * from "{table}"'):
                assert API_KEY not in repr(row), table
    assert API_KEY not in json.dumps([r.to_dict() for r in emulator.requests])


def test_nan_in_arguments_fails_named_before_any_request_without_retries(emulator, fal_connection, run_dag, out_file):
    source = write_dag(
        "fal_op_nan",
        """model_id="emulator/echo", arguments={"guidance": float("nan")}, retry_delay=0""",
        retries=2,
    )
    result = run_dag("fal_op_nan", source, env={"OUT": str(out_file)})
    assert not result.succeeded
    assert emulator.count(method="POST") == 0, "nothing may be sent for NaN input"
    log = task_log("fal_op_nan", "run", result.output)
    assert "arguments['guidance'] is nan: NaN and infinity are not allowed" in log
    assert task_attempts("fal_op_nan", "run") == ("failed", 1), "failed for good on the first try"
