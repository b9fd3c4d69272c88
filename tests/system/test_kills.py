"""System tests: kill -9 a component while fal requests are in flight, and count what was paid.

Submits are counted from the fal emulator's request log (POSTs carrying the input's prompt).
A kill is SIGKILL to the component's whole process group (the Celery pool and its task
processes too), as a lost machine would do.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.system.conftest import wait_for
from tests.system.deployment import BUCKET
from tests.system.test_deferred import assert_no_api_key_in_logs, dag_source

pytestmark = pytest.mark.system

TRIGGERER = dag_source(
    """
with DAG("sys_triggerer_kill", **ARGS) as dag:
    FalRunOperator.partial(task_id="deferred", model_id="fal-ai/fast-sdxl", deferrable=True,
                           poll_interval=1).expand(arguments=[{"prompt": f"s3-{n}"} for n in range(8)])
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", deferrable=True, poll_interval=1,
                        inputs=[{"prompt": f"s3-batch-{n}"} for n in range(42)])
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
    """50 deferred requests run 30 s: 8 deferred tasks (a trigger each) and a deferred batch of 42
    (one trigger). The triggerer is SIGKILLed while they run and a new one takes the 9 triggers over."""
    emulator.control("queue-timing", {"run_time": 30})
    deployment.add_dag("sys_triggerer_kill", TRIGGERER)
    deployment.trigger("sys_triggerer_kill", "s3")
    deployment.wait_states("sys_triggerer_kill", "s3", "deferred", 9)
    wait_for(lambda: len(deployment.postgres.query("select 1 from trigger where triggerer_id is not null")) >= 9)
    triggerer = deployment.components["triggerer"]
    triggerer.kill()
    killed_at = time.monotonic()
    in_flight = len(emulator.submits("s3-"))
    triggerer.start()
    state = deployment.wait_run("sys_triggerer_kill", "s3")
    submits = emulator.submits("s3-")
    results = deployment.xcom("sys_triggerer_kill", "s3", "deferred")
    summary = deployment.xcom("sys_triggerer_kill", "s3", "batch", "fal_batch_summary").get(-1, {})
    print(
        f"\nsys_triggerer_kill: triggerer killed with {in_flight} requests in flight; run {state} "
        f"{time.monotonic() - killed_at:.1f} s after the kill; submits {sum(submits.values())} for "
        f"{len(submits)} prompts (resubmits: {sum(submits.values()) - len(submits)}); results: {len(results)} deferred "
        f"tasks' in XCom, batch succeeded {summary.get('succeeded')} (reattached {summary.get('reattached_requests')})"
    )
    assert state == "success"
    assert in_flight == 50
    assert len(submits) == 50 and set(submits.values()) == {1}
    assert len(results) == 8 and all(result["images"] for result in results.values())
    assert summary["succeeded"] == 42


def batch_results_fetched(emulator) -> int:
    """Results of the batch's model fetched (GET .../requests/<id>, answered 200)."""
    return sum(
        1
        for r in emulator.requests()
        if r["method"] == "GET"
        and r["status"] == 200
        and re.fullmatch(r"/queue/fal-ai/fast-sdxl/requests/[^/]+", r["path"])
    )


