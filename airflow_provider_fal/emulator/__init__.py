"""An offline stand-in for fal.ai's gateway, for tests, demos and trying out DAGs.

Standard library only: it imports neither Airflow nor requests.

    from airflow_provider_fal.emulator import FalEmulator

    with FalEmulator(api_key="test-key") as emu:
        emu.url        # synchronous runs:  POST {emu.url}/fal-ai/fast-sdxl
        emu.queue_url  # queue API:         POST {emu.queue_url}/fal-ai/fast-sdxl

Or as a process: ``python -m airflow_provider_fal.emulator --port 8765``.
"""

from __future__ import annotations

from .core import FalEmulator
from .models import MODELS
from .state import RequestRecord, WebhookRecord

__all__ = ["MODELS", "FalEmulator", "RequestRecord", "WebhookRecord"]
