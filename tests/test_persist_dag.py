"""``output_path`` and file inputs in real DAG runs (``airflow dags test``) against the emulator."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import requests

from airflow_provider_fal.batch.progress_log import LOG_NAME
from airflow_provider_fal.batch.progress_stores import DirectoryProgressStore
from airflow_provider_fal.media.storage import LocalStore
from tests.conftest import AIRFLOW_ENV, API_KEY

pytestmark = pytest.mark.e2e

DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, Asset, XComArg, task
from airflow_provider_fal.operators.fal import FalRunOperator

MEDIA = os.environ["MEDIA"]
MEDIA_ASSET = Asset("fal_media_e2e")

with DAG("fal_persist_e2e", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 0}) as dag:
    generate = FalRunOperator(
        task_id="generate",
        model_id="fal-ai/fast-sdxl",
        arguments={"prompt": "a red fox", "image_size": "square", "num_images": 2},
        output_path=MEDIA + "/{{ ds }}",
        outlets=[MEDIA_ASSET],
    )
    # image-to-image shape: the stored PNG goes back to fal as a data: URI (the echo model
    # returns what it received), and the echoed file object is stored again.
    echo = FalRunOperator(
        task_id="echo",
        model_id="emulator/echo",
        arguments={"image": {"url": "file://{{ ti.xcom_pull(task_ids='generate')['images'][1]['stored_path'] }}",
                             "content_type": "image/png"}},
        inline_file_uris=True,
        output_path="file://" + MEDIA + "/{{ ds }}/echo",
    )

    @task
    def receive(generated, echoed, stored_paths):
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"generated": generated, "echoed": echoed, "stored_paths": stored_paths}, handle)

    generate >> echo
    receive(generate.output, echo.output, XComArg(generate, key="fal_stored_paths"))
"""


def asset_event_extras(asset_name: str) -> list[dict]:
    """The ``extra`` of every event Airflow recorded for an asset, from the metadata DB."""
    with sqlite3.connect(Path(AIRFLOW_ENV["AIRFLOW_HOME"]) / "airflow.db") as db:
        rows = db.execute(
            "select e.extra from asset_event e join asset a on a.id = e.asset_id where a.name = ? order by e.id",
            (asset_name,),
        ).fetchall()
    return [json.loads(row[0]) for row in rows]


def sha256_of_url(url: str) -> str:
    return hashlib.sha256(requests.get(url, timeout=30).content).hexdigest()


def test_output_path_stores_media_and_downstream_gets_the_paths(emulator, fal_connection, run_dag, out_file, tmp_path):
    media = tmp_path / "media"
    result = run_dag("fal_persist_e2e", DAG, env={"OUT": str(out_file), "MEDIA": str(media)})
    assert result.succeeded, result.output[-4000:]

    received = json.loads(out_file.read_text())
    images = received["generated"]["images"]
    day_dirs = list(media.iterdir())
    assert len(day_dirs) == 1  # output_path was rendered: <media>/<ds>
    day = day_dirs[0]
    assert [image["stored_path"] for image in images] == [
        str(day / "generate__images-0.png"),
        str(day / "generate__images-1.png"),
    ]
    assert received["stored_paths"] == [image["stored_path"] for image in images]
    for image in images:
        assert image["url"].startswith(emulator.url + "/files/")  # the URL is kept
        data = Path(image["stored_path"]).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert hashlib.sha256(data).hexdigest() == sha256_of_url(image["url"])

    # The second task sent the stored PNG to fal inline, and stored what came back.
    sent = next(r for r in emulator.requests if r.method == "POST" and r.path == "/emulator/echo").json
    assert sent["image"]["url"].startswith("data:image/png;base64,")
    echoed = received["echoed"]["image"]
    assert echoed["stored_path"] == str(day / "echo" / "echo__image.png")
    assert Path(echoed["stored_path"]).read_bytes() == Path(images[1]["stored_path"]).read_bytes()

    assert asset_event_extras("fal_media_e2e") == [{"fal_stored_paths": received["stored_paths"]}]
    assert sorted(p.name for p in day.rglob("*")) == [
        "echo",
        "echo__image.png",
        "generate__images-0.png",
        "generate__images-1.png",
    ]
    assert API_KEY not in out_file.read_text()


FAILING_DAG = """
import os
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("fal_persist_fail", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 0}) as dag:
    FalRunOperator(
        task_id="generate",
        model_id="emulator/file",
        arguments={"size_bytes": 2000000, "content_type": "video/mp4", "key": "video"},
        output_path=os.environ["MEDIA"],
        fal_retry_policy={"max_attempts": 2, "initial_backoff": 0.05, "max_backoff": 0.05},
    )
    FalRunOperator(
        task_id="bad_path",
        model_id="fal-ai/fast-sdxl",
        arguments={"prompt": "never sent"},
        output_path="relative/media",
    )
"""


def test_truncated_media_fails_the_task_and_bad_output_path_fails_before_sending(
    emulator, fal_connection, run_dag, tmp_path
):
    media = tmp_path / "media"
    emulator.set_file_fault("truncate")
    result = run_dag("fal_persist_fail", FAILING_DAG, env={"MEDIA": str(media)})
    assert not result.succeeded
    assert "truncated" in result.output or "broke off" in result.output, result.output[-4000:]
    assert "output_path 'relative/media' is a relative path" in result.output, result.output[-4000:]
    posts = [r.path for r in emulator.requests if r.method == "POST"]
    assert posts == ["/emulator/file"]  # the task with a bad output_path sent nothing
    assert list(media.iterdir()) == []  # no partial file under any name
    assert API_KEY not in result.output


