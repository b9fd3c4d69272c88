"""System tests: kill -9 a component while fal requests are in flight, and count what was paid.

Submits are counted from the fal emulator's request log (POSTs carrying the input's prompt).
A kill is SIGKILL to the component's whole process group (the Celery pool and its task
processes too), as a lost machine would do.
"""

from __future__ import annotations

import time

import pytest

from tests.system.conftest import wait_for
from tests.system.test_deferred import assert_no_api_key_in_logs, dag_source

pytestmark = pytest.mark.system

TRIGGERER = dag_source(
    """
with DAG("sys_triggerer_kill", **ARGS) as dag:
    FalRunOperator.partial(task_id="deferred", model_id="fal-ai/fast-sdxl", deferrable=True,
                           poll_interval=1).expand(arguments=[{"prompt": f"s3-{n}"} for n in range(8)])
"""
)

WORKER = dag_source(
    """
with DAG("sys_worker_kill", **ARGS) as dag:
    FalRunOperator.partial(task_id="on_worker", model_id="fal-ai/flux/schnell", use_queue=True, poll_interval=1,
                           retries=1, retry_delay=timedelta(seconds=1)
                           ).expand(arguments=[{"prompt": f"s4-{n}"} for n in range(3)])
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", use_queue=True, output_path=S3,
                        max_concurrency=4, poll_interval=1, retries=1, retry_delay=timedelta(seconds=1),
                        inputs=[{"prompt": f"s4-batch-{n}"} for n in range(12)])
"""
)


def test_killing_the_triggerer_resubmits_nothing(deployment, emulator):
    """8 deferred requests run 20 s; the triggerer is SIGKILLed while they run and a new one
    takes their triggers over."""
    emulator.control("queue-timing", {"run_time": 20})
    deployment.add_dag("sys_triggerer_kill", TRIGGERER)
    deployment.trigger("sys_triggerer_kill", "s3")
    deployment.wait_states("sys_triggerer_kill", "s3", "deferred", 8)
    wait_for(lambda: len(deployment.postgres.query("select 1 from trigger where triggerer_id is not null")) >= 8)
    triggerer = deployment.components["triggerer"]
    triggerer.kill()
    killed_at = time.monotonic()
    in_flight = len(emulator.submits("s3-"))
    triggerer.start()
    state = deployment.wait_run("sys_triggerer_kill", "s3")
    submits = emulator.submits("s3-")
    results = deployment.xcom("sys_triggerer_kill", "s3", "deferred")
    print(
        f"\nsys_triggerer_kill: triggerer killed with {in_flight} requests in flight; run {state} "
        f"{time.monotonic() - killed_at:.1f} s after the kill; submits {sum(submits.values())} for "
        f"{len(submits)} prompts (resubmits: {sum(submits.values()) - len(submits)}); results in XCom: {len(results)}"
    )
    assert state == "success"
    assert in_flight == 8
    assert len(submits) == 8 and set(submits.values()) == {1}
    assert len(results) == 8 and all(result["images"] for result in results.values())


def test_killing_a_worker_mid_task_the_retries_reattach(deployment, emulator):
    """worker2 is stopped so that worker1 runs everything; worker1 is SIGKILLed once the 3 queue
    tasks (30 s requests) have submitted and the batch (12 inputs, 4 at a time, 4 s each) is in its
    second round. worker2 runs the retries."""
    emulator.control("queue-timing", {"run_time": 4})
    emulator.control("queue-timing", {"run_time": 30, "model_id": "fal-ai/flux/schnell"})  # the queue tasks
    worker1, worker2 = deployment.components["worker1"], deployment.components["worker2"]
    worker2.stop()
    try:
        deployment.add_dag("sys_worker_kill", WORKER)
        deployment.trigger("sys_worker_kill", "s4")
        assert wait_for(lambda: len(emulator.submits("s4-batch-")) >= 8, timeout=120)
        assert wait_for(lambda: len(emulator.submits("s4-")) >= 11, timeout=60)  # the 3 queue tasks too
        time.sleep(1)  # the second round's submits are answered and recorded
        sent_before_kill = emulator.submits("s4-batch-")
        worker1.kill()
        worker2.start()
        state = deployment.wait_run("sys_worker_kill", "s4", timeout=300)
    finally:
        deployment.ensure_running()
    submits = emulator.submits("s4-")
    tries = deployment.tries("sys_worker_kill", "s4")
    summary = deployment.xcom("sys_worker_kill", "s4", "batch", "fal_batch_summary").get(-1, {})
    queue_prompts = {prompt: n for prompt, n in submits.items() if not prompt.startswith("s4-batch-")}
    batch_prompts = {prompt: n for prompt, n in submits.items() if prompt.startswith("s4-batch-")}
    print(f"\nsys_worker_kill: {state}; batch inputs sent before the kill: {len(sent_before_kill)}")
    for row in tries:
        print(f"  try {row}")
    print(
        f"  queue tasks: submits {sum(queue_prompts.values())} for {len(queue_prompts)} prompts; batch: submits "
        f"{sum(batch_prompts.values())} for {len(batch_prompts)} inputs; summary succeeded="
        f"{summary.get('succeeded')} reused_from_earlier_tries={summary.get('reused_from_earlier_tries')} "
        f"reattached_requests={summary.get('reattached_requests')} unknown_submits={summary.get('unknown_submits')}"
    )
    assert state == "success"
    assert len(queue_prompts) == 3 and set(queue_prompts.values()) == {1}  # 0 duplicate submits
    assert len(batch_prompts) == 12 and set(batch_prompts.values()) == {1}
    assert max(row[2] for row in tries if row[3] == "success") == 2  # the retry finished them
    assert summary["succeeded"] == 12
    assert summary["reused_from_earlier_tries"] + summary["reattached_requests"] == len(sent_before_kill)
    assert_no_api_key_in_logs(deployment)
