"""OpenLineage for the fal operators: facet building, and the events of a real DAG run."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import pytest

from airflow_provider_fal.operators.lineage import (
    LineageRecord,
    dataset_name,
    input_locations,
    stored_locations,
)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/fal/run-1/gen__images-0.png", ("file", "/data/fal/run-1/gen__images-0.png")),
        ("file:///data/fal/a.png", ("file", "/data/fal/a.png")),
        ("s3://aws_default@my-bucket/fal/run-1/a.png", ("s3://my-bucket", "fal/run-1/a.png")),
        ("s3://my-bucket/fal/a.png", ("s3://my-bucket", "fal/a.png")),
        ("gs://bucket/x/y.mp4", ("gs://bucket", "x/y.mp4")),
    ],
)
def test_dataset_names_follow_openlineage_naming(location, expected):
    assert dataset_name(location) == expected


def test_stored_locations_are_found_at_any_depth_in_order():
    output = {
        "images": [{"url": "u0", "stored_path": "/o/a.png"}, {"url": "u1", "stored_path": "/o/b.png"}],
        "video": {"url": "u2", "stored_path": "s3://c@b/v.mp4"},
        "seed": 3,
    }
    assert list(stored_locations(output)) == ["/o/a.png", "/o/b.png", "s3://c@b/v.mp4"]


def test_input_files_are_path_objects_and_file_uris_only_when_inlined():
    arguments = {
        "image_url": PurePosixPath("/in/ref.png"),
        "mask": {"url": "file:///in/mask.png"},
        "style": "https://v3.fal.media/files/s.png",
        "prompt": "a fox",
    }
    assert list(input_locations(arguments, uris=False)) == ["/in/ref.png"]
    assert list(input_locations(arguments, uris=True)) == ["/in/ref.png", "file:///in/mask.png"]


def test_a_record_keeps_each_request_and_file_once():
    record = LineageRecord()
    for request_id in ("r1", None, "r2", "r1"):
        record.add_request(request_id)
    record.add_output({"a": {"stored_path": "/o/a.png"}})
    record.add_output({"a": {"stored_path": "/o/a.png"}})
    assert record.request_ids == ["r1", "r2"] and record.stored == ["/o/a.png"]


DAG = """
import os
from pathlib import Path
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.batch import FalBatchRunOperator
from airflow_provider_fal.operators.fal import FalRunOperator

MEDIA = os.environ["MEDIA"]

with DAG("fal_lineage_e2e", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         default_args={"retries": 0}) as dag:
    generate = FalRunOperator(
        task_id="generate",
        model_id="fal-ai/fast-sdxl",
        arguments={"prompt": "a red fox", "num_images": 2},
        output_path=MEDIA + "/{{ run_id }}",
    )
    echo = FalRunOperator(
        task_id="echo",
        model_id="emulator/echo",
        arguments={"image": {"url": Path(os.environ["REFERENCE"]), "content_type": "image/png"}},
        output_path=MEDIA + "/{{ run_id }}/echo",
    )
    batch = FalBatchRunOperator(
        task_id="batch",
        model_id="fal-ai/fast-sdxl",
        inputs=[{"prompt": "one"}, {"prompt": "two"}],
        output_path=MEDIA + "/{{ run_id }}/batch",
    )
    generate >> echo >> batch
"""


def complete_events(path: Path) -> dict[str, dict]:
    """The COMPLETE events of the file transport, by task id."""
    events = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("eventType") == "COMPLETE" and "." in event["job"]["name"]:
            events[event["job"]["name"].rsplit(".", 1)[1]] = event
    return events


def test_a_real_run_emits_inputs_outputs_and_the_fal_facet(emulator, fal_connection, run_dag, tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    from airflow import __version__ as airflow_version

    if tuple(int(part) for part in airflow_version.split(".")[:2]) < (3, 1):
        # Seen with openlineage provider 2.20.3: `dags test` on 3.0 emits each task's COMPLETE from
        # the state change only (no START, no operator extraction, no facets for any operator).
        pytest.skip("airflow dags test on Airflow 3.0 does not run OpenLineage's task listener in the task")
    from airflow_provider_fal.emulator.png import render_png

    media, log = tmp_path / "media", tmp_path / "lineage.jsonl"
    reference = tmp_path / "reference.png"
    reference.write_bytes(render_png(8, 8, b"reference"))
    env = {
        "MEDIA": str(media),
        "REFERENCE": str(reference),
        "AIRFLOW__OPENLINEAGE__DISABLED": "False",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "fal-tests",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(log), "append": True}),
    }
    result = run_dag("fal_lineage_e2e", DAG, env=env)
    assert result.succeeded, result.output[-4000:]
    events = complete_events(log)
    assert set(events) >= {"generate", "echo", "batch"}, sorted(events)

    generate = events["generate"]
    stored = sorted(str(path) for path in media.rglob("generate__*.png"))
    assert len(stored) == 2
    assert sorted((o["namespace"], o["name"]) for o in generate["outputs"]) == [("file", path) for path in stored]
    facet = generate["run"]["facets"]["fal"]
    assert facet["modelId"] == "fal-ai/fast-sdxl" and len(facet["requestIds"]) == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", facet["requestIds"][0])

    echo = events["echo"]
    assert [(i["namespace"], i["name"]) for i in echo["inputs"]] == [("file", str(reference))]
    assert [o["name"] for o in echo["outputs"]] == [str(next(media.rglob("echo__image.png")))]

    batch = events["batch"]
    assert batch["run"]["facets"]["fal"]["modelId"] == "fal-ai/fast-sdxl"
    assert len(batch["run"]["facets"]["fal"]["requestIds"]) == 2
    assert len(list(media.rglob("batch__i*.png"))) == 2
    # a batch with output_path names its manifest (one line per input, with the stored files)
    assert [o["name"] for o in batch["outputs"]] == [str(next(media.rglob("batch__manifest.jsonl")))]
    assert facet["billedUnits"] == 2.0  # fal's X-Fal-Billable-Units: the two images of "generate"
    assert batch["run"]["facets"]["fal"]["billedUnits"] == 2.0  # one image per batch input
    assert "test-key" not in log.read_text()


def test_a_lineage_record_keeps_each_request_id_and_stored_file_once_in_order():
    record = LineageRecord()
    for n in [*range(3000), *range(3000)]:
        record.add_request(f"r{n}")
    record.add_request(None)
    assert record.request_ids == [f"r{n}" for n in range(3000)]
    record.add_stored("/media/manifest.jsonl")
    record.add_output({"images": [{"stored_path": "/media/a.png"}, {"stored_path": "/media/manifest.jsonl"}]})
    record.add_output({"image": {"stored_path": "/media/a.png"}})
    assert record.stored == ["/media/manifest.jsonl", "/media/a.png"]
