"""System tests: a service of the deployment goes away for a while and comes back."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import refuses_connections
from tests.system.conftest import wait_for
from tests.system.deployment import BUCKET
from tests.system.test_deferred import assert_no_api_key_in_logs, dag_source
from tests.system.test_kills import stored_images

pytestmark = pytest.mark.system

BATCH = dag_source(
    """
with DAG("sys_db_outage", **ARGS) as dag:
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", deferrable=True, output_path=S3,
                        retries=1, retry_delay=timedelta(seconds=1),
                        inputs=[{"prompt": f"s7-{n}"} for n in range(12)])
"""
)


def test_postgres_stopped_for_10_s_during_a_deferred_batch(deployment, emulator):
    """A deferrable batch of 12 inputs (20 s requests) is deferred; PostgreSQL stops for 10 s.
    Components that exit are started again; the batch ends with each input submitted once."""
    emulator.control("queue-timing", {"run_time": 20})
    deployment.add_dag("sys_db_outage", BATCH)
    deployment.trigger("sys_db_outage", "s7")
    deployment.wait_states("sys_db_outage", "s7", "deferred", 1)
    deployment.postgres.stop()
    time.sleep(10)
    deployment.postgres.start()
    time.sleep(5)
    exited = [name for name, component in deployment.components.items() if not component.running]
    deployment.ensure_running()
    state = deployment.wait_run("sys_db_outage", "s7", timeout=240)
    submits = emulator.submits("s7-")
    tries = deployment.tries("sys_db_outage", "s7")
    summary = deployment.xcom("sys_db_outage", "s7", "batch", "fal_batch_summary").get(-1, {})
    print(
        f"\nsys_db_outage: {state}; components that exited during the outage: {exited or 'none'}; "
        f"tries {[(row[2], row[3]) for row in tries]}; submits {sum(submits.values())} for {len(submits)} inputs; "
        f"succeeded {summary.get('succeeded')}"
    )
    assert state == "success"
    assert len(submits) == 12 and set(submits.values()) == {1}
    assert summary["succeeded"] == 12


FAL_OUTAGE = dag_source(
    """
with DAG("sys_fal_outage", **ARGS) as dag:
    FalRunOperator.partial(task_id="deferred", model_id="fal-ai/fast-sdxl", deferrable=True, output_path=S3,
                           poll_interval=1).expand(arguments=[{"prompt": f"s6-deferred-{n}"} for n in range(4)])
    FalRunOperator.partial(task_id="on_worker", model_id="fal-ai/fast-sdxl", use_queue=True, output_path=S3,
                           poll_interval=1).expand(arguments=[{"prompt": f"s6-worker-{n}"} for n in range(2)])
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", deferrable=True, output_path=S3,
                        inputs=[{"prompt": f"s6-batch-{n}"} for n in range(8)])
"""
)


def batch_results_recorded(deployment, dag_id: str) -> tuple[int, int]:
    """Of the deferred batch's ended requests in ``dag_id``'s task logs: (recorded by the trigger, read by the task)."""
    logs = "\n".join(
        path.read_text(errors="replace")
        for path in (deployment.home / "logs").rglob("*")
        if path.is_file()
        if f"dag_id={dag_id}" in str(path)
    )
    rounds = re.findall(r"\d+ requests ended: (\d+) results recorded by the trigger, (\d+) read", logs)
    return sum(int(recorded) for recorded, _ in rounds), sum(int(unread) for _, unread in rounds)


def test_fal_unreachable_for_30_s_while_requests_run(deployment, emulator):
    """14 requests (4 deferred tasks, 2 queue tasks polling on their worker, a deferred batch of 8)
    run 15 s each; once all are submitted, fal's port refuses connections for 30 s, while its
    queue runs on. Every poller rides it out: all complete, none is sent twice."""
    emulator.control("queue-timing", {"run_time": 15})
    deployment.add_dag("sys_fal_outage", FAL_OUTAGE)
    deployment.trigger("sys_fal_outage", "s6")
    assert wait_for(lambda: len(emulator.submits("s6-")) == 14, timeout=180), emulator.submits("s6-")
    deployment.wait_states("sys_fal_outage", "s6", "deferred", 5)
    refused_before = deployment.all_logs().count("Connection refused")
    emulator.control("outage", {"seconds": 30})
    assert wait_for(lambda: refuses_connections(emulator.port), timeout=5, interval=0.05)
    down = time.monotonic()
    assert wait_for(lambda: not refuses_connections(emulator.port), timeout=60, interval=0.1)
    outage = time.monotonic() - down
    states_after_outage = deployment.task_states("sys_fal_outage", "s6")
    state = deployment.wait_run("sys_fal_outage", "s6", timeout=300)
    recovered = time.monotonic() - down - outage
    submits = emulator.submits("s6-")
    refused = deployment.all_logs().count("Connection refused") - refused_before
    summary = deployment.xcom("sys_fal_outage", "s6", "batch", "fal_batch_summary").get(-1, {})
    stored = [key for key in stored_images(deployment, "s6/") if key.endswith(".png")]
    print(
        f"\nsys_fal_outage: connections refused for {outage:.1f} s with 14 requests running; task states then "
        f"{states_after_outage}; run {state} {recovered:.1f} s after fal came back; failed connection attempts "
        f"logged: {refused}; submits {sum(submits.values())} for {len(submits)} inputs (resubmits: "
        f"{sum(submits.values()) - len(submits)}); batch succeeded {summary.get('succeeded')}; "
        f"images stored on S3 (s3://{BUCKET}/s6/): {len(stored)}"
    )
    assert outage >= 29
    assert refused > 0  # the pollers did meet the outage
    assert state == "success"
    assert len(submits) == 14 and set(submits.values()) == {1}
    assert summary["succeeded"] == 8
    assert len(stored) == 14
    # the triggerer read the batch's results itself and recorded them on S3 (aws_default), so the
    # worker stored them without reading fal (a result it could not record is read by the worker)
    recorded, unread = batch_results_recorded(deployment, "sys_fal_outage")
    print(f"sys_fal_outage: batch results recorded on S3 by the trigger {recorded}, read by the worker {unread}")
    assert recorded > 0 and recorded + unread == 8
    assert_no_api_key_in_logs(deployment)