BATCH_DAG = """
import json, os
import pendulum
from airflow.sdk import DAG, XComArg, task
from airflow_provider_fal.operators.batch import FalBatchRunOperator, SUMMARY_XCOM_KEY

GOOD, GONE = os.environ["GOOD_URL"], os.environ["GONE_URL"]

with DAG("fal_persist_batch", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 0}) as dag:
    # The echo model returns its input, so each input below is also the output to persist.
    generate = FalBatchRunOperator(
        task_id="generate",
        model_id="emulator/echo",
        inputs=[
            {"image": {"url": GOOD, "content_type": "image/png"}},
            {"image": {"url": GONE, "content_type": "image/png"}},
            {"clips": [{"url": GOOD}], "tag": "no content type promised"},
        ],
        output_path=os.environ["MEDIA"],
        max_failure_rate=1,
    )

    @task
    def receive(returned, summary):
        from airflow_provider_fal.batch.manifest import read_manifest

        results = read_manifest(returned["manifest"])
        with open(os.environ["OUT"], "w") as handle:
            json.dump({"returned": returned, "results": results, "summary": summary}, handle)

    receive(generate.output, XComArg(generate, key=SUMMARY_XCOM_KEY))
"""


def test_batch_output_path_stores_each_input_writes_a_manifest_and_counts_unstorable_media_as_failed(
    emulator, fal_connection, run_dag, out_file, tmp_path
):
    media = tmp_path / "media"
    png = b"\x89PNG\r\n\x1a\n" + b"batch" * 100
    good = emulator.add_file(png, content_type="image/png", name="good.png")
    gone = f"{emulator.url}/files/{'0' * 32}/gone.png"
    env = {"OUT": str(out_file), "MEDIA": str(media), "GOOD_URL": good, "GONE_URL": gone}
    result = run_dag("fal_persist_batch", BATCH_DAG, env=env)
    assert result.succeeded, result.output[-4000:]

    received = json.loads(out_file.read_text())
    first, second, third = received["results"]
    assert first["ok"] and first["output"]["image"]["stored_path"] == str(media / "generate__i0__image.png")
    assert first["output"]["image"]["url"] == good
    assert not second["ok"] and second["error"]["error"] == "FalDownloadError"
    assert "gone (HTTP 404)" in second["error"]["message"]
    assert second["output"]["image"]["url"] == gone  # the output is kept with the failure
    assert third["ok"] and third["output"]["clips"][0]["stored_path"] == str(media / "generate__i2__clips-0.png")
    assert [line["index"] for line in received["results"]] == [0, 1, 2]
    assert all(len(line["fingerprint"]) == 64 and line["request_id"] for line in received["results"])
    # XCom carries the counts and the manifest's location, not the results.
    manifest = media / "generate__manifest.jsonl"
    assert received["returned"]["manifest"] == str(manifest)
    assert received["returned"]["succeeded"] == 2 and received["summary"] == received["returned"]
    assert received["summary"]["failed"] == 1
    names = ["generate__i0__image.png", "generate__i2__clips-0.png"]
    assert sorted(p.name for p in media.iterdir() if p.is_file()) == sorted([*names, manifest.name])
    for name in names:
        assert (media / name).read_bytes() == png
    # The batch's progress is kept beside the results: a record per input, group committed, on a
    # local disk in the writing process's log
    (progress,) = (media / "fal-batch-progress").iterdir()
    assert [p.name for p in progress.iterdir()] and all(LOG_NAME.match(p.name) for p in progress.iterdir())
    records = DirectoryProgressStore(LocalStore(media), progress.name).load()
    assert sorted(records) == [0, 1, 2]
    assert records[0]["state"] == "done" and records[0]["entry"]["ok"]
    # a paid output whose media could not be stored is kept, to be stored (not generated) again
    assert records[1]["state"] == "done" and records[1]["entry"]["output"]["image"]["url"] == gone


SHARED_DISK_DAG = """
import os
from pathlib import Path
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("fal_shared_disk", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
    FalRunOperator(
        task_id="echo_local",
        model_id="emulator/echo",
        arguments={"image": Path(os.environ["MEDIA"]) / "in.png", "prompt": "x"},
        output_path=os.environ["MEDIA"] + "/{{ run_id }}",
    )
"""


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_local_paths_under_an_executor_without_a_shared_disk_are_warned_about(
    emulator, fal_connection, run_dag, tmp_path, executor
):
    media = tmp_path / "media"
    media.mkdir()
    (media / "in.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    env = {"MEDIA": str(media), "AIRFLOW__CORE__EXECUTOR": executor}
    result = run_dag("fal_shared_disk", SHARED_DISK_DAG, env=env)
    assert result.succeeded, result.output[-4000:]
    warnings = [line for line in result.output.splitlines() if "whose workers do not share a disk" in line]
    if executor == "LocalExecutor":
        assert warnings == []
    else:
        assert warnings and "Local paths in output_path, arguments.image, but" in warnings[0]
        assert "CeleryExecutor" in warnings[0]
