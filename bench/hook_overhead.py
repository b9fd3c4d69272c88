"""Per-call overhead of ``FalHook.run`` against two baselines, measured in the same run.

Three clients make the same synchronous call (``POST /{model}`` with the same JSON body) to
the fal emulator running with zero latency in a *separate* process:

* ``requests``  : a bare ``requests.Session().post(...)`` plus ``.json()``, the floor any
  requests-based client stands on (no validation, no retries, no error classification).
* ``fal_client``: fal's own ``fal_client.SyncClient.run`` (httpx), when it is installed.
* ``client``    : ``FalClient.run`` alone (for the breakdown: the hook minus Airflow's logging).
* ``hook``      : ``FalHook().run(...)`` with the connection resolved from the
  ``AIRFLOW_CONN_FAL_DEFAULT`` environment variable (no Airflow metadata DB involved).

Each client is warmed up, then the clients take turns in interleaved rounds (the order
rotates every round) so that machine noise hits all of them alike. Two numbers per call:
wall-clock time (what a task waits, emulator included) and this process's CPU time (the
client's own work, which a busy shared machine disturbs far less). Per-call times are the
median over rounds; the ratios are medians of the per-round ratios. Nothing here asserts a
time: it prints numbers and the targets (hook/requests <= 1.15, hook/fal_client <= 1.3).

fal_client always builds ``https://{FAL_RUN_HOST}/{model}``. To point it at the emulator's
plain-HTTP port, the module constant it formats its URLs from (``RUN_URL_FORMAT``) is set to
``http://127.0.0.1:PORT/`` for this process. Everything else (its httpx client, transport,
retry wrapper, header handling and JSON decoding) runs unchanged, and neither side pays for
TLS, so the comparison stays like for like.

    python bench/hook_overhead.py [--rounds 40] [--calls 50] [--model fal-ai/fast-sdxl]
    python bench/hook_overhead.py --profile   # where the hook's time goes (cProfile)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from airflow_provider_fal.emulator.process import spawn_emulator

KEY = "bench-key-3c9e41"
PAYLOAD = {
    "prompt": "a lighthouse on a cliff at dusk, volumetric light, 35mm photo",
    "image_size": "square",
    "num_images": 1,
    "seed": 1234,
}
TARGETS = {"requests": 1.15, "fal_client": 1.3}


def requests_caller(url: str, model: str) -> Callable[[], object]:
    import requests

    session = requests.Session()
    endpoint = f"{url}/{model}"
    headers = {"Authorization": f"Key {KEY}"}

    def call() -> object:
        response = session.post(endpoint, json=PAYLOAD, headers=headers, timeout=(10, 600))
        response.raise_for_status()
        return response.json()

    return call


def fal_client_caller(url: str, model: str) -> Callable[[], object] | None:
    try:
        import fal_client
        import fal_client.client as fal_client_module
    except ImportError:
        return None
    fal_client_module.RUN_URL_FORMAT = f"{url}/"  # see the module docstring
    client = fal_client.SyncClient(key=KEY)
    return lambda: client.run(model, PAYLOAD)


def client_caller(url: str, model: str) -> Callable[[], object]:
    """The hook's client alone: validation, headers, retries, classification, no Airflow logging."""
    from airflow_provider_fal.core.client import FalClient

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue")
    return lambda: client.run(model, PAYLOAD).output


def hook_caller(url: str, model: str) -> Callable[[], object]:
    os.environ["AIRFLOW_CONN_FAL_DEFAULT"] = json.dumps(
        {"conn_type": "fal", "host": url, "password": KEY, "extra": {"queue_url": f"{url}/queue"}}
    )
    from airflow_provider_fal.hooks.fal import FalHook

    hook = FalHook()
    return lambda: hook.run(model, PAYLOAD)


@contextlib.contextmanager
def output_to_devnull():
    """Send fds 1 and 2 to /dev/null: the hook's two log lines per call are formatted and
    written as in a task (whose log is a file), without flooding the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


METRICS = {
    "wall": "wall clock per call (client + emulator + scheduling)",
    "cpu": "CPU time of this process per call (the client's own work; steady on a busy machine)",
}


def per_call_us(call: Callable[[], object], calls: int) -> dict[str, float]:
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(calls):
        call()
    wall, cpu = time.perf_counter_ns() - wall, time.process_time_ns() - cpu
    return {"wall": wall / calls / 1000, "cpu": cpu / calls / 1000}


Times = dict[str, dict[str, list[float]]]  # metric -> client -> per-round microseconds per call


def measure(callers: dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int) -> Times:
    for call in callers.values():
        for _ in range(warmup):
            call()
    names = list(callers)
    times: Times = {metric: {name: [] for name in names} for metric in METRICS}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            for metric, value in per_call_us(callers[name], calls).items():
                times[metric][name].append(value)
    return times


def report(times: Times, model: str, rounds: int, calls: int) -> None:
    print(f"fal emulator in a separate process, zero latency; POST /{model}; {rounds} rounds x {calls} calls")
    for metric, title in METRICS.items():
        rows = times[metric]
        print(f"\n{metric}: {title}")
        print(f"  {'client':<12}{'median us':>12}{'min':>10}{'max':>10}")
        for name, values in rows.items():
            print(f"  {name:<12}{statistics.median(values):>12.1f}{min(values):>10.1f}{max(values):>10.1f}")
        hook = rows["hook"]
        own = statistics.median(h - c for h, c in zip(hook, rows["client"], strict=True))
        print(f"  hook - client: {own:+.1f} us/call (the hook's own work: mostly its one INFO log line per call)")
        for baseline, target in TARGETS.items():
            if baseline not in rows:
                print(f"  hook/{baseline}: not measured ({baseline} is not installed)")
                continue
            ratios = [h / b for h, b in zip(hook, rows[baseline], strict=True)]
            ratio = statistics.median(ratios)
            extra = statistics.median(h - b for h, b in zip(hook, rows[baseline], strict=True))
            verdict = "within" if ratio <= target else "OVER"
            print(
                f"  hook/{baseline}: {ratio:.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f}; "
                f"{extra:+.1f} us/call; target <= {target}: {verdict})"
            )


def profile(call: Callable[[], object], calls: int) -> None:
    """cProfile of the hook's calls, cumulative: the frames between FalHook.run and the socket."""
    profiler = cProfile.Profile()
    with output_to_devnull():
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=50, help="calls per client per round")
    parser.add_argument("--warmup", type=int, default=200, help="calls per client before measuring")
    parser.add_argument("--model", default="fal-ai/fast-sdxl")
    parser.add_argument("--profile", action="store_true", help="profile the hook instead of comparing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fal-bench-") as workdir:
        os.environ.setdefault("AIRFLOW_HOME", workdir)  # never touch ~/airflow
        process, url = spawn_emulator(KEY)
        try:
            if args.profile:
                call = hook_caller(url, args.model)
                with output_to_devnull():
                    for _ in range(args.warmup):
                        call()
                profile(call, args.calls * 5)
                return 0
            callers = {"requests": requests_caller(url, args.model)}
            fal = fal_client_caller(url, args.model)
            if fal is not None:
                callers["fal_client"] = fal
            callers["client"] = client_caller(url, args.model)
            callers["hook"] = hook_caller(url, args.model)
            with output_to_devnull():
                outputs = {name: call() for name, call in callers.items()}
                times = measure(callers, args.rounds, args.calls, args.warmup)
            if len({json.dumps(output, sort_keys=True) for output in outputs.values()}) != 1:
                raise SystemExit(f"the clients got different answers: {outputs}")
            report(times, args.model, args.rounds, args.calls)
        finally:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
