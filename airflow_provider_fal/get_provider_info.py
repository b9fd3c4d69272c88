"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point.

Airflow 3.2+ builds the connection form from ``connection-types`` here (``ui-field-behaviour``
and ``conn-fields``); older UIs ask ``FalHook.get_ui_field_behaviour()`` instead. Keep both
in step (a test checks they agree).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_fal import __version__

HOOK_CLASS = "airflow_provider_fal.hooks.fal.FalHook"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-fal",
        "name": "fal.ai",
        "description": "Run fal.ai models (image, video, audio, LLM) from Airflow: `fal.ai <https://fal.ai>`__.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "fal.ai",
                "external-doc-url": "https://docs.fal.ai",
                "tags": ["ai", "generative-ai"],
            }
        ],
        "hooks": [{"integration-name": "fal.ai", "python-modules": ["airflow_provider_fal.hooks.fal"]}],
        "operators": [
            {
                "integration-name": "fal.ai",
                "python-modules": ["airflow_provider_fal.operators.fal", "airflow_provider_fal.operators.batch"],
            }
        ],
        "triggers": [{"integration-name": "fal.ai", "python-modules": ["airflow_provider_fal.triggers.fal"]}],
        "connection-types": [
            {
                "connection-type": "fal",
                "hook-class-name": HOOK_CLASS,
                "hook-name": "fal.ai",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API Key", "host": "Base URL"},
                    "placeholders": {"host": "https://fal.run", "password": "your fal API key"},
                },
                "conn-fields": {
                    "queue_url": {
                        "label": "Queue URL",
                        "description": (
                            "Base URL of fal's queue API (default https://queue.fal.run). Set it whenever the "
                            "Base URL is not fal's (the emulator's is <Base URL>/queue): Test checks the key here."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                    "timeout": {
                        "label": "Read timeout (seconds)",
                        "description": "How long to wait for a synchronous answer (default 600).",
                        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                    },
                    "start_timeout": {
                        "label": "Default start timeout (seconds)",
                        "description": "Default X-Fal-Request-Timeout: deadline for a runner to start (>= 1).",
                        "schema": {"type": ["number", "null"], "minimum": 1},
                    },
                },
            }
        ],
    }


def fal_connection_form() -> dict[str, Any]:
    """The ``fal`` entry of ``connection-types``: the one definition of the connection form.

    ``FalHook.get_ui_field_behaviour`` and ``get_connection_form_widgets`` (asked by Airflow
    before 3.2) are derived from it, so the two forms cannot drift apart.
    """
    for entry in get_provider_info()["connection-types"]:
        if entry["connection-type"] == "fal":
            return entry
    raise LookupError("provider info declares no 'fal' connection type")  # pragma: no cover
