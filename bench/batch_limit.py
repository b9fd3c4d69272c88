"""Benchmark of a batch under a fal account concurrency limit: FalBatchRunner against fal_client.

    python bench/batch_limit.py                          # limits 4, 10, 20, 40 (about 2 minutes)
    python bench/batch_limit.py --limits 4 10 --inputs 400 --latency 0.1 --concurrency 32

fal answers 429 to a synchronous request when the account already runs as many requests as its
concurrency limit allows. The emulator (its own process, ``--latency`` per request) is given
that limit L, which the clients do not know. Both get the same number of workers, more than L:
``--concurrency``, or 2 x L where L is at or above it (L=40: 80). That number is the user's cap
(``max_concurrency``, a thread each): below L the cap, not the account, would bind (the ideal
below would be out of reach by construction), and at L there would be no limit to find.

* **FalBatchRunner** (what ``FalBatchRunOperator`` runs), with its adaptive limit and its own
  retry policy;
* **fal_client + threads**: ``fal_client.SyncClient.run`` from a thread pool of the same size,
  with fal_client's own retries of 429.

Each is printed as its time over the ideal ``inputs x latency / limit`` (1.00x is the account's
full limit used all the time) with the number of 429 answers the emulator gave and their share
of all the requests it answered.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator

KEY = "bench-key-5d1e0c"
MODEL = "emulator/echo"


def count_429(url: str) -> int:
    return sum(1 for record in emulator_control(url, KEY, "requests") if record.get("status") == 429)


def share(refused: int, inputs: int) -> str:
    """``refused`` 429s and their share of the requests answered (each input once, plus the 429s)."""
    return f"{refused:4d} x 429, {100 * refused / (inputs + refused):4.1f}%"


def run_batch(url: str, inputs: int, concurrency: int) -> tuple[float, int]:
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.batch.runner import FalBatchRunner
    from airflow_provider_fal.core.client import FalClient, prepare_request

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=concurrency)
    runner = FalBatchRunner(client, max_concurrency=concurrency, progress_interval=3600)
    payload = [{"prompt": f"prompt {n}", "seed": n} for n in range(inputs)]
    started = time.perf_counter()
    result = runner.run(prepare_inputs(prepare_request(MODEL), payload))
    elapsed = time.perf_counter() - started
    assert result.succeeded == inputs, result.summary()
    return elapsed, result.peak_in_flight


def run_fal_client(url: str, inputs: int, concurrency: int) -> float | None:
    try:
        import fal_client
        import fal_client.client as fal_client_module
    except ImportError:
        return None
    fal_client_module.RUN_URL_FORMAT = f"{url}/"  # plain HTTP to the emulator (fal_client builds https URLs)
    client = fal_client.SyncClient(key=KEY)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda n: client.run(MODEL, {"prompt": f"prompt {n}", "seed": n}), range(inputs)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[4, 10, 20, 40])
    parser.add_argument("--inputs", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument(
        "--concurrency", type=int, default=32, help="max_concurrency, the user's cap (2 x L where L >= it)"
    )
    args = parser.parse_args()

    print(f"{args.inputs} inputs x {args.latency * 1000:.0f} ms; time over the ideal (inputs x latency / limit)")
    print(f"{'limit':>6} {'workers':>8} {'FalBatchRunner':>28} {'fal_client + threads':>28}")
    for limit in args.limits:
        workers = args.concurrency if limit < args.concurrency else 2 * limit
        emulator, url = spawn_emulator(KEY, "--latency", str(args.latency))
        try:
            emulator_control(url, KEY, "concurrency-limit", {"limit": limit})
            ideal = args.inputs * args.latency / limit
            seconds, _ = run_batch(url, args.inputs, workers)
            ours_429 = count_429(url)
            theirs = run_fal_client(url, args.inputs, workers)
            theirs_429 = count_429(url) - ours_429
        finally:
            emulator.terminate()
            emulator.wait()
        ours = f"{seconds / ideal:5.2f}x ({share(ours_429, args.inputs)})"
        other = "fal_client missing"
        if theirs is not None:
            other = f"{theirs / ideal:5.2f}x ({share(theirs_429, args.inputs)})"
        print(f"{limit:>6} {workers:>8} {ours:>28} {other:>28}")


if __name__ == "__main__":
    main()