def stored_images(deployment, prefix: str) -> list[str]:
    listing = deployment.moto.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_killing_a_worker_mid_task_the_retries_reattach(deployment, emulator):
    """worker2 is stopped so that worker1 runs everything. The account runs 7 requests at once:
    the 3 queue tasks' (30 s each) and 4 of the batch's 12 (4 s each; the rest wait IN_QUEUE).
    worker1 is SIGKILLed once every input is submitted and some batch results are fetched;
    worker2 runs the retries."""
    emulator.control("queue-timing", {"run_time": 4})
    emulator.control("queue-timing", {"run_time": 30, "model_id": "fal-ai/flux/schnell"})  # the queue tasks
    emulator.control("concurrency-limit", {"limit": 7})
    worker1, worker2 = deployment.components["worker1"], deployment.components["worker2"]
    worker2.stop()
    try:
        deployment.add_dag("sys_worker_kill", WORKER)
        deployment.trigger("sys_worker_kill", "s4")
        assert wait_for(lambda: len(emulator.submits("s4-")) == 15, timeout=120)
        assert wait_for(lambda: batch_results_fetched(emulator) >= 4, timeout=60)
        assert wait_for(lambda: len(stored_images(deployment, "s4/batch__")) >= 4, timeout=30)
        time.sleep(1)  # their progress records are written once the media are stored
        fetched_before_kill = batch_results_fetched(emulator)
        stored_before_kill = len(stored_images(deployment, "s4/batch__"))
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
    reused, reattached = summary.get("reused_from_earlier_tries"), summary.get("reattached_requests")
    print(
        f"\nsys_worker_kill: {state}; before the kill: {fetched_before_kill} batch results fetched, "
        f"{stored_before_kill} stored on S3"
    )
    for task_id, map_index, try_number, ti_state, hostname, pid in tries:
        print(f"  {task_id}[{map_index}] try {try_number}: {ti_state} (host {hostname}, pid {pid})")
    for path, workers in sorted(deployment.executions("sys_worker_kill", "s4").items()):
        print(f"  {path}: executed by {' -> '.join(workers)}")
    print(
        f"  queue tasks: submits {sum(queue_prompts.values())} for {len(queue_prompts)} prompts; batch: submits "
        f"{sum(batch_prompts.values())} for {len(batch_prompts)} inputs; retry's summary: succeeded="
        f"{summary.get('succeeded')} reused_from_earlier_tries={reused} reattached_requests={reattached} "
        f"unknown_submits={summary.get('unknown_submits')}"
    )
    assert state == "success"
    assert len(queue_prompts) == 3 and set(queue_prompts.values()) == {1}  # 0 duplicate submits
    assert len(batch_prompts) == 12 and set(batch_prompts.values()) == {1}
    assert {row[2] for row in tries if row[3] == "success"} == {2}  # every task: try 1 killed, try 2 finished
    assert summary["succeeded"] == 12 and summary["unknown_submits"] == 0
    assert reused >= 1 and reattached >= 1 and reused + reattached == 12
    assert_no_api_key_in_logs(deployment)


SYNC = dag_source(
    """
with DAG("sys_sync_kill", **ARGS) as dag:
    FalRunOperator(task_id="sync", model_id="fal-ai/flux/dev", arguments={"prompt": "s5-sync"},
                   retries=1, retry_delay=timedelta(seconds=1))
"""
)


def open_connections_to(port: int) -> int:
    """ESTABLISHED TCP connections from this machine to 127.0.0.1:``port`` (client side), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def test_killing_a_worker_in_the_synchronous_mode_pays_again(deployment, emulator):
    """The documented cost of the synchronous mode: a 12 s sync run whose worker is SIGKILLed
    while the POST is open is lost (fal still runs and bills it), and the retry sends it again."""
    emulator.control("latency", {"seconds": 12, "model_id": "fal-ai/flux/dev"})
    worker1, worker2 = deployment.components["worker1"], deployment.components["worker2"]
    worker2.stop()
    try:
        deployment.add_dag("sys_sync_kill", SYNC)
        deployment.trigger("sys_sync_kill", "s5")
        assert wait_for(lambda: open_connections_to(emulator.port) > 0, timeout=120), "the POST was never sent"
        time.sleep(1)
        worker1.kill()
        worker2.start()
        state = deployment.wait_run("sys_sync_kill", "s5", timeout=180)
    finally:
        deployment.ensure_running()
    assert wait_for(lambda: emulator.submits("s5-").get("s5-sync", 0) >= 2, timeout=20)  # recorded once answered
    submits = emulator.submits("s5-")
    tries = deployment.tries("sys_sync_kill", "s5")
    print(f"\nsys_sync_kill: {state}; tries {[(row[2], row[3]) for row in tries]}; sync POSTs (paid runs) {submits}")
    assert state == "success"
    assert [(row[2], row[3]) for row in tries] == [(1, "failed"), (2, "success")]
    assert submits == {"s5-sync": 2}  # the killed try's run was paid and lost; the retry paid again
