"""Benchmark of batch generation: FalBatchRunner against the ideal, a serial fal_client loop
and mapped Airflow task instances; and peak memory for a large batch.

    python bench/batch.py                      # everything (about 6 minutes on 2 cores)
    python bench/batch.py --mapped 100         # 100 mapped instances, scaled to --inputs
    python bench/batch.py --skip-scheduler     # without the real-scheduler comparison
    python bench/batch.py --inputs 1000 --latency 0.1 --concurrency 32 --memory-inputs 10000

The fal emulator runs in its own process (``python -m airflow_provider_fal.emulator``) with
the given model latency, so its CPU does not count against the client.

* **batch**: ``FalBatchRunner`` (what ``FalBatchRunOperator`` runs) over ``--inputs`` inputs at
  ``--concurrency``, against the ideal ``inputs x latency / concurrency``.
* **serial fal_client**: ``fal_client.SyncClient.run`` in a loop, ``--serial`` calls timed
  and scaled to ``--inputs``. fal_client only builds ``https://`` URLs, so its module constant
  ``RUN_URL_FORMAT`` is pointed at the emulator's plain-HTTP port for this process.
* **mapped tasks**: a real Airflow 3 deployment (``api-server``, ``scheduler`` with the
  LocalExecutor, ``dag-processor``) in a temp ``AIRFLOW_HOME`` on SQLite runs two DAGs:
  ``FalRunOperator.partial(...).expand(arguments=[...])`` over ``--mapped`` inputs (scaled to
  ``--inputs``) and one ``FalBatchRunOperator`` over ``--inputs`` inputs. Both at the same
  concurrency (``max_active_tasks`` / ``max_concurrency``). Durations are the DAG runs' own
  start and end dates in the metadata DB.
* **memory**: in a child process, ``--memory-inputs`` inputs of ``fal-ai/fast-sdxl`` (zero latency):
  peak RSS growth over the process before the run, and tracemalloc's peak in a second child;
  and the same for a hundredth of the inputs, to tell the fixed cost (threads, session, lazy
  imports) from the cost per input.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from airflow_provider_fal.emulator.process import spawn_emulator

KEY = "bench-key-5d1e0c"
MODEL = "emulator/echo"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)


# --------------------------------------------------------------------------- the engine and fal_client


def run_batch(url: str, inputs: int, concurrency: int) -> dict:
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.batch.runner import FalBatchRunner
    from airflow_provider_fal.core.client import FalClient, prepare_request

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=concurrency)
    runner = FalBatchRunner(client, max_concurrency=concurrency, progress_interval=3600)
    payload = [{"prompt": f"prompt {n}", "seed": n} for n in range(inputs)]
    started = time.perf_counter()
    result = runner.run(prepare_inputs(prepare_request(MODEL), payload))  # encoding included, as before
    elapsed = time.perf_counter() - started
    assert result.succeeded == inputs, result.summary()
    return {"seconds": elapsed, "peak_in_flight": result.peak_in_flight}


def run_fal_client_serial(url: str, calls: int) -> float | None:
    try:
        import fal_client
        import fal_client.client as fal_client_module
    except ImportError:
        return None
    fal_client_module.RUN_URL_FORMAT = f"{url}/"  # plain HTTP to the emulator; see the docstring
    client = fal_client.SyncClient(key=KEY)
    client.run(MODEL, {"prompt": "warm-up"})
    started = time.perf_counter()
    for n in range(calls):
        client.run(MODEL, {"prompt": f"prompt {n}", "seed": n})
    return time.perf_counter() - started


# --------------------------------------------------------------------------- memory (child processes)


def memory_child(url: str, inputs: int, concurrency: int, traced: bool) -> None:
    """Prints one JSON line: RSS before, peak RSS, and (traced) tracemalloc's peak."""
    quiet_logging()
    from airflow_provider_fal.batch.inputs import prepare_inputs
    from airflow_provider_fal.batch.runner import FalBatchRunner
    from airflow_provider_fal.core.client import FalClient, prepare_request

    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=concurrency)
    runner = FalBatchRunner(client, max_concurrency=concurrency, progress_interval=3600)
    request = prepare_request("fal-ai/fast-sdxl")
    raw = [
        {"prompt": f"a watercolour of lighthouse number {n}", "image_size": "square", "seed": n} for n in range(inputs)
    ]
    payload = prepare_inputs(request, raw)
    page = os.sysconf("SC_PAGE_SIZE")
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    if traced:
        import tracemalloc

        tracemalloc.start()
    started = time.perf_counter()
    result = runner.run(payload)
    elapsed = time.perf_counter() - started
    traced_peak = None
    if traced:
        import tracemalloc

        traced_peak = tracemalloc.get_traced_memory()[1]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results_json = len(json.dumps(result.results))
    print(
        json.dumps(
            {
                "rss_before": rss_before,
                "peak_rss": peak_rss,
                "traced_peak": traced_peak,
                "seconds": elapsed,
                "succeeded": result.succeeded,
                "results_json_bytes": results_json,
            }
        )
    )


