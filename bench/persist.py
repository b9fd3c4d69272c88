"""Persisting a large fal output file: throughput and peak memory, against baselines in the same run.

The fal emulator runs in a *separate* process and serves one streamed file (the
``emulator/file`` model, 200 MB by default). Each measurement runs in a fresh child process,
so its memory numbers start clean:

* ``requests``: a plain ``requests`` streaming download (``iter_content`` of 1 MiB chunks)
  written to a file, the floor any requests-based downloader stands on.
* ``fsync``   : the same plain download, plus the ``fsync`` persist does before its rename
  (durability costs disk time on its own; this separates it from the rest).
* ``persist`` : ``MediaPersister.persist`` of the model result into a local directory: the
  same download plus the checks (length and content type promised by the result), fsync,
  and the rename into place.
* ``naive``   : ``requests.get(url).content`` written to a file, once, only to show that the
  memory measurement sees a download that holds the whole file in memory.

Peak RSS growth is ``VmHWM - VmRSS`` of the child, with the high-water mark reset (Linux
``/proc/self/clear_refs``) right before the download, so import-time peaks do not count.
The tools take turns over ``--rounds`` rounds; throughput is the median per tool and the ratio
the median of per-round ratios. Nothing here asserts a time. Target: RSS growth < 50 MB.

    python bench/persist.py [--size-mb 200] [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from airflow_provider_fal.emulator.process import spawn_emulator

KEY = "bench-persist-key"
CHUNK = 1024 * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(tool: str, result_json: str, directory: str) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    from airflow_provider_fal.media.download import MediaPersister  # imported before measuring, like requests

    result = json.loads(result_json)
    url = result["video"]["url"]
    session = requests.Session()
    persister = MediaPersister(directory)
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    if tool in ("requests", "fsync"):
        with session.get(url, stream=True, timeout=60) as response, open(Path(directory) / "plain.mp4", "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
            if tool == "fsync":
                out.flush()
                os.fsync(out.fileno())
    elif tool == "persist":
        persister.persist(result, "bench")
    elif tool == "naive":
        content = session.get(url, timeout=60).content
        (Path(directory) / "naive.mp4").write_bytes(content)
        del content
    else:
        raise SystemExit(f"unknown tool {tool}")
    elapsed = time.perf_counter() - started
    written = sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
    print(
        json.dumps(
            {
                "tool": tool,
                "seconds": elapsed,
                "bytes": written,
                "rss_before_kb": before,
                "peak_kb": _status_kb("VmHWM"),
                "peak_reset": reset,
            }
        )
    )


def measure(tool: str, result: dict, size: int) -> dict:
    directory = tempfile.mkdtemp(prefix=f"fal-bench-{tool}-")
    try:
        completed = subprocess.run(
            [sys.executable, __file__, "--child", tool, json.dumps(result), directory],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"{tool} child failed:\n{completed.stderr[-3000:]}")
        data = json.loads(completed.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if data["bytes"] != size:
        raise RuntimeError(f"{tool} wrote {data['bytes']} bytes, expected {size}")
    data["mb_per_s"] = size / 1e6 / data["seconds"]
    data["growth_mb"] = (data["peak_kb"] - data["rss_before_kb"]) / 1024
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024

    emulator, url = spawn_emulator(KEY)
    try:
        response = requests.post(
            f"{url}/emulator/file",
            json={"size_bytes": size, "content_type": "video/mp4", "key": "video"},
            headers={"Authorization": f"Key {KEY}"},
            timeout=60,
        )
        response.raise_for_status()
        result = response.json()
        print(f"file: {size / 1e6:.1f} MB from the emulator in a separate process ({url}); {args.rounds} rounds")
        tools = ["requests", "fsync", "persist"]
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        ratios: dict[str, list[float]] = {"requests": [], "fsync": []}
        for round_number in range(args.rounds):
            order = tools[round_number % 3 :] + tools[: round_number % 3]  # rotate who goes first
            current = {tool: measure(tool, result, size) for tool in order}
            for tool, data in current.items():
                runs[tool].append(data)
            for baseline in ratios:
                ratios[baseline].append(current["persist"]["mb_per_s"] / current[baseline]["mb_per_s"])
        naive = measure("naive", result, size)
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)

    print(f"{'tool':<10} {'MB/s (median)':>14} {'peak RSS growth MB (max)':>26}")
    for tool, data in [*runs.items(), ("naive", [naive])]:
        speed = statistics.median(d["mb_per_s"] for d in data)
        growth = max(d["growth_mb"] for d in data)
        print(f"{tool:<10} {speed:>14.1f} {growth:>26.1f}")
    for baseline, values in ratios.items():
        print(f"persist/{baseline} throughput ratio: {statistics.median(values):.2f} (median of {len(values)} rounds)")
    worst = max(d["growth_mb"] for d in runs["persist"])
    print(f"persist peak RSS growth: {worst:.1f} MB (target < 50 MB: {'met' if worst < 50 else 'NOT met'})")
    if not all(d["peak_reset"] for data in [*runs.values(), [naive]] for d in data):
        print("note: could not reset the RSS high-water mark; growth may be understated")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
