"""System tests: deferrable and queue-on-worker runs through a real Celery deployment, outputs on S3.

Each test prints its figures before asserting them. Submits are counted from the fal emulator's
request log (POSTs carrying the input's prompt), states from the metadata DB (PostgreSQL).
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest

from tests.conftest import API_KEY
from tests.system.deployment import BUCKET

pytestmark = pytest.mark.system

HEADER = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.batch import FalBatchRunOperator
from airflow_provider_fal.operators.fal import FalRunOperator

S3 = "s3://aws_default@{bucket}/{{{{ run_id }}}}"
ARGS = dict(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), is_paused_upon_creation=False)
"""


def dag_source(body: str) -> str:
    return HEADER.format(bucket=BUCKET) + body


RUNS = dag_source(
    """
with DAG("sys_runs", **ARGS) as dag:
    FalRunOperator.partial(task_id="sync", model_id="fal-ai/fast-sdxl", output_path=S3
                           ).expand(arguments=[{"prompt": f"s1-sync-{n}"} for n in range(20)])
    FalRunOperator.partial(task_id="deferred", model_id="fal-ai/fast-sdxl", deferrable=True, output_path=S3,
                           poll_interval=1).expand(arguments=[{"prompt": f"s1-deferred-{n}"} for n in range(20)])
    FalRunOperator.partial(task_id="on_worker", model_id="fal-ai/fast-sdxl", use_queue=True, output_path=S3,
                           poll_interval=1).expand(arguments=[{"prompt": f"s1-worker-{n}"} for n in range(20)])
"""
)

RESUME = dag_source(
    """
with DAG("sys_resume", **ARGS) as dag:
    FalRunOperator.partial(task_id="deferred", model_id="fal-ai/fast-sdxl", deferrable=True,
                           poll_interval=1).expand(arguments=[{"prompt": f"s2-{n}"} for n in range(4)])
"""
)


def s3_key(stored_path: str) -> str:
    return urlparse(stored_path).path.lstrip("/")


def assert_no_api_key_in_logs(deployment) -> None:
    logs = deployment.all_logs()
    print(f"component, service and task logs: {len(logs):,} characters; API key found: {API_KEY in logs}")
    assert API_KEY not in logs


def test_deferred_and_queue_on_worker_runs_store_their_outputs_on_s3(deployment, emulator):
    emulator.control("queue-timing", {"run_time": 3})
    emulator.control("latency", {"seconds": 1})  # the sync runs'
    deployment.add_dag("sys_runs", RUNS)
    started = time.monotonic()
    deployment.trigger("sys_runs", "s1")
    state = deployment.wait_run("sys_runs", "s1", timeout=600)
    elapsed = time.monotonic() - started
    states = deployment.task_states("sys_runs", "s1")
    submits = emulator.submits("s1-")
    s3 = deployment.moto.client()
    compared = matched = 0
    for task_id in ("sync", "deferred", "on_worker"):
        for result in deployment.xcom("sys_runs", "s1", task_id).values():
            for image in result["images"]:
                stored = s3.get_object(Bucket=BUCKET, Key=s3_key(image["stored_path"]))["Body"].read()
                compared += 1
                matched += stored == emulator.fetch(image["url"])
    print(
        f"\nsys_runs: {state} in {elapsed:.1f} s; task states {states}; submits {sum(submits.values())} "
        f"for {len(submits)} prompts (max per prompt {max(submits.values(), default=0)}); "
        f"S3 objects equal to the emulator's files: {matched}/{compared}"
    )
    assert state == "success"
    assert states == {"success": 60}
    assert len(submits) == 60 and set(submits.values()) == {1}
    assert compared == 60 and matched == 60
    assert_no_api_key_in_logs(deployment)


def test_a_deferred_task_resumes_on_another_worker(deployment, emulator):
    """Only worker1 runs while the tasks submit; it is stopped while they are deferred and
    worker2 resumes them: the submit and the resume are on different Celery workers."""
    emulator.control("queue-timing", {"run_time": 15})
    worker1, worker2 = deployment.components["worker1"], deployment.components["worker2"]
    worker2.stop()
    try:
        deployment.add_dag("sys_resume", RESUME)
        deployment.trigger("sys_resume", "s2")
        deployment.wait_states("sys_resume", "s2", "deferred", 4)
        worker2.start()
        worker1.stop()
        state = deployment.wait_run("sys_resume", "s2")
    finally:
        deployment.ensure_running()
    executions = deployment.executions("sys_resume", "s2")
    submits = emulator.submits("s2-")
    print(f"\nsys_resume: {state}; submits {submits}")
    for path, workers in sorted(executions.items()):
        print(f"  {path}: executed by {' -> '.join(workers)}")
    assert state == "success"
    assert len(executions) == 4
    assert all(workers == ["worker1", "worker2"] for workers in executions.values())
    assert len(submits) == 4 and set(submits.values()) == {1}