def measure_memory(url: str, inputs: int, concurrency: int) -> tuple[dict, dict]:
    def child(traced: bool) -> dict:
        command = [sys.executable, __file__, "--memory-child", url, "--memory-inputs", str(inputs)]
        command += ["--concurrency", str(concurrency)] + (["--traced"] if traced else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(output.strip().splitlines()[-1])

    return child(False), child(True)


# --------------------------------------------------------------------------- a real Airflow deployment

MAPPED_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.fal import FalRunOperator

with DAG("bench_mapped", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         max_active_tasks={concurrency}, is_paused_upon_creation=False) as dag:
    FalRunOperator.partial(task_id="generate", model_id="{model}").expand(
        arguments=[{{"prompt": f"prompt {{n}}", "seed": n}} for n in range({mapped})]
    )
"""

BATCH_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_fal.operators.batch import FalBatchRunOperator

with DAG("bench_batch", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         is_paused_upon_creation=False) as dag:
    FalBatchRunOperator(task_id="generate", model_id="{model}", max_concurrency={concurrency},
                        inputs=[{{"prompt": f"prompt {{n}}", "seed": n}} for n in range({inputs})])
"""


class Deployment:
    """api-server + scheduler (LocalExecutor) + dag-processor in a temp AIRFLOW_HOME."""

    def __init__(self, emulator_url: str, concurrency: int) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fal-bench-airflow-"))
        (self.home / "dags").mkdir()
        port = free_port()
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(concurrency),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(concurrency),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": "bench-jwt-secret-not-for-production",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW_CONN_FAL_DEFAULT": json.dumps(
                {
                    "conn_type": "fal",
                    "host": emulator_url,
                    "password": KEY,
                    "extra": {"queue_url": f"{emulator_url}/queue"},
                }
            ),
        }
        self.processes: list[subprocess.Popen] = []

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True, cwd=self.home
        )

    def start(self) -> None:
        migrated = self.cli("db", "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(migrated.stderr[-2000:])
        for component in ("api-server", "scheduler", "dag-processor"):
            log = (self.home / f"{component}.log").open("w")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "airflow", component],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                )
            )

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def query(self, sql: str, *args: object) -> list[tuple]:
        try:
            with sqlite3.connect(self.home / "airflow.db", timeout=30) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def run(self, dag_id: str, source: str, timeout: float) -> dict:
        (self.home / "dags" / f"{dag_id}.py").write_text(textwrap.dedent(source))
        deadline = time.monotonic() + timeout
        while not self.query("select 1 from dag where dag_id = ? and is_paused = 0", dag_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dag_id} was not parsed; see {self.home}/dag-processor.log")
            time.sleep(1)
        triggered = self.cli("dags", "trigger", dag_id)
        if triggered.returncode != 0:
            raise RuntimeError(triggered.stderr[-2000:])
        while True:
            rows = self.query(
                "select state, start_date, end_date from dag_run where dag_id = ? order by id desc limit 1", dag_id
            )
            if rows and rows[0][0] in ("success", "failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dag_id} did not finish within {timeout} s; see {self.home}")
            time.sleep(1)
        state, start, end = rows[0]
        tasks = self.query("select state, count(*) from task_instance where dag_id = ? group by state", dag_id)
        last_success = self.query(
            "select max(end_date) from task_instance where dag_id = ? and state = 'success'", dag_id
        )[0][0]
        return {
            "state": state,
            "seconds": (_parse(end) - _parse(start)).total_seconds(),
            # A task that loses its heartbeat under load holds the run open until the heartbeat
            # timeout (5 minutes by default): also report when the successful tasks were done.
            "successes_done": (_parse(last_success) - _parse(start)).total_seconds() if last_success else None,
            "tasks": dict(tasks),
        }


def _parse(value: str):
    from datetime import datetime

    return datetime.fromisoformat(value.replace(" ", "T"))


