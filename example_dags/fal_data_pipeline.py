"""A data pipeline around two fal batches: product data in, catalogue copy and images out.

1. ``extract_products``: an upstream step produces the rows to work on (here a few products;
   in practice a query against your warehouse).
2. ``describe_products``: :class:`FalBatchRunOperator` sends one ``fal-ai/any-llm`` request per
   product, taking its inputs from the upstream task's XCom (an ``XComArg``).
3. ``image_prompts`` turns each description into an image prompt;
   ``render_images`` generates them with the image model of the ``image_model`` param.
4. ``publish_catalogue`` (downstream) receives every output, in product order, and writes the
   catalogue to ``$FAL_EXAMPLE_OUTPUT_DIR`` (default: the system temp dir).

Uses the ``fal_default`` connection (or ``FAL_KEY``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_fal.batch.results import outputs
from airflow_provider_fal.operators.batch import FalBatchRunOperator

with DAG(
    dag_id="fal_data_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["fal", "example", "batch"],
    params={
        "image_model": Param("fal-ai/flux/schnell", type="string", description="fal text-to-image model"),
        "style": Param("studio product photo, soft shadows, white background", type="string"),
    },
) as dag:

    @task
    def extract_products() -> list[dict[str, Any]]:
        return [
            {"sku": "MUG-001", "name": "Stoneware mug", "material": "glazed stoneware", "colour": "sage green"},
            {"sku": "LMP-014", "name": "Desk lamp", "material": "brushed brass", "colour": "gold"},
            {"sku": "BAG-203", "name": "Weekend bag", "material": "waxed canvas", "colour": "navy"},
            {"sku": "CHR-077", "name": "Lounge chair", "material": "oak and wool", "colour": "oatmeal"},
            {"sku": "CLK-310", "name": "Wall clock", "material": "walnut", "colour": "brown"},
        ]

    @task
    def description_requests(products: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One LLM input per product."""
        return [
            {
                "system_prompt": "You write one-sentence product descriptions for an online shop.",
                "prompt": f"Describe the {p['name']} made of {p['material']} in {p['colour']}.",
            }
            for p in products
        ]

    products = extract_products()

    describe = FalBatchRunOperator(
        task_id="describe_products",
        model_id="fal-ai/any-llm",
        inputs=description_requests(products),
        max_concurrency=4,
    )

    @task
    def image_prompts(products: list[dict[str, Any]], descriptions: list[dict[str, Any]], params=None) -> list:
        """One image input per product, from the product data and its new description."""
        style = (params or {}).get("style", "")
        return [
            {
                "prompt": f"{p['name']} in {p['colour']} {p['material']}. {d['output']['output'][:200]} {style}",
                "image_size": "square",
                "seed": int(re.sub(r"\D", "", p["sku"]) or 0),
            }
            for p, d in zip(products, descriptions, strict=True)
        ]

    render = FalBatchRunOperator(
        task_id="render_images",
        model_id="{{ params.image_model }}",
        inputs=image_prompts(products, describe.output),
        max_concurrency=4,
        object_lifecycle=30 * 24 * 3600,
    )

    @task
    def publish_catalogue(
        products: list[dict[str, Any]], descriptions: list[dict[str, Any]], images: list[dict[str, Any]]
    ) -> str:
        """The downstream consumer: every product with its description and image."""
        texts, pictures = outputs(descriptions), outputs(images)  # the batches failed on any error
        catalogue = [
            {**product, "description": text["output"], "image_url": picture["images"][0]["url"]}
            for product, text, picture in zip(products, texts, pictures, strict=True)
        ]
        out_dir = Path(os.environ.get("FAL_EXAMPLE_OUTPUT_DIR") or tempfile.gettempdir()) / "fal_data_pipeline"
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "catalogue.json"
        target.write_text(json.dumps(catalogue, indent=2))
        print(f"Published {len(catalogue)} products to {target}")
        return str(target)

    publish_catalogue(products, describe.output, render.output)
