"""How many deferred fal requests one triggerer process polls, and at what CPU cost.

Many ``FalQueueTrigger`` instances run in one asyncio event loop in this process, exactly as
Airflow's triggerer runs them (connection looked up through Airflow's async API, one shared
``httpx`` client, status polls with ``logs=1``, runner log lines logged once each). The fal
emulator runs in a *separate* process so that its CPU is not counted. Every request stays
``IN_PROGRESS`` for the whole measurement, so each trigger keeps polling.

Measured over a steady window (after every trigger has polled at least twice): this
process's CPU seconds per wall second (1.0 = one full core) and the polls per second the
emulator answered. Baseline, same run, same requests and poll interval: the same number of
requests polled by the synchronous ``FalClient`` (requests) from one thread each, which is
what polling from workers or a thread pool costs.

    python bench/queue_triggerer_capacity.py [--requests 500] [--poll-interval 2] [--window 20]
    python bench/queue_triggerer_capacity.py --requests 100 500 1000

Target: 500 concurrent deferred requests under one core (cpu/wall < 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator

KEY = "bench-key-7d1f20"
MODEL = "fal-ai/fast-sdxl"


def polls_between(url: str, start: float, end: float) -> int:
    """Requests the emulator answered that started within [start, end) (Unix time)."""
    return sum(1 for record in emulator_control(url, KEY, "requests", timeout=120) if start <= record["started"] < end)


def submit_all(client, count: int) -> list:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: client.submit(MODEL, {"prompt": f"bench {i}", "seed": i}), range(count)))


@contextlib.contextmanager
def logs_to(path: Path):
    """Send fds 1 and 2 to ``path``: every poller logs its progress lines (each new runner line
    once, as a triggerer does), and writing them to a file keeps the console out of the numbers."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Window:
    """CPU and wall time of this process between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.cpu0, self.wall0, self.unix0 = time.process_time(), time.monotonic(), time.time()

    def stop(self) -> tuple[float, float]:
        self.unix1 = time.time()
        return time.process_time() - self.cpu0, time.monotonic() - self.wall0


def measure_threads(url: str, handles: list, interval: float, warmup: float, window: float) -> dict:
    """Baseline: one thread per request, blocking ``FalClient.status`` polls."""
    from airflow_provider_fal.core.client import FalClient
    from airflow_provider_fal.core.queue import QueueProgress

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=len(handles))
    stop = threading.Event()
    log = logging.getLogger("bench.threads")

    def poll(handle) -> None:
        progress = QueueProgress()  # the same log work as the triggers: each new line once
        while not stop.is_set():
            status = client.status(handle)
            for level, message in progress.updates(status):
                log.log(level, "%s", message)
            if status.completed:
                client.result(handle)
                return
            stop.wait(interval)

    threads = [threading.Thread(target=poll, args=(h,), daemon=True) for h in handles]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    clock = Window()
    clock.start()
    time.sleep(window)
    cpu, wall = clock.stop()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    client.close()
    polls = polls_between(url, clock.unix0, clock.unix1)
    return {"cpu": cpu, "wall": wall, "polls": polls}


def measure_triggers(url: str, handles: list, interval: float, warmup: float, window: float) -> dict:
    """The triggers, all in one event loop (this process's main thread)."""
    from airflow_provider_fal.triggers.fal import FalQueueTrigger

    async def main() -> dict:
        triggers = [FalQueueTrigger(request=h.to_dict(), poll_interval=interval) for h in handles]

        async def run(trigger) -> None:
            async for _ in trigger.run():
                return

        tasks = [asyncio.create_task(run(t)) for t in triggers]
        await asyncio.sleep(warmup)
        clock = Window()
        clock.start()
        await asyncio.sleep(window)
        cpu, wall = clock.stop()
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        for task in tasks:
            task.cancel()  # a triggerer shutdown: the requests are left running
        await asyncio.gather(*tasks, return_exceptions=True)
        polls = polls_between(url, clock.unix0, clock.unix1)
        return {"cpu": cpu, "wall": wall, "polls": polls, "failed": len(failed)}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[500], help="concurrent requests (several: a sweep)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls (operator default 2)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per approach")
    parser.add_argument("--skip-threads", action="store_true", help="skip the thread-per-request baseline")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fal-bench-triggerer-"))
    process, url = spawn_emulator(KEY)
    os.environ["AIRFLOW_CONN_FAL_DEFAULT"] = json.dumps(
        {"conn_type": "fal", "host": url, "password": KEY, "extra": {"queue_url": f"{url}/queue"}}
    )
    from airflow_provider_fal.core.client import FalClient  # imports Airflow, which sets up its logging

    submitter = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=16)
    warmup = 2.5 * args.poll_interval + 3
    print(f"emulator in pid {process.pid}; poll interval {args.poll_interval:g} s; window {args.window:g} s")
    print(f"{'requests':>8} {'approach':>22} {'cpu/wall':>9} {'polls/s':>8} {'expected':>8} {'cpu ms/poll':>11}")
    try:
        for count in args.requests:
            emulator_control(url, KEY, "reset", {}, timeout=120)
            emulator_control(
                url, KEY, "queue-timing", {"queue_wait": 0, "run_time": warmup + args.window + 60}, timeout=120
            )
            approaches = [("triggers, one loop", measure_triggers)]
            if not args.skip_threads:
                approaches.insert(0, ("threads + requests", measure_threads))
            results = {}
            for name, measure in approaches:
                handles = submit_all(submitter, count)
                with logs_to(workdir / "progress.log"):
                    result = measure(url, handles, args.poll_interval, warmup, args.window)
                results[name] = result
                per_poll = 1000 * result["cpu"] / max(result["polls"], 1)
                print(
                    f"{count:>8} {name:>22} {result['cpu'] / result['wall']:>9.3f} "
                    f"{result['polls'] / result['wall']:>8.1f} {count / args.poll_interval:>8.1f} {per_poll:>11.3f}"
                    + (f"  ({result['failed']} triggers failed)" if result.get("failed") else "")
                )
            if len(results) == 2:
                base, trig = results["threads + requests"], results["triggers, one loop"]
                ratio = (trig["cpu"] / trig["wall"]) / (base["cpu"] / base["wall"])
                print(f"{count:>8} {'triggers / threads':>22} {ratio:>9.3f}")
            verdict = (
                "within" if results["triggers, one loop"]["cpu"] / results["triggers, one loop"]["wall"] < 1 else "over"
            )
            print(f"{count:>8} {'target < 1 core':>22} {verdict:>9}")
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
