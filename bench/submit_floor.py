"""What a queue submit costs the worker, from the bare HTTP libraries up to the deferrable batch.

    python bench/submit_floor.py                      # 4,000 submits, 16 threads (about 1 minute)
    python bench/submit_floor.py --submits 10000 --threads 32

A deferrable ``FalBatchRunOperator`` holds its worker while it submits every input (each
recorded before the next); on one machine with the emulator that time is CPU-bound. Each row
sends the same ``POST /queue/emulator/echo`` (same JSON bodies, same key) to a fresh emulator
(its own process; its queue grows with every submit) from ``--threads`` threads and prints the
worker's CPU and wall time per submit, as a ratio to the first row of the same run:

* ``http.client``: the standard library alone, one keep-alive connection per thread, the
  answer read and decoded as JSON: the floor of any Python HTTP/1.1 client on threads;
* ``urllib3``: one ``HTTPConnectionPool`` shared by the threads (what ``requests`` and our
  client send through), the answer read and decoded;
* ``FalClient.enqueue``: our client (bounded read, error classification, retry policy,
  queue URLs checked);
* ``batch submit``: ``FalBatchRunOperator(deferrable=True, output_path=...)`` ``execute``
  up to its deferral, the threads its ``max_concurrency``: each input prepared, fingerprinted,
  recorded as ``submitting`` and ``submitted`` in the progress log, the rest of the batch
  engine (per submit: the whole call's time divided by the submits).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import urllib3

from airflow_provider_fal.batch.attempts import SINGLE_ATTEMPT
from airflow_provider_fal.core.client import FalClient, prepare_request
from airflow_provider_fal.emulator.process import emulator_control, spawn_emulator
from airflow_provider_fal.operators.batch import FalBatchRunOperator  # imported before anything is timed

KEY = "bench-key-5d1e0c"
MODEL = "emulator/echo"
PATH = f"/queue/{MODEL}"


def bodies(count: int) -> list[bytes]:
    return [json.dumps({"prompt": f"prompt {n}", "seed": n}).encode() for n in range(count)]


def headers() -> dict[str, str]:
    return {"Authorization": f"Key {KEY}", "Content-Type": "application/json", "Accept": "application/json"}


def on_threads(threads: int, count: int, send: Callable[[Any, int], None], setup: Callable[[], Any]) -> None:
    """``send(state, n)`` for every n < count from ``threads`` threads, ``state`` each thread's ``setup()``."""
    next_index = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        state = setup()
        while True:
            with lock:
                n = next(next_index, None)
            if n is None:
                return
            send(state, n)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def with_http_client(host: str, port: int, payloads: list[bytes], threads: int) -> None:
    def send(connection: http.client.HTTPConnection, n: int) -> None:
        connection.request("POST", PATH, body=payloads[n], headers=headers())
        answer = connection.getresponse()
        json.loads(answer.read())
        assert answer.status == 200, answer.status

    on_threads(threads, len(payloads), send, lambda: http.client.HTTPConnection(host, port, timeout=60))


def with_urllib3(host: str, port: int, payloads: list[bytes], threads: int) -> None:
    pool = urllib3.HTTPConnectionPool(host, port, maxsize=threads, block=True, retries=False)

    def send(_: None, n: int) -> None:
        answer = pool.urlopen("POST", PATH, body=payloads[n], headers=headers(), preload_content=False)
        content = answer.read()
        answer.release_conn()
        json.loads(content)
        assert answer.status == 200, answer.status

    on_threads(threads, len(payloads), send, lambda: None)


def with_client(url: str, payloads: list[bytes], threads: int) -> None:
    client = FalClient(KEY, run_url=url, queue_url=f"{url}/queue", pool_maxsize=threads)
    prepared = [prepare_request(MODEL, json.loads(body)) for body in payloads]

    def send(_: None, n: int) -> None:
        client.enqueue(prepared[n], retry_policy=SINGLE_ATTEMPT)

    on_threads(threads, len(payloads), send, lambda: None)


def with_batch(url: str, payloads: list[bytes], threads: int) -> None:
    os.environ["AIRFLOW_CONN_FAL_DEFAULT"] = json.dumps(
        {"conn_type": "fal", "host": url, "password": KEY, "extra": {"queue_url": f"{url}/queue"}}
    )
    with tempfile.TemporaryDirectory(prefix="fal-bench-submit-") as output:
        operator = FalBatchRunOperator(
            task_id="bench",
            model_id=MODEL,
            inputs=[json.loads(body) for body in payloads],
            deferrable=True,
            output_path=output,
            max_concurrency=threads,
            max_failure_rate=1,
            progress_interval=3600,
        )
        ti = SimpleNamespace(
            task_id="bench", dag_id="bench", run_id="r1", map_index=-1, try_number=1, xcom_push=lambda **_: None
        )
        try:
            operator.execute({"ti": ti})
        except BaseException as deferred:  # TaskDeferred is not an Exception on Airflow 3.3
            if type(deferred).__name__ != "TaskDeferred":
                raise
        else:
            raise AssertionError("the batch did not defer")


def measure(name: str, run: Callable[[str, list[bytes], int], None], args: argparse.Namespace) -> tuple[float, float]:
    """CPU and wall seconds per submit of ``run`` against a fresh emulator."""
    emulator, url = spawn_emulator(KEY)
    try:
        emulator_control(url, KEY, "queue-timing", {"queue_wait": 0, "run_time": 3600})  # nothing ends meanwhile
        payloads = bodies(args.submits)
        cpu, wall = time.process_time(), time.perf_counter()
        run(url, payloads, args.threads)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        posts = sum(1 for record in emulator_control(url, KEY, "requests", timeout=120) if record["method"] == "POST")
    finally:
        emulator.terminate()
        emulator.wait()
    assert posts == args.submits, f"{name}: {posts} submits reached the emulator, {args.submits} expected"
    return cpu / args.submits, wall / args.submits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submits", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    def host_port(url: str) -> tuple[str, int]:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        return host, int(port)

    rows: list[tuple[str, Callable[[str, list[bytes], int], None]]] = [
        ("http.client", lambda url, p, t: with_http_client(*host_port(url), p, t)),
        ("urllib3", lambda url, p, t: with_urllib3(*host_port(url), p, t)),
        ("FalClient.enqueue", with_client),
        ("batch submit", with_batch),
    ]
    print(f"{args.submits} queue submits from {args.threads} threads; per submit, and against http.client")
    print(f"{'':>20} {'CPU us':>8} {'x':>6} {'wall us':>8} {'x':>6}")
    base: tuple[float, float] | None = None
    for name, run in rows:
        cpu, wall = measure(name, run, args)
        base = base or (cpu, wall)
        print(f"{name:>20} {cpu * 1e6:8.0f} {cpu / base[0]:6.2f} {wall * 1e6:8.0f} {wall / base[1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
