"""System tests: a service of the deployment goes away for a while and comes back."""

from __future__ import annotations

import time

import pytest

from tests.system.test_deferred import dag_source

pytestmark = pytest.mark.system

BATCH = dag_source(
    """
with DAG("sys_db_outage", **ARGS) as dag:
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", deferrable=True, output_path=S3,
                        retries=1, retry_delay=timedelta(seconds=1),
                        inputs=[{"prompt": f"s6-{n}"} for n in range(12)])
"""
)


def test_postgres_stopped_for_10_s_during_a_deferred_batch(deployment, emulator):
    """A deferrable batch of 12 inputs (20 s requests) is deferred; PostgreSQL stops for 10 s.
    Components that exit are started again; the batch ends with each input submitted once."""
    emulator.control("queue-timing", {"run_time": 20})
    deployment.add_dag("sys_db_outage", BATCH)
    deployment.trigger("sys_db_outage", "s6")
    deployment.wait_states("sys_db_outage", "s6", "deferred", 1)
    deployment.postgres.stop()
    time.sleep(10)
    deployment.postgres.start()
    time.sleep(5)
    exited = [name for name, component in deployment.components.items() if not component.running]
    deployment.ensure_running()
    state = deployment.wait_run("sys_db_outage", "s6", timeout=240)
    submits = emulator.submits("s6-")
    tries = deployment.tries("sys_db_outage", "s6")
    summary = deployment.xcom("sys_db_outage", "s6", "batch", "fal_batch_summary").get(-1, {})
    print(
        f"\nsys_db_outage: {state}; components that exited during the outage: {exited or 'none'}; "
        f"tries {[(row[2], row[3]) for row in tries]}; submits {sum(submits.values())} for {len(submits)} inputs; "
        f"succeeded {summary.get('succeeded')}"
    )
    assert state == "success"
    assert len(submits) == 12 and set(submits.values()) == {1}
    assert summary["succeeded"] == 12
