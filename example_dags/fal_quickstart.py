"""Quickstart: generate an image with a fal model and hand the result to the next task.

Runs against real fal when the ``fal_default`` connection (or ``FAL_KEY``) holds a real key,
and against the bundled emulator in ``make demo``. The downstream task receives the model's
JSON output through XCom and writes a small summary to ``FAL_EXAMPLE_OUTPUT_DIR``
(default: the system temp dir); the generated image itself is stored under ``images/`` there
before fal's URL expires (``output_path``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pendulum
from airflow.sdk import DAG, XComArg, task

from airflow_provider_fal.operators.fal import REQUEST_ID_XCOM_KEY, FalRunOperator

OUTPUT_DIR = Path(os.environ.get("FAL_EXAMPLE_OUTPUT_DIR", tempfile.gettempdir()))

with DAG(
    dag_id="fal_quickstart",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["fal", "example"],
    params={"prompt": "a lighthouse on a cliff at dawn, watercolour"},
) as dag:
    generate = FalRunOperator(
        task_id="generate_image",
        model_id="fal-ai/flux/schnell",
        arguments={
            "prompt": "{{ params.prompt }}",
            "image_size": "square",
            "num_images": 1,
            "seed": 42,
        },
        start_timeout=60,  # seconds a runner may take to start
        object_lifecycle=86400,  # keep the generated image on fal's CDN for a day
        # and a copy of our own, one folder per run: every run has a run_id, while `ds` is undefined
        # in runs without a logical date (asset-triggered, API runs, `airflow tasks test`)
        output_path=str(OUTPUT_DIR / "images" / "{{ run_id }}"),
    )

    @task
    def summarize(result: dict, request_id: str | None = None) -> dict:
        """Receive the model output from XCom and record where the images are."""
        images = [image["url"] for image in result.get("images", [])]
        stored = [image.get("stored_path") for image in result.get("images", [])]
        summary = {"request_id": request_id, "seed": result.get("seed"), "images": images, "stored": stored}
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        out_file = OUTPUT_DIR / "fal_quickstart_result.json"
        out_file.write_text(json.dumps(summary, indent=2))
        print(f"fal request {request_id}: {len(images)} image(s): {', '.join(images)}")
        print(f"Stored as: {', '.join(map(str, stored))}")
        print(f"Summary written to {out_file}")
        return summary

    summarize(generate.output, XComArg(generate, key=REQUEST_ID_XCOM_KEY))
