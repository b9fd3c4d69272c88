"""Nightly batch generation: every prompt of a file through a fal model, from one task.

Every night at 02:00 UTC this DAG reads the prompts file shipped with the examples
(``data/prompts.jsonl``; CSV files with a ``prompt`` column work too), sends every prompt to
``fal-ai/flux/schnell`` with :class:`FalBatchRunOperator` (at most 8 requests in flight,
slowing down by itself when fal answers 429). Each prompt's images are stored as soon as it is
done, and the operator writes a manifest with one line per prompt (its output with the stored
paths, or the error it got); a last task joins it with the prompt records into a report.

Safe to clear and rerun: the batch keeps its progress beside the images, so a retried or
cleared task reuses every prompt already generated and sends only the rest (see
docs/batch.md, "Retries, kills and what is paid").

Settings:

* connection ``fal_default`` (or the ``FAL_KEY`` environment variable): your fal API key;
* param ``prompts_file``: the prompts to generate (default: ``$FAL_EXAMPLE_PROMPTS``, else the
  shipped ``data/prompts.jsonl``);
* ``$FAL_EXAMPLE_OUTPUT_DIR``: where the images, the manifest and the report go, one folder per run under
  ``fal_batch_generation/`` (default: the system temp dir).

Up to 5% of the prompts may fail without failing the run (``max_failure_rate``); the
report lists them. Images stay downloadable for 7 days (``object_lifecycle``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_fal.batch.manifest import read_manifest
from airflow_provider_fal.operators.batch import FalBatchRunOperator

DEFAULT_PROMPTS = os.environ.get("FAL_EXAMPLE_PROMPTS") or str(Path(__file__).parent / "data" / "prompts.jsonl")
OUTPUT_DIR = Path(os.environ.get("FAL_EXAMPLE_OUTPUT_DIR") or tempfile.gettempdir()) / "fal_batch_generation"
#: The run's folder: its run id with what a file name should not hold (``:``, ``+``, ``~``) as ``_``.
RUN_FOLDER = "{{ run_id | replace(':', '_') | replace('+', '_') | replace('~', '_') }}"
#: What each prompt record may set for the model; anything else (e.g. ``id``) stays local.
MODEL_FIELDS = ("prompt", "image_size", "seed", "num_images")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records from a JSONL file (one JSON object a line) or a CSV file with a header."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            records = [dict(row) for row in csv.DictReader(handle)]
        else:
            records = [json.loads(line) for line in handle if line.strip()]
    for number, record in enumerate(records, start=1):
        if not str(record.get("prompt") or "").strip():
            raise ValueError(f"{path}: record {number} has no prompt: {record!r}")
        record.setdefault("id", f"{path.stem}-{number}")
    return records


def model_input(record: dict[str, Any]) -> dict[str, Any]:
    """The fal input of one prompt record (CSV gives strings: numbers are converted)."""
    arguments = {name: record[name] for name in MODEL_FIELDS if record.get(name) not in (None, "")}
    for name in ("seed", "num_images"):
        if name in arguments:
            arguments[name] = int(arguments[name])
    return arguments


with DAG(
    dag_id="fal_batch_generation",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["fal", "example", "batch"],
    params={"prompts_file": Param(DEFAULT_PROMPTS, type="string", description="JSONL or CSV file of prompts")},
) as dag:

    @task(multiple_outputs=True)
    def load_prompts(params: dict[str, Any] | None = None) -> dict[str, Any]:
        records = read_prompts((params or {})["prompts_file"])
        print(f"Loaded {len(records)} prompts")
        return {"records": records, "inputs": [model_input(record) for record in records]}

    loaded = load_prompts()

    generate = FalBatchRunOperator(
        task_id="generate_images",
        model_id="fal-ai/flux/schnell",
        inputs=loaded["inputs"],
        max_concurrency=8,  # keep at or below your fal account's concurrency limit
        max_failure_rate=0.05,  # up to 5% of the prompts may fail; the manifest lists them
        start_timeout=120,
        object_lifecycle=7 * 24 * 3600,  # the images stay downloadable for a week
        output_path=str(OUTPUT_DIR / RUN_FOLDER / "images"),  # and a copy of our own, per run
        progress_interval=30,
    )

    @task
    def write_report(records: list[dict[str, Any]], summary: dict[str, Any], run_id: str | None = None) -> str:
        """One JSON line per prompt, in the order of the prompts file, from the batch's manifest."""
        entries = read_manifest(summary["manifest"])  # one line per input, written by the operator
        run_dir = OUTPUT_DIR / re.sub(r"[^A-Za-z0-9_.-]", "_", run_id or "run")  # as RUN_FOLDER
        report = run_dir / "report.jsonl"
        with report.open("w", encoding="utf-8") as handle:
            for record, entry in zip(records, entries, strict=True):
                line: dict[str, Any] = {"id": record["id"], "prompt": record["prompt"], "ok": entry["ok"]}
                if entry["ok"]:
                    images = entry["output"].get("images", [])
                    line["images"] = [image.get("url") for image in images]
                    line["stored"] = [image.get("stored_path") for image in images]
                    line["seed"] = entry["output"].get("seed")
                else:
                    line["error"] = entry["error"]["message"]
                line["request_id"] = entry["request_id"]
                handle.write(json.dumps(line) + "\n")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{summary['succeeded']} of {summary['total']} prompts generated; report: {report}")
        print(f"Images and the batch manifest stored under {run_dir / 'images'}")
        return str(report)

    write_report(loaded["records"], generate.output)
