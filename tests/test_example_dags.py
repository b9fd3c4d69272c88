"""The example DAGs: they import cleanly and run end to end against the emulator."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import AIRFLOW_ENV, API_KEY, DAGS_TEST_NEEDS_RESERIALIZE, EXAMPLE_DAGS, airflow_cli

EXPECTED_DAGS = {"fal_quickstart", "fal_batch_generation", "fal_data_pipeline"}
PROMPTS = EXAMPLE_DAGS / "data" / "prompts.jsonl"
DAGS_FOLDER = Path(AIRFLOW_ENV["AIRFLOW__CORE__DAGS_FOLDER"])


def load_dagbag():
    try:  # Airflow >= 3.1
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.0
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(EXAMPLE_DAGS))  # examples are off: AIRFLOW__CORE__LOAD_EXAMPLES


def test_every_example_dag_imports_without_errors():
    dagbag = load_dagbag()
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) >= EXPECTED_DAGS
    nightly = dagbag.dags["fal_batch_generation"]
    assert nightly.schedule == "0 2 * * *"  # a scheduled, nightly batch


def test_the_shipped_prompt_files_read_the_same_way_as_jsonl_and_csv():
    spec = importlib.util.spec_from_file_location(
        "fal_batch_generation_example", EXAMPLE_DAGS / "fal_batch_generation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    jsonl = module.read_prompts(PROMPTS)
    rows = module.read_prompts(EXAMPLE_DAGS / "data" / "prompts.csv")
    assert len(jsonl) == 24 and len(rows) == 6
    assert [row["prompt"] for row in rows] == [record["prompt"] for record in jsonl[:6]]
    assert module.model_input(rows[0]) == {
        "prompt": jsonl[0]["prompt"],
        "image_size": jsonl[0]["image_size"],
        "seed": 2000,  # an int, although CSV gives strings
    }


@pytest.mark.e2e
def test_quickstart_runs_end_to_end(emulator, fal_connection, run_dag, tmp_path):
    result = run_dag(
        "fal_quickstart", EXAMPLE_DAGS / "fal_quickstart.py", env={"FAL_EXAMPLE_OUTPUT_DIR": str(tmp_path)}
    )
    assert result.succeeded, result.output[-4000:]
    summary = json.loads((tmp_path / "fal_quickstart_result.json").read_text())
    assert summary["images"] and summary["images"][0].startswith(emulator.url + "/files/")
    (stored,) = summary["stored"]
    assert stored.startswith(str(tmp_path / "images"))
    assert Path(stored).read_bytes() == requests.get(summary["images"][0], timeout=10).content
    assert emulator.count("POST", "/fal-ai/flux/schnell") == 1


@pytest.mark.e2e
def test_quickstart_task_runs_without_a_logical_date(emulator, fal_connection, airflow_db, tmp_path):
    """``airflow tasks test`` (no date given) makes a run without a logical date: every templated
    field must render without ``ds``, and the stored image goes under the run's own folder."""
    target = DAGS_FOLDER / "fal_quickstart.py"
    shutil.copy(EXAMPLE_DAGS / "fal_quickstart.py", target)
    try:
        env = {"FAL_EXAMPLE_OUTPUT_DIR": str(tmp_path)}
        if DAGS_TEST_NEEDS_RESERIALIZE:
            assert airflow_cli("dags", "reserialize", env=env).returncode == 0
        result = airflow_cli("tasks", "test", "fal_quickstart", "generate_image", env=env)
    finally:
        target.unlink(missing_ok=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "is undefined" not in output
    assert emulator.count("POST", "/fal-ai/flux/schnell") == 1
    stored = list((tmp_path / "images").rglob("*.png"))
    assert len(stored) == 1 and stored[0].parent.parent == tmp_path / "images"  # images/<run_id>/<file>


@pytest.mark.e2e
def test_nightly_batch_generation_runs_end_to_end(emulator, fal_connection, run_dag, tmp_path):
    emulator.inject_fault(503, "runner_scheduling_failure", times=2, model_id="fal-ai/flux/schnell")
    env = {"FAL_EXAMPLE_OUTPUT_DIR": str(tmp_path), "FAL_EXAMPLE_PROMPTS": str(PROMPTS)}
    result = run_dag("fal_batch_generation", EXAMPLE_DAGS / "fal_batch_generation.py", env=env)
    assert result.succeeded, result.output[-4000:]

    manifests = list(tmp_path.glob("fal_batch_generation/*/report.jsonl"))
    assert len(manifests) == 1
    lines = [json.loads(line) for line in manifests[0].read_text().splitlines()]
    (manifest,) = (manifests[0].parent / "images").glob("*__manifest.jsonl")  # the operator's own
    assert [json.loads(line)["request_id"] for line in manifest.read_text().splitlines()] == [
        line["request_id"] for line in lines
    ]
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    assert [line["id"] for line in lines] == [p["id"] for p in prompts]  # input order kept
    assert all(line["ok"] and line["images"][0].startswith(emulator.url + "/files/") for line in lines)
    stored = [Path(path) for line in lines for path in line["stored"]]
    assert len(stored) == 24 and all(path.parent == manifests[0].parent / "images" for path in stored)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in stored)  # the images, kept per run
    summary = json.loads((manifests[0].parent / "summary.json").read_text())
    assert summary["total"] == summary["succeeded"] == 24

    sent = [r for r in emulator.requests if r.method == "POST" and r.path == "/fal-ai/flux/schnell"]
    assert len(sent) == 24 + 2  # one per prompt, plus the two 503s retried
    assert all("id" not in r.json for r in sent)  # local bookkeeping fields are not sent to fal
    assert API_KEY not in result.output


@pytest.mark.e2e
def test_data_pipeline_runs_end_to_end(emulator, fal_connection, run_dag, tmp_path):
    result = run_dag(
        "fal_data_pipeline", EXAMPLE_DAGS / "fal_data_pipeline.py", env={"FAL_EXAMPLE_OUTPUT_DIR": str(tmp_path)}
    )
    assert result.succeeded, result.output[-4000:]
    catalogue = json.loads((tmp_path / "fal_data_pipeline" / "catalogue.json").read_text())
    assert [item["sku"] for item in catalogue] == ["MUG-001", "LMP-014", "BAG-203", "CHR-077", "CLK-310"]
    assert all(item["description"].startswith("[emulated") for item in catalogue)
    assert all(item["image_url"].startswith(emulator.url + "/files/") for item in catalogue)

    llm = [r for r in emulator.requests if r.path == "/fal-ai/any-llm"]
    images = [r for r in emulator.requests if r.method == "POST" and r.path == "/fal-ai/flux/schnell"]
    assert len(llm) == 5 and len(images) == 5
    # Each image prompt was built from that product's description, produced by the first batch.
    prompts = {r.json["prompt"].split(" in ")[0]: r.json["prompt"] for r in images}
    for item in catalogue:
        assert item["description"][:200] in prompts[item["name"]]
