"""Benchmark of a deferrable batch: how long the worker is held, polls per input, triggerer cost.

    python bench/batch_deferred.py                                   # 10,000 inputs, limit 40, 1 s each (~5 min)
    python bench/batch_deferred.py --inputs 2000 --limit 40 --run-time 1

The emulator (its own process) runs fal's queue with an account concurrency limit of
``--limit`` and ``--run-time`` seconds per request, so the ideal wall time is
``inputs x run_time / limit``. ``FalBatchRunOperator(deferrable=True, output_path=<tmp>)`` runs
its real ``execute`` / ``execute_complete`` in this process (the worker); every trigger it
defers with runs in a second, long-lived process (the triggerer), which receives the trigger's
serialized arguments, runs :class:`FalBatchTrigger` and sends the event back, as Airflow's
triggerer does. Printed: wall time against the ideal, the time the worker was held (its share
of the wall time), each worker call's wall time, worker CPU and emulator CPU (the emulator runs on
the same cores, so its share of each call is part of what the worker waits for), status polls
per input (from the emulator's request log), and CPU and peak RSS growth of worker and triggerer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator

KEY = "bench-key-5d1e0c"
MODEL = "emulator/echo"

TRIGGERER = r"""
import asyncio, json, resource, sys, time
from airflow_provider_fal.triggers.batch import FalBatchTrigger

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def first_event(trigger):
    async for event in trigger.run():
        return event.payload

baseline = rss_mib()
print("EVENT " + json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    event = asyncio.run(first_event(FalBatchTrigger(**json.loads(line))))
    print("EVENT " + json.dumps(event), flush=True)
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime
print("EVENT " + json.dumps({"cpu": cpu, "peak_mib": usage.ru_maxrss / 1024, "base_mib": baseline}))
"""


def read_event(process: subprocess.Popen) -> dict:
    """The next ``EVENT <json>`` line of the triggerer process (its log lines are skipped)."""
    for line in process.stdout:
        if line.startswith("EVENT "):
            return json.loads(line[6:])
    raise RuntimeError("the triggerer process ended without an event")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--run-time", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32, help="the operator's max_concurrency")
    args = parser.parse_args()

    emulator, url = spawn_emulator(KEY)
    connection = {"conn_type": "fal", "host": url, "password": KEY, "extra": {"queue_url": f"{url}/queue"}}
    os.environ["AIRFLOW_CONN_FAL_DEFAULT"] = json.dumps(connection)
    triggerer = subprocess.Popen(
        [sys.executable, "-c", TRIGGERER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert read_event(triggerer)["ready"]
        emulator_control(url, KEY, "concurrency-limit", {"limit": args.limit})
        emulator_control(url, KEY, "queue-timing", {"queue_wait": 0, "run_time": args.run_time})
        run(args, url, triggerer, emulator.pid)
    finally:
        if triggerer.poll() is None:
            triggerer.kill()
        emulator.terminate()
        emulator.wait(10)


def run(args: argparse.Namespace, url: str, triggerer: subprocess.Popen, emulator_pid: int) -> None:
    from airflow_provider_fal.operators.batch import FalBatchRunOperator

    with tempfile.TemporaryDirectory(prefix="fal-bench-deferred-") as output:
        operator = FalBatchRunOperator(
            task_id="bench",
            model_id=MODEL,
            inputs=[{"prompt": f"prompt {n}", "seed": n} for n in range(args.inputs)],
            deferrable=True,
            output_path=output,
            max_concurrency=args.concurrency,
            max_failure_rate=1,
            progress_interval=3600,
        )
        ti = SimpleNamespace(
            task_id="bench", dag_id="bench", run_id="r1", map_index=-1, try_number=1, xcom_push=lambda **_: None
        )
        context = {"ti": ti}
        base_rss, held, rounds, calls = rss_mib(), 0.0, 0, []
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        step, event = operator.execute, None
        while True:
            began, cpu, emulator_cpu = time.perf_counter(), self_cpu(), process_cpu(emulator_pid)
            deferred = None
            try:
                summary = step(context) if event is None else step(context, event)
            except BaseException as error:  # TaskDeferred is not an Exception on Airflow 3.3
                if type(error).__name__ != "TaskDeferred":
                    raise
                deferred = error
            took = time.perf_counter() - began
            held += took
            calls.append((took, self_cpu() - cpu, process_cpu(emulator_pid) - emulator_cpu))
            if deferred is None:
                break
            rounds += 1
            triggerer.stdin.write(json.dumps(deferred.trigger.serialize()[1]) + "\n")
            triggerer.stdin.flush()
            event = read_event(triggerer)
            step = operator.execute_complete
        wall = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        worker_peak = cpu_after.ru_maxrss / 1024
    triggerer.stdin.close()
    trig = read_event(triggerer)
    records = emulator_control(url, KEY, "requests", timeout=120)
    polls = sum(1 for r in records if r["method"] == "GET" and r["path"].endswith("/status"))
    submits = sum(1 for r in records if r["method"] == "POST")
    ideal = args.inputs * args.run_time / args.limit
    worker_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    print(f"deferrable batch: {args.inputs} inputs, account limit {args.limit}, {args.run_time:g} s each")
    print(f"  succeeded {summary['succeeded']}/{summary['total']}, submits {submits}")
    print(f"  wall {wall:.1f} s, ideal {ideal:.1f} s: {wall / ideal:.3f}x ideal (target <= 1.1)")
    print(f"  worker held {held:.1f} s over {rounds + 1} calls: {held / wall:.1%} of the wall time (target < 2%)")
    each = ", ".join(f"{w:.1f}/{c:.1f}/{e:.1f}" for w, c, e in calls)
    print(f"  worker calls, wall / worker CPU / emulator CPU (s): {each}")
    fetching = sum(w for w, _, _ in calls[1:])
    print(f"    submit call {calls[0][0]:.1f} s; the {len(calls) - 1} fetching calls {fetching:.1f} s")
    print(f"  status polls {polls}: {polls / args.inputs:.2f} per input (aim < 5)")
    print(f"  triggerer CPU {trig['cpu']:.1f} s: {trig['cpu'] / wall:.2f} core (target < 0.5)")
    print(f"  triggerer peak RSS {trig['peak_mib']:.0f} MiB, growth {trig['peak_mib'] - trig['base_mib']:.0f} MiB")
    print(f"  worker CPU {worker_cpu:.1f} s; peak RSS {worker_peak:.0f} MiB, growth {worker_peak - base_rss:.0f} MiB")


if __name__ == "__main__":
    main()
