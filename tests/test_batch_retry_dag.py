"""A retried FalBatchRunOperator task sends only what did not succeed (real ``airflow dags test`` runs).

The first try of each batch task gets a few answers that fail its inputs transiently (an
ingress 503, which bills nothing), so the task fails and Airflow retries it. The retry must
reuse every input the first try finished (their outputs and stored files) and send only the
failed ones: counted from the emulator's request log. Progress kept under ``output_path``
(queue mode, media stored per input) and in the task's state / a Variable (sync mode, no
``output_path``).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.e2e

RETRY_DAG = """
import json, os
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.batch.manifest import read_manifest
from airflow_provider_fal.operators.batch import FalBatchRunOperator, SUMMARY_XCOM_KEY

with DAG("fal_batch_retry", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 1, "retry_delay": timedelta(seconds=0)}) as dag:
    stored = FalBatchRunOperator(
        task_id="stored",
        model_id="fal-ai/fast-sdxl",
        inputs=[{"prompt": f"stored {n}"} for n in range(12)],
        use_queue=True,
        poll_interval=0.1,
        output_path=os.environ["MEDIA"],
        fal_retry_policy={"max_attempts": 1},
    )
    in_db = FalBatchRunOperator(
        task_id="in_db",
        model_id="emulator/echo",
        inputs=[{"prompt": f"in_db {n}"} for n in range(12)],
        fal_retry_policy={"max_attempts": 1},
    )

    @task
    def receive(stored_summary, in_db_results, in_db_summary):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"stored": stored_summary, "manifest": read_manifest(stored_summary["manifest"]),
                       "in_db": in_db_results, "in_db_summary": in_db_summary}, handle)

    receive(stored.output, in_db.output, XComArg(in_db, key=SUMMARY_XCOM_KEY))
"""


def _sent(emulator, prefix: str) -> Counter:
    return Counter(
        r.json["prompt"]
        for r in emulator.requests
        if r.method == "POST" and str((r.json or {}).get("prompt", "")).startswith(prefix)
    )


def test_a_retried_batch_reuses_finished_inputs_and_sends_only_the_failed_ones(
    emulator, fal_connection, run_dag, out_file, tmp_path
):
    media = tmp_path / "media"
    emulator.set_queue_timing(queue_wait=0, run_time=0.2)
    for model in ("fal-ai/fast-sdxl", "emulator/echo"):
        emulator.inject_fault(status=503, error_type=None, html=True, times=3, model_id=model)
    result = run_dag("fal_batch_retry", RETRY_DAG, env={"OUT": str(out_file), "MEDIA": str(media)})
    assert result.succeeded, result.output[-4000:]
    got = json.loads(out_file.read_text())

    for prefix in ("stored", "in_db"):
        sent = _sent(emulator, prefix)
        assert sorted(sent) == sorted(f"{prefix} {n}" for n in range(12))
        # 9 inputs succeeded on the first try and were not sent again; 3 failed (503) and were resent
        assert sorted(sent.values()) == [1] * 9 + [2] * 3, sent
    assert "resuming from" in result.output and "9 inputs already done" in result.output

    summary = got["stored"]
    assert summary["succeeded"] == 12 and summary["reused_from_earlier_tries"] == 9
    manifest = got["manifest"]
    assert [line["index"] for line in manifest] == list(range(12)) and all(line["ok"] for line in manifest)
    stored_files = sorted(p.name for p in media.glob("stored__i*"))
    assert len(stored_files) == 12  # each input's image stored once, the first try's kept
    for line in manifest:
        (image,) = line["output"]["images"]
        assert image["stored_path"].startswith(str(media))

    assert [entry["output"]["prompt"] for entry in got["in_db"]] == [f"in_db {n}" for n in range(12)]
    assert got["in_db_summary"]["reused_from_earlier_tries"] == 9
    assert API_KEY not in result.output


LOST_DAG = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.batch import FalBatchRunOperator

with DAG("fal_batch_lost", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 2, "retry_delay": timedelta(seconds=0)}) as dag:
    for name, model, kwargs in [
        ("lost_fail", "fal-ai/flux/dev/lost_fail", {"use_queue": True}),
        ("lost_resubmit", "fal-ai/flux/dev/lost_resubmit", {"use_queue": True, "on_unknown_submit": "resubmit"}),
        ("sync_lost", "emulator/echo/sync_lost", {}),
    ]:
        FalBatchRunOperator(task_id=name, model_id=model, inputs=[{"prompt": f"{name} {n}"} for n in range(4)],
                            max_concurrency=1, poll_interval=0.1, fal_retry_policy={"max_attempts": 1}, **kwargs)
"""


