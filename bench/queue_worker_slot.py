"""Worker-slot seconds per fal request: synchronous vs deferrable FalRunOperator.

Real Airflow runs (``airflow dags test``) of two DAGs with the same N generations against the
fal emulator (in this process, on 127.0.0.1), where one generation takes ``--generation``
seconds (sync: the call's latency; queue: the time a request stays IN_PROGRESS):

* ``sync``: N ``FalRunOperator`` tasks in the default synchronous mode (the baseline);
* ``deferrable``: the same N tasks with ``deferrable=True``;
* ``noop``: N tasks that do nothing, for Airflow's own cost of starting a task.

``dags test`` logs when it starts a task on the worker side, hands it to the (in-process)
trigger, resumes it, and ends it. Worker-slot time is the time between those markers spent on
the worker side, summed per task; trigger time is reported separately. What this leaves out:
the executor's process start for each task start (``dags test`` runs tasks in-process), which
a deferrable task pays twice (submit, then resume) and a synchronous one once.

A real 30-second generation makes the run slow, so by default a 3-second one is measured and
scaled: the synchronous task holds its slot for the whole generation (scaled = measured - 3 s
+ 30 s), the deferrable one does not depend on it (scaled = measured). ``--generation 30``
measures the real thing.

    python bench/queue_worker_slot.py [--requests 5] [--generation 3] [--scale-to 30]

Target: deferrable holds a worker under 2 s per request.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

KEY = "bench-key-51c0aa"
DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")):
    for i in range({count}):
        FalRunOperator(task_id=f"gen_{{i}}", model_id="fal-ai/fast-sdxl",
                       arguments={{"prompt": f"bench {{i}}", "seed": i}}, deferrable={deferrable}, poll_interval=1.0)
"""
NOOP_DAG = """
import pendulum
from airflow.sdk import DAG, task

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")):
    for i in range({count}):
        task(task_id=f"gen_{{i}}")(lambda: None)()
"""
STAMP = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?)")
RUNNING = re.compile(r"\[DAG TEST\] running task <TaskInstance: [^.\s]+\.(\S+) ")
ENDED = re.compile(r"\[DAG TEST\] end task task_id=(\S+)")


def stamp(line: str) -> float | None:
    found = STAMP.search(line)
    if not found:
        return None
    return datetime.fromisoformat(found.group(1).replace(",", ".").replace(" ", "T")).timestamp()


def segments(output: str) -> dict[str, dict[str, float]]:
    """Per task: seconds on the worker side and in the trigger, from ``dags test``'s markers."""
    times: dict[str, dict[str, float]] = {}
    current: str | None = None
    since: float | None = None
    phase = "worker"
    for line in output.splitlines():
        if "[DAG TEST]" not in line or (at := stamp(line)) is None:
            continue
        if running := RUNNING.search(line):
            current, since, phase = running.group(1), at, "worker"
            times.setdefault(current, {"worker": 0.0, "trigger": 0.0, "between": 0.0, "starts": 0})
            times[current]["starts"] += 1
        elif current and since is not None and ("running trigger in line" in line or "Trigger completed" in line):
            times[current][phase] += at - since
            since, phase = at, ("trigger" if "running trigger in line" in line else "between")
        elif (ended := ENDED.search(line)) and current == ended.group(1) and since is not None:
            times[current]["worker"] += at - since
            current = since = None
    return times


def airflow(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, cwd=home, timeout=1800
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5, help="generations per mode")
    parser.add_argument("--generation", type=float, default=3.0, help="seconds one generation takes")
    parser.add_argument("--scale-to", type=float, default=30.0, help="generation length to scale the result to")
    args = parser.parse_args()

    from airflow_provider_fal.emulator import FalEmulator

    home = Path(tempfile.mkdtemp(prefix="fal-bench-slot-"))
    (home / "dags").mkdir()
    emulator = FalEmulator(api_key=KEY, latency=args.generation, run_time=args.generation).start()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_CONN_FAL_DEFAULT": json.dumps(
            {"conn_type": "fal", "host": emulator.url, "password": KEY, "extra": {"queue_url": emulator.queue_url}}
        ),
    }
    migrated = airflow(home, env, "db", "migrate")
    if migrated.returncode != 0:
        raise SystemExit(migrated.stderr[-3000:])
    print(f"{args.requests} generations of {args.generation:g} s per mode, airflow dags test; logs in {home}")
    results = {}
    try:
        for mode in ("noop", "sync", "deferrable"):
            dag_id = f"bench_slot_{mode}"
            template = NOOP_DAG if mode == "noop" else DAG
            # One extra task: the first task a `dags test` run starts pays one-time imports; it is
            # left out of the numbers.
            source = template.format(dag_id=dag_id, count=args.requests + 1, deferrable=mode == "deferrable")
            (home / "dags" / f"{dag_id}.py").write_text(textwrap.dedent(source))
            airflow(home, env, "dags", "reserialize")  # needed before Airflow 3.3; harmless after
            started = time.monotonic()
            run = airflow(home, env, "dags", "test", dag_id)
            wall = time.monotonic() - started
            output = run.stdout + run.stderr
            (home / f"{mode}.log").write_text(output)
            if run.returncode != 0 or "state=success" not in output:
                raise SystemExit(f"{mode} run failed:\n{output[-4000:]}")
            per_task = segments(output)
            if len(per_task) != args.requests + 1:
                raise SystemExit(f"{mode}: found {len(per_task)} tasks in the log, expected {args.requests + 1}")
            del per_task[next(iter(per_task))]  # the first task `dags test` ran: the warm-up
            results[mode] = {
                "worker": statistics.median(t["worker"] for t in per_task.values()),
                "trigger": statistics.median(t["trigger"] for t in per_task.values()),
                "starts": statistics.median(t["starts"] for t in per_task.values()),
                "wall": wall,
            }
    finally:
        emulator.stop()

    submits = sum(1 for r in emulator.requests if r.method == "POST")
    print(f"emulator saw {submits} model calls (sync + queue submits) for {2 * (args.requests + 1)} fal tasks")
    print(f"medians over the {args.requests} tasks of each run after a warm-up task:")
    print(f"{'mode':>11} {'worker s/req':>13} {'trigger s/req':>14} {'worker starts':>14} {'dags test wall':>15}")
    for mode, r in results.items():
        print(f"{mode:>11} {r['worker']:>13.3f} {r['trigger']:>14.3f} {r['starts']:>14.1f} {r['wall']:>14.1f}s")
    per_start = results["noop"]["worker"]  # Airflow's own cost of one task start in `dags test`
    sync, deferred = results["sync"]["worker"], results["deferrable"]["worker"]
    print(f"reference: a task that does nothing holds the worker {per_start:.3f} s in `dags test`")
    print(f"deferrable/sync worker time: {deferred / sync:.3f}")
    scaled_sync = sync - args.generation + args.scale_to
    print(
        f"scaled to a {args.scale_to:g} s generation: sync {scaled_sync:.2f} s, deferrable {deferred:.2f} s "
        f"(ratio {deferred / scaled_sync:.3f}); target: deferrable < 2 s per request: "
        + ("within" if deferred < 2 else "over")
    )


if __name__ == "__main__":
    main()
