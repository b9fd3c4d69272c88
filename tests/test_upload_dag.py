"""Large inputs through fal's CDN in a real DAG run (``airflow dags test``) against the emulator:
a FalRunOperator's local file above the threshold reaches the model as the upload's URL, and a
batch whose inputs share one reference image uploads it once."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.e2e

DAG = """
import json, os
from pathlib import Path
import pendulum
from airflow.sdk import DAG, task
from airflow_provider_fal.operators.batch import FalBatchRunOperator
from airflow_provider_fal.operators.fal import FalRunOperator

REF = Path(os.environ["REF"])

with DAG("fal_cdn_upload", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    single = FalRunOperator(task_id="single", model_id="emulator/describe-file", arguments={"image_url": REF})
    batch = FalBatchRunOperator(
        task_id="batch",
        model_id="emulator/describe-file",
        inputs=[{"image_url": REF, "n": n} for n in range(5)],
        max_concurrency=2,
    )

    @task
    def receive(single, batch):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"single": single, "batch": batch}, handle)

    receive(single.output, batch.output)
"""


def test_local_file_above_the_threshold_reaches_the_model_as_a_cdn_url(
    emulator, fal_connection, run_dag, out_file, tmp_path
):
    ref = tmp_path / "reference.png"
    data = b"\x89PNG\r\n\x1a\n" + hashlib.sha256(b"ref").digest() * 20_000  # 640 KB
    ref.write_bytes(data)

    result = run_dag("fal_cdn_upload", DAG, env={"OUT": str(out_file), "REF": str(ref)})
    assert result.succeeded, result.output[-4000:]

    received = json.loads(out_file.read_text())
    single = received["single"]
    assert single["source"] == "url" and single["url"].startswith(emulator.url + "/files/")
    assert single["url"].endswith("/reference.png")
    assert single["size"] == len(data) and single["sha256"] == hashlib.sha256(data).hexdigest()
    batch = [entry["output"] for entry in received["batch"]]
    assert [entry["sha256"] for entry in batch] == [single["sha256"]] * 5
    assert len({entry["url"] for entry in batch}) == 1  # one upload for the five inputs
    uploads = [r for r in emulator.requests if r.method == "POST" and r.path == "/files/upload"]
    assert len(uploads) == 2  # one per task (each task has its own hook and cache)
    runs = [r.json for r in emulator.requests if r.path == "/emulator/describe-file"]
    assert len(runs) == 6 and all(run["image_url"].startswith(emulator.url) for run in runs)
    assert API_KEY not in result.output
    assert emulator.state.cdn_tokens and not any(token in result.output for token in emulator.state.cdn_tokens)
