"""FalBatchRunOperator in real Airflow DAG runs (``airflow dags test``) against the emulator.

Each DAG's downstream task writes what it received through XCom to a file; the tests check
that, the task states in Airflow's metadata DB, and what the emulator saw.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import AIRFLOW_ENV, API_KEY

pytestmark = pytest.mark.e2e


def task_states(dag_id: str) -> dict[str, tuple[str, int]]:
    """``task_id -> (state, try_number)`` in the DAG's latest run, from Airflow's metadata DB."""
    with sqlite3.connect(Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "airflow.db") as db:
        rows = db.execute(
            "select task_id, state, try_number from task_instance where dag_id = ? and run_id = "
            "(select run_id from dag_run where dag_id = ? order by id desc limit 1)",
            (dag_id, dag_id),
        ).fetchall()
    return {task_id: (state, tries) for task_id, state, tries in rows}


HAPPY_DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.operators.batch import FalBatchRunOperator, SUMMARY_XCOM_KEY

with DAG("fal_batch_happy", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         params={"style": "ink drawing"}) as dag:

    @task
    def make_inputs():
        return [{"n": n, "prompt": f"prompt {n}"} for n in range(40)]

    generate = FalBatchRunOperator(
        task_id="generate",
        model_id="emulator/echo",
        inputs=make_inputs(),
        max_concurrency=6,
        start_timeout=30,
        object_lifecycle="{{ 1800 * 2 }}",
        hint="batch-hint",
        headers={"X-Fal-Store-IO": "0"},
        progress_interval=0.2,
    )
    templated = FalBatchRunOperator(
        task_id="templated",
        model_id="{{ 'fal-ai/fast-sdxl' }}",
        inputs=[{"prompt": "a {{ params.style }} of a fox", "image_size": "square", "seed": 1},
                {"prompt": "a {{ params.style }} of a heron", "image_size": "square", "seed": 2}],
    )

    queued = FalBatchRunOperator(
        task_id="queued",
        model_id="emulator/echo",
        inputs=[{"clip": n} for n in range(5)],
        use_queue=True,
        poll_interval=0.1,
        priority="low",
    )

    @task
    def receive(results, summary, images, clips):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"results": results, "summary": summary, "images": images, "clips": clips}, handle)

    receive(generate.output, XComArg(generate, key=SUMMARY_XCOM_KEY), templated.output, queued.output)
"""


def test_every_input_runs_once_and_results_reach_downstream_in_input_order(emulator, fal_connection, run_dag, out_file):
    emulator.set_latency(0.05)
    result = run_dag("fal_batch_happy", HAPPY_DAG, env={"OUT": str(out_file)})
    assert result.succeeded, result.output[-4000:]
    received = json.loads(out_file.read_text())

    results = received["results"]
    assert [entry["index"] for entry in results] == list(range(40))
    assert all(entry["ok"] for entry in results)
    assert [entry["output"] for entry in results] == [{"n": n, "prompt": f"prompt {n}"} for n in range(40)]
    assert len({entry["request_id"] for entry in results}) == 40

    summary = received["summary"]
    assert summary["total"] == summary["succeeded"] == 40
    assert summary["failed"] == summary["not_run"] == 0

    echo = [r for r in emulator.requests if r.path == "/emulator/echo"]
    assert len(echo) == 40  # one request per input, no duplicates
    assert sorted(r.json["n"] for r in echo) == list(range(40))
    for record in echo:
        headers = {k.lower(): v for k, v in record.headers.items()}
        assert headers["x-fal-request-timeout"] == "30"
        assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 3600}
        assert headers["x-fal-runner-hint"] == "batch-hint"
        assert headers["x-fal-store-io"] == "0"
    assert summary["peak_in_flight"] == 6  # concurrent, but never more than max_concurrency

    images = received["images"]
    assert [entry["output"]["prompt"] for entry in images] == ["a ink drawing of a fox", "a ink drawing of a heron"]
    assert all(entry["output"]["images"][0]["url"].startswith(emulator.url + "/files/") for entry in images)

    clips = received["clips"]  # the queue variant: submitted, polled, fetched
    assert [entry["output"] for entry in clips] == [{"clip": n} for n in range(5)]
    submits = [r for r in emulator.requests if r.method == "POST" and r.path == "/queue/emulator/echo"]
    assert len(submits) == 5
    assert all({k.lower(): v for k, v in r.headers.items()}["x-fal-queue-priority"] == "low" for r in submits)
    fetched = {r.path.rsplit("/", 1)[-1] for r in emulator.requests if r.method == "GET" and "/status" not in r.path}
    assert {entry["request_id"] for entry in clips} <= fetched

    assert "fal batch emulator/echo: 40/40 done (100%)" in result.output
    assert API_KEY not in result.output and API_KEY not in out_file.read_text()


FAILURES_DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, task
from airflow_provider_fal.operators.batch import FalBatchRunOperator

def prompts(model, bad):
    return [{"prompt": "" if n in bad else f"{model} prompt {n}", "image_size": "square"} for n in range(7)]

