"""Command line: ``FAL_EMULATOR_KEY=... python -m airflow_provider_fal.emulator --port 8765``.

The key (``$FAL_EMULATOR_KEY``) and the optional control token (``$FAL_EMULATOR_CONTROL_TOKEN``)
are read from the environment: a ``--key`` value is visible to every user of the machine in
``ps``, so it is accepted with a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
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
        help=f"API key clients must send; prefer $FAL_EMULATOR_KEY, since --key shows in ps (default: {DEFAULT_KEY!r})",
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


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the emulator reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, key_on_command_line: bool, default_key: bool) -> list[str]:
    """What the operator of the emulator should hear before it starts serving."""
    warnings = []
    if key_on_command_line:
        warnings.append(
            "WARNING: --key is visible to every user of this machine (ps, /proc); set FAL_EMULATOR_KEY instead."
        )
    if not is_loopback(host):
        warnings.append(
            f"WARNING: --host {host} exposes the emulator beyond this machine: anyone who can reach the port "
            "and knows the key can run models, and, with the key or the control token, lock the account, "
            "inject faults and read recorded requests (prompts) through /_emulator/. There is no TLS. "
            "It is a test double: bind 127.0.0.1 unless other machines must reach it."
        )
        if default_key:
            warnings.append(f"WARNING: the key is the public default {DEFAULT_KEY!r}; set FAL_EMULATOR_KEY.")
    return warnings


def banner(emu: FalEmulator, host: str) -> str:
    """The first line printed: where the emulator really listens."""
    if host in ("", "0.0.0.0", "::"):
        return (
            f"fal emulator listening on all interfaces ({host or '0.0.0.0'}) port {emu.port}; "
            f"from this machine: {emu.url} (queue: {emu.queue_url})"
        )
    return f"fal emulator listening on {emu.url} (queue: {emu.queue_url})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from_environment = os.environ.get("FAL_EMULATOR_KEY")
    key = args.key or from_environment or DEFAULT_KEY
    for warning in exposure_warnings(args.host, args.key is not None, key == DEFAULT_KEY):
        print(warning, file=sys.stderr, flush=True)
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
        control_token=os.environ.get("FAL_EMULATOR_CONTROL_TOKEN") or None,
    )
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    emu.start()
    try:
        print(banner(emu, args.host), flush=True)
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
