"""System test: a 1,000-input queue batch whose Celery worker is SIGKILLed at 30, 60 and 90 %.

Airflow itself notices each lost try (heartbeat timeout) and retries it on the other worker.
Submits and result fetches are counted from the fal emulator's request log; the final manifest
and the stored images are read back from S3.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.system.conftest import wait_for
from tests.system.deployment import BUCKET
from tests.system.test_deferred import assert_no_api_key_in_logs, dag_source, s3_key
from tests.system.test_kills import batch_results_fetched, stored_images

pytestmark = pytest.mark.system

INPUTS = 1000
KILL_AT = (0.3, 0.6, 0.9)

BATCH = dag_source(
    f"""
with DAG("sys_batch_kills", **ARGS) as dag:
    FalBatchRunOperator(task_id="batch", model_id="fal-ai/fast-sdxl", use_queue=True, output_path=S3,
                        poll_interval=1, retries={len(KILL_AT)}, retry_delay=timedelta(seconds=1),
                        inputs=[{{"prompt": f"s8-{{n}}"}} for n in range({INPUTS})])
"""
)


def test_a_1000_input_batch_killed_at_30_60_and_90_percent_pays_each_input_once(deployment, emulator):
    """fal runs 20 requests at once, 1 s each (50 s for the batch). worker2 is stopped so that
    worker1 runs try 1; whenever the results fetched pass 30, 60 and 90 % of the inputs, the
    worker running the batch is SIGKILLed and the other one started for Airflow's retry.

    A retry catches up fast (fal ran on meanwhile), so the last try may end before the 90 % mark
    is seen: a kill only lands on a try still running, and at least the first two always do."""
    emulator.control("queue-timing", {"run_time": 1})
    emulator.control("concurrency-limit", {"limit": 20})
    workers = [deployment.components["worker1"], deployment.components["worker2"]]
    workers[1].stop()
    kills = []
    try:
        deployment.add_dag("sys_batch_kills", BATCH)
        started = time.monotonic()
        deployment.trigger("sys_batch_kills", "s8")
        for number, fraction in enumerate(KILL_AT):
            target = fraction * INPUTS
            assert wait_for(lambda: batch_results_fetched(emulator) >= target, timeout=300, interval=1)  # noqa: B023
            if deployment.task_states("sys_batch_kills", "s8").get("running", 0) == 0:
                break  # the batch's last try already ended: nothing to kill
            running, spare = workers[number % 2], workers[(number + 1) % 2]
            fetched = batch_results_fetched(emulator)
            running.kill()
            spare.start()
            kills.append((round(time.monotonic() - started, 1), running.name, fetched))
        state = deployment.wait_run("sys_batch_kills", "s8", timeout=600)
        elapsed = time.monotonic() - started
    finally:
        deployment.ensure_running()
    submits = emulator.submits("s8-")
    tries = deployment.tries("sys_batch_kills", "s8")
    summary = deployment.xcom("sys_batch_kills", "s8", "batch").get(-1, {})
    s3 = deployment.moto.client()
    manifest = [
        json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key=s3_key(summary["manifest"]))["Body"].iter_lines()
    ]
    images = [key for key in stored_images(deployment, "s8/") if key.endswith(".png")]
    print(f"\nsys_batch_kills: {state} in {elapsed:.1f} s; {INPUTS} inputs, fal at 20 requests at once, 1 s each")
    for at, worker, fetched in kills:
        print(f"  kill -9 of {worker} at {at} s, {fetched} results fetched so far")
    for _, _, try_number, ti_state, hostname, pid in tries:
        print(f"  try {try_number}: {ti_state} (host {hostname}, pid {pid})")
    print(
        f"  submits {sum(submits.values())} for {len(submits)} inputs (inputs submitted twice: "
        f"{sum(1 for n in submits.values() if n > 1)}); result fetches {batch_results_fetched(emulator)}; "
        f"last try's summary: succeeded={summary.get('succeeded')} reused_from_earlier_tries="
        f"{summary.get('reused_from_earlier_tries')} reattached_requests={summary.get('reattached_requests')} "
        f"unknown_submits={summary.get('unknown_submits')}; manifest lines ok: "
        f"{sum(1 for line in manifest if line['ok'])}/{len(manifest)}; images on S3: {len(images)}"
    )
    assert state == "success"
    killed_tries = len(tries) - 1  # every kill that found a try running failed it; the next try is a retry
    print(f"  kills that landed on a running try: {killed_tries} of {len(kills)}")
    assert killed_tries >= 2
    assert [(row[2], row[3]) for row in tries] == [(n, "failed") for n in range(1, killed_tries + 1)] + [
        (killed_tries + 1, "success")
    ]
    assert len(submits) == INPUTS and set(submits.values()) == {1}  # 0 inputs submitted twice
    assert summary["succeeded"] == INPUTS and summary["unknown_submits"] == 0
    assert len(manifest) == INPUTS and all(line["ok"] for line in manifest)  # 0 results lost
    assert sorted(line["index"] for line in manifest) == list(range(INPUTS))
    assert len(images) == INPUTS
    assert_no_api_key_in_logs(deployment)