with DAG("fal_batch_failures", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 2}) as dag:
    strict = FalBatchRunOperator(task_id="strict", model_id="fal-ai/fast-sdxl",
                                 inputs=prompts("sdxl", {2, 5}), max_concurrency=3)
    tolerant = FalBatchRunOperator(task_id="tolerant", model_id="fal-ai/flux/schnell",
                                   inputs=prompts("schnell", {4}), max_failure_rate=0.2, max_concurrency=3)
    bad_input = FalBatchRunOperator(task_id="bad_input", model_id="fal-ai/flux/dev",
                                    inputs=[{"prompt": "fine"}, "not json", 42])

    @task(trigger_rule="all_done")
    def keep(strict_results, tolerant_results):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"strict": strict_results, "tolerant": tolerant_results}, handle)

    keep(strict.output, tolerant.output)
"""


def test_failed_inputs_are_reported_and_the_policy_decides_the_task(emulator, fal_connection, run_dag, out_file):
    emulator.inject_fault(503, "runner_disconnected", times=2, model_id="fal-ai/flux/schnell")
    result = run_dag("fal_batch_failures", FAILURES_DAG, env={"OUT": str(out_file)})
    assert not result.succeeded
    states = task_states("fal_batch_failures")

    # strict: two rejected inputs break the default policy; permanent, so no Airflow retry
    # (which would send every input again).
    assert states["strict"] == ("failed", 1), states
    assert emulator.count("POST", "/fal-ai/fast-sdxl") == 7
    # tolerant: one failure out of seven is within 20%; the two 503s were retried.
    assert states["tolerant"][0] == "success", states
    assert emulator.count("POST", "/fal-ai/flux/schnell") == 7 + 2
    # bad_input: rejected before anything was sent, naming the inputs to fix, not retried.
    assert states["bad_input"] == ("failed", 1), states
    assert emulator.count("POST", "/fal-ai/flux/dev") == 0
    assert "inputs[1]" in result.output and "inputs[2]" in result.output

    received = json.loads(out_file.read_text())  # the all_done task still got every result
    strict = received["strict"]
    assert [entry["ok"] for entry in strict] == [True, True, False, True, True, False, True]
    rejected = strict[2]["error"]
    assert rejected["error"] == "FalValidationError" and rejected["status_code"] == 422
    assert rejected["detail"][0]["loc"] == ["body", "prompt"]
    assert strict[0]["output"]["prompt"] == "sdxl prompt 0"
    tolerant = received["tolerant"]
    assert [entry["ok"] for entry in tolerant] == [True, True, True, True, False, True, True]
    assert "2 of 7 inputs failed, more than max_failures=0" in result.output
    assert API_KEY not in result.output and API_KEY not in out_file.read_text()


def test_durations_are_read_like_every_other_duration_of_the_provider():
    """poll_interval="2" works here as on FalRunOperator (rendered templates give strings), and timedeltas too."""
    from datetime import timedelta

    from airflow_provider_fal.operators.batch import FalBatchRunOperator

    operator = FalBatchRunOperator(
        task_id="t",
        model_id="fal-ai/flux/schnell",
        inputs=[],
        use_queue=True,
        poll_interval="2",
        poll_timeout=timedelta(minutes=5),
        progress_interval="15",
    )
    assert (operator.poll_interval, operator.poll_timeout, operator.progress_interval) == (2.0, 300.0, 15.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be a whole number from 1 to 256"),
        ({"max_failures": -1}, "max_failures must be a whole number >= 0"),
        ({"max_failure_rate": 5}, "max_failure_rate must be a fraction from 0 to 1"),
        ({"priority": "low"}, "priority and poll_timeout apply to queued requests only"),
        ({"use_queue": True, "poll_interval": 0}, "poll_interval must be a positive number of seconds"),
        ({"progress_interval": "often"}, "progress_interval must be a number of seconds, got 'often'"),
        ({"progress_interval": -1}, "progress_interval must be a positive number of seconds"),
    ],
)
def test_bad_settings_fail_when_the_dag_is_parsed(kwargs, message):
    from airflow_provider_fal.exceptions import FalConfigurationError
    from airflow_provider_fal.operators.batch import FalBatchRunOperator

    with pytest.raises(FalConfigurationError, match=message):
        FalBatchRunOperator(task_id="t", model_id="fal-ai/flux/schnell", inputs=[], **kwargs)


def test_nan_in_rendered_inputs_fails_the_task_without_retries():
    """Rendered fields are stored as JSON before ``execute``; NaN is refused right after rendering."""
    from airflow_provider_fal._compat import AirflowFailException
    from airflow_provider_fal.operators.batch import FalBatchRunOperator

    operator = FalBatchRunOperator(task_id="batch", model_id="emulator/echo", inputs=[{"x": 1}, {"x": float("nan")}])
    with pytest.raises(AirflowFailException, match=r"inputs\[1\]\['x'\] is nan: NaN and infinity are not allowed"):
        operator.render_template_fields({})
