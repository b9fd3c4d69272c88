"""Benchmark of a batch under a fal account concurrency limit: FalBatchRunner against fal_client.

    python bench/batch_limit.py                          # limits 4, 10, 20, 40 (about 2 minutes)
    python bench/batch_limit.py --limits 4 10 --inputs 400 --latency 0.1 --concurrency 32
    python bench/batch_limit.py --rtt 50 --latency 1                 # across a 50 ms round trip (~12 minutes)

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

``--oracle`` adds two rows per limit, FalBatchRunner given the account's limit in advance
(:class:`KnownLimit`: no discovery, no 429): starting at the adaptive limit's first round (16)
and jumping to L at the first answer, and starting at L (one row where L <= 16). They show
what the discovery costs over knowing L with the same first round, and what the first round's
size costs.

``--rtt`` puts a network round trip (milliseconds) between the clients and the emulator
(:mod:`delay_proxy`): from a cloud worker a 429 takes that long to come back, and the requests
sent meanwhile go out blind. No client can then beat ``(latency + rtt) / latency`` (a slot on
fal idles one round trip between a run and the next), which the header prints as the floor.

Each is printed as its time over the ideal ``inputs x latency / limit`` (1.00x is the account's
full limit used all the time) with the number of 429 answers the emulator gave and their share
of all the requests it answered.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

from delay_proxy import delayed

from airflow_provider_fal.batch.scheduling import INITIAL_LIMIT, AdaptiveLimit
from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator

KEY = "bench-key-5d1e0c"
MODEL = "emulator/echo"


def count_429(url: str) -> int:
    return sum(1 for record in emulator_control(url, KEY, "requests") if record.get("status") == 429)


def share(refused: int, inputs: int) -> str:
    """``refused`` 429s and their share of the requests answered (each input once, plus the 429s)."""
    return f"{refused:4d} x 429, {100 * refused / (inputs + refused):4.1f}%"


class KnownLimit(AdaptiveLimit):
    """An oracle for the bench: the account's limit is known, so nothing is discovered. It starts
    ``first_round`` requests and allows the whole limit from the first answer on."""

    def __init__(self, limit: int, first_round: int) -> None:
        super().__init__(limit, initial=first_round)

    def _after_success(self) -> None:
        self._slow_start = False  # no slow start, so no pacing either
        self._limit = self.maximum


def run_batch(url: str, inputs: int, concurrency: int, known: KnownLimit | None = None) -> tuple[float, int]:
    """Seconds FalBatchRunner took, and its peak in flight; with ``known``, limited by that oracle."""
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.batch.runner import FalBatchRunner
    from airflow_provider_fal.core.client import FalClient, prepare_request

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=concurrency)
    runner = FalBatchRunner(client, max_concurrency=concurrency, progress_interval=3600)
    payload = [{"prompt": f"prompt {n}", "seed": n} for n in range(inputs)]
    told = contextlib.nullcontext()
    if known is not None:  # the runner makes its limit with AdaptiveLimit(max_concurrency): this one instead
        told = mock.patch("airflow_provider_fal.batch.runner.AdaptiveLimit", lambda _maximum: known)
    started = time.perf_counter()
    with told:
        result = runner.run(prepare_inputs(prepare_request(MODEL), payload))
    elapsed = time.perf_counter() - started
    assert result.succeeded == inputs, result.summary()
    return elapsed, result.peak_in_flight


def run_fal_client(url: str, inputs: int, concurrency: int) -> tuple[float, int] | None:
    """Seconds, and how many inputs failed (fal_client gives up on a request after its 10th 429)."""
    try:
        import fal_client
        import fal_client.client as fal_client_module
    except ImportError:
        return None
    fal_client_module.RUN_URL_FORMAT = f"{url}/"  # plain HTTP to the emulator (fal_client builds https URLs)
    client = fal_client.SyncClient(key=KEY)

    def run(n: int) -> bool:
        try:
            client.run(MODEL, {"prompt": f"prompt {n}", "seed": n})
        except fal_client.client.FalClientHTTPError:
            return False
        return True

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        failed = sum(not ok for ok in pool.map(run, range(inputs)))
    return time.perf_counter() - started, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[4, 10, 20, 40])
    parser.add_argument("--inputs", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument(
        "--concurrency", type=int, default=32, help="max_concurrency, the user's cap (2 x L where L >= it)"
    )
    parser.add_argument("--rtt", type=float, default=0.0, help="network round trip to the emulator, milliseconds")
    parser.add_argument("--oracle", action="store_true", help="also FalBatchRunner told the limit (KnownLimit)")
    args = parser.parse_args()

    print(f"{args.inputs} inputs x {args.latency * 1000:.0f} ms; time over the ideal (inputs x latency / limit)")
    if args.rtt:
        floor = (args.latency + args.rtt / 1000) / args.latency
        print(f"across a {args.rtt:.0f} ms round trip: no client does better than {floor:.2f}x")
    print(f"{'limit':>6} {'workers':>8} {'FalBatchRunner':>28} {'fal_client + threads':>28}")
    for limit in args.limits:
        workers = args.concurrency if limit < args.concurrency else 2 * limit
        emulator, url = spawn_emulator(KEY, "--latency", str(args.latency))
        try:
            emulator_control(url, KEY, "concurrency-limit", {"limit": limit})
            ideal = args.inputs * args.latency / limit
            with delayed(url, args.rtt / 2000) as far_url:
                seconds, _ = run_batch(far_url, args.inputs, workers)
                ours_429 = count_429(url)
                theirs = run_fal_client(far_url, args.inputs, workers)
            theirs_429 = count_429(url) - ours_429
        finally:
            emulator.terminate()
            emulator.wait()
        ours = f"{seconds / ideal:5.2f}x ({share(ours_429, args.inputs)})"
        other = "fal_client missing"
        if theirs is not None:
            other = f"{theirs[0] / ideal:5.2f}x ({share(theirs_429, args.inputs - theirs[1])})"
            if theirs[1]:
                other += f", {theirs[1]} failed"
        print(f"{limit:>6} {workers:>8} {ours:>28} {other:>28}")
        for first_round in sorted({min(INITIAL_LIMIT, limit), limit}) if args.oracle else ():
            seconds = run_known(args, limit, workers, first_round)
            print(f"{'':>6} {workers:>8} {seconds / ideal:5.2f}x knowing L, first round {first_round}")


def run_known(args: argparse.Namespace, limit: int, workers: int, first_round: int) -> float:
    """Seconds FalBatchRunner takes when told the account's limit (a fresh emulator)."""
    emulator, url = spawn_emulator(KEY, "--latency", str(args.latency))
    try:
        emulator_control(url, KEY, "concurrency-limit", {"limit": limit})
        with delayed(url, args.rtt / 2000) as far_url:
            seconds, _ = run_batch(far_url, args.inputs, workers, KnownLimit(limit, first_round))
        refused = count_429(url)
    finally:
        emulator.terminate()
        emulator.wait()
    assert refused == 0, f"an oracle that knows the limit was refused {refused} times"
    return seconds


if __name__ == "__main__":
    main()
