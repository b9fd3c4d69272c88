"""Command line: ``python -m airflow_provider_fal.emulator --port 8765``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .core import FalEmulator
from .signing import DEFAULT_USER_ID, SEED_BYTES

DEFAULT_KEY = "emulator-key"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_fal.emulator",
        description="Run an offline stand-in for fal.ai's gateway (sync runs, queue, files) on this machine.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind; 0 picks a free one (default 8765)")
    parser.add_argument(
        "--key",
        default=None,
        help=f"API key clients must send (default: $FAL_EMULATOR_KEY or {DEFAULT_KEY!r})",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="model run time of sync requests, seconds")
    parser.add_argument("--runner-wait", type=float, default=0.0, help="time before a runner starts, seconds")
    parser.add_argument("--queue-wait", type=float, default=0.0, help="time queued requests stay IN_QUEUE")
    parser.add_argument(
        "--run-time",
        type=float,
        default=None,
        help="time queued requests stay IN_PROGRESS (default: --latency)",
    )
    parser.add_argument(
        "--webhook-user-id", default=DEFAULT_USER_ID, help=f"X-Fal-Webhook-User-Id (default {DEFAULT_USER_ID!r})"
    )
    parser.add_argument(
        "--webhook-key-seed",
        type=_seed,
        default=None,
        help=f"{SEED_BYTES * 2} hex digits: a fixed webhook signing key, the same JWKS on every start "
        "(default: a fresh key per start)",
    )
    parser.add_argument("--ready-file", type=Path, default=None, help="write the base URL here once listening")
    parser.add_argument("--log-requests", action="store_true", help="log one line per request")
    return parser


def _seed(text: str) -> bytes:
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != SEED_BYTES:
        raise argparse.ArgumentTypeError(f"must be {SEED_BYTES * 2} hex digits")
    return seed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = args.key or os.environ.get("FAL_EMULATOR_KEY") or DEFAULT_KEY
    if args.log_requests:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    emu = FalEmulator(
        api_key=key,
        host=args.host,
        port=args.port,
        latency=args.latency,
        runner_wait=args.runner_wait,
        queue_wait=args.queue_wait,
        run_time=args.run_time,
        log_requests=args.log_requests,
        webhook_user_id=args.webhook_user_id,
        webhook_key_seed=args.webhook_key_seed,
    )
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    emu.start()
    try:
        print(f"fal emulator listening on {emu.url} (queue: {emu.queue_url})", flush=True)
        print(f"webhooks are signed; public key (JWKS): {emu.jwks_url}", flush=True)
        if args.ready_file is not None:
            temporary = args.ready_file.with_name(args.ready_file.name + ".tmp")
            temporary.write_text(emu.url + "\n")
            temporary.replace(args.ready_file)
        while not done.wait(0.5):
            pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