def test_a_lost_answer_in_a_batch_is_never_resent_silently(emulator, fal_connection, run_dag):
    """The emulator drops the connection after reading one request of each batch (sent, no
    answer). Default: that input fails for good (maybe billed), the task fails without using its
    retries, and no input is sent twice. ``on_unknown_submit="resubmit"``: the retry sends only
    that input again, saying a duplicate may be billed."""
    from tests.test_operator_dag_runs import task_attempts
    from tests.test_queue_dag_runs import task_section

    emulator.set_queue_timing(queue_wait=0, run_time=0.1)
    for model in ("fal-ai/flux/dev/lost_fail", "fal-ai/flux/dev/lost_resubmit", "emulator/echo/sync_lost"):
        emulator.inject_fault(drop_connection=True, times=1, model_id=model)
    result = run_dag("fal_batch_lost", LOST_DAG)
    assert not result.succeeded

    for name in ("lost_fail", "sync_lost"):
        assert sorted(_sent(emulator, name).values()) == [1, 1, 1, 1]  # the lost one was not resent
        assert task_attempts("fal_batch_lost", name) == ("failed", 1)  # retries unspent
        section = task_section(result.output, name)
        assert "got no answer" in section and "fal dashboard" in section, section[-3000:]
        assert "FalRequestLostError x1" in section
    assert "synchronous run of fal model emulator/echo/sync_lost" in task_section(result.output, "sync_lost")

    sent = _sent(emulator, "lost_resubmit")
    assert sorted(sent.values()) == [1, 1, 1, 2], sent
    assert task_attempts("fal_batch_lost", "lost_resubmit") == ("success", 2)
    section = task_section(result.output, "lost_resubmit")
    assert "DUPLICATE MAY BE BILLED" in section and "3 inputs already done" in section


SHARDED_DAG = """
import os
import pendulum
from airflow.sdk import DAG, task
from airflow_provider_fal.batch.inputs import chunked
from airflow_provider_fal.operators.batch import FalBatchRunOperator

with DAG("fal_batch_sharded", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:

    @task
    def load_chunks():
        return chunked([{"prompt": f"shard {n}"} for n in range(25)], size=10)

    FalBatchRunOperator.partial(
        task_id="generate", model_id="emulator/echo", output_path=os.environ["MEDIA"], max_concurrency=4
    ).expand(inputs=load_chunks())
"""


def test_a_batch_sharded_with_mapping_keeps_a_manifest_and_progress_per_chunk(
    emulator, fal_connection, run_dag, tmp_path
):
    from airflow_provider_fal.batch.manifest import read_manifest

    media = tmp_path / "media"
    result = run_dag("fal_batch_sharded", SHARDED_DAG, env={"MEDIA": str(media)})
    assert result.succeeded, result.output[-4000:]
    assert sorted(_sent(emulator, "shard").values()) == [1] * 25
    manifests = sorted(media.glob("generate__m*__manifest.jsonl"))
    assert [p.name for p in manifests] == [f"generate__m{n}__manifest.jsonl" for n in range(3)]
    prompts = [line["output"]["prompt"] for path in manifests for line in read_manifest(str(path))]
    assert prompts == [f"shard {n}" for n in range(25)]  # chunks in order, inputs in order within each
    folders = sorted(p.name.split("__")[1] for p in (media / "fal-batch-progress").iterdir())
    assert folders == ["m0", "m1", "m2"]  # one durable progress per chunk