def bench_scheduler(url: str, mapped: int, inputs: int, concurrency: int) -> tuple[dict, dict]:
    deployment = Deployment(url, concurrency)
    deployment.start()
    try:
        model = MODEL
        mapped_run = deployment.run(
            "bench_mapped", MAPPED_DAG.format(model=model, mapped=mapped, concurrency=concurrency), timeout=1800
        )
        batch_run = deployment.run(
            "bench_batch", BATCH_DAG.format(model=model, inputs=inputs, concurrency=concurrency), timeout=600
        )
    finally:
        deployment.stop()
    return mapped_run, batch_run


# --------------------------------------------------------------------------- report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serial", type=int, default=100, help="fal_client calls timed (scaled to --inputs)")
    parser.add_argument("--mapped", type=int, default=1000, help="mapped task instances run (scaled to --inputs)")
    parser.add_argument("--memory-inputs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of the batch engine (median reported)")
    parser.add_argument("--skip-scheduler", action="store_true")
    parser.add_argument("--memory-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.memory_inputs, args.concurrency, args.traced)
        return 0

    quiet_logging()
    emulator, url = spawn_emulator(KEY, "--latency", str(args.latency))
    fast_emulator, fast_url = spawn_emulator(KEY)
    try:
        ideal = args.inputs * args.latency / args.concurrency
        print(f"{args.inputs} inputs, model latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}")
        print(f"  ideal (inputs x latency / concurrency)       {ideal:8.2f} s")

        runs = sorted(run_batch(url, args.inputs, args.concurrency)["seconds"] for _ in range(args.rounds))
        batch = runs[len(runs) // 2]
        each = ", ".join(f"{r:.2f}" for r in runs)
        print(f"  FalBatchRunner (median of {args.rounds})             {batch:8.2f} s   ({each})")
        print(f"    batch / ideal: {batch / ideal:.3f}   (target <= 1.2)")

        serial = run_fal_client_serial(url, args.serial)
        if serial is None:
            print("  serial fal_client: skipped (pip install fal-client)")
        else:
            scaled = serial * args.inputs / args.serial
            label = f"serial fal_client loop, {args.serial} calls x {args.inputs / args.serial:g}"
            print(f"  {label:<44} {scaled:8.2f} s   (measured {serial:.2f} s)")
            print(f"    serial fal_client / batch: {scaled / batch:.1f}x")

        if not args.skip_scheduler:
            mapped_run, batch_run = bench_scheduler(url, args.mapped, args.inputs, args.concurrency)
            scale = args.inputs / args.mapped
            mapped_done = mapped_run["successes_done"] or mapped_run["seconds"]
            mapped_scaled = mapped_done * scale
            print("  real Airflow deployment (api-server, scheduler + LocalExecutor, dag-processor; SQLite):")
            print(
                f"    {args.mapped} mapped FalRunOperator instances: {mapped_done:.1f} s until the last successful "
                f"instance ended (DAG run: {mapped_run['seconds']:.1f} s, {mapped_run['state']}, {mapped_run['tasks']})"
                f"; x{scale:g} = {mapped_scaled:.1f} s"
            )
            print(
                f"    1 FalBatchRunOperator, {args.inputs} inputs:    {batch_run['seconds']:.1f} s, "
                f"{batch_run['state']} {batch_run['tasks']}"
            )
            print(f"    mapped (scaled) / batch DAG run: {mapped_scaled / batch_run['seconds']:.1f}x   (target >= 20)")
            print(f"    mapped (scaled) / batch engine:  {mapped_scaled / batch:.1f}x")

        mib = 1024 * 1024
        small = max(1, args.memory_inputs // 100)
        print(f"memory, fal-ai/fast-sdxl (zero latency), concurrency {args.concurrency}:")
        for count in (small, args.memory_inputs):
            plain, traced = measure_memory(fast_url, count, args.concurrency)
            print(
                f"  {count:>6} inputs: peak RSS growth {(plain['peak_rss'] - plain['rss_before']) / mib:5.1f} MiB "
                f"(before the run {plain['rss_before'] / mib:.1f} MiB, peak {plain['peak_rss'] / mib:.1f} MiB), "
                f"tracemalloc peak {traced['traced_peak'] / mib:5.1f} MiB, results as JSON (the XCom value) "
                f"{plain['results_json_bytes'] / mib:.1f} MiB, {plain['seconds']:.1f} s"
            )
    finally:
        for process in (emulator, fast_emulator):
            process.terminate()
            process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
