"""Peak memory of uploading a large input file to fal's CDN (the emulator's), against a plain
``requests`` streaming upload of the same file in the same run.

Each upload runs in a fresh child process that reports its peak RSS growth (``VmHWM`` after the
upload, its peak reset through ``/proc/self/clear_refs`` once everything is imported and set up,
minus ``VmRSS`` at that moment) and the wall time. The
emulator (and a sink that discards what it is sent, for the plain ``requests`` row) run in this
process, so their memory is not counted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KEY = "bench-key-5e1f"
MiB = 1024 * 1024


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: ``5`` to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, url: str, path: str, sink: str) -> None:
    import requests

    from airflow_provider_fal.media.upload import CdnUploader

    size = os.path.getsize(path)
    uploader = CdnUploader(KEY, rest_url=url, cdn_url=url)
    session = requests.Session()
    if mode.startswith("uploader"):
        uploader.token()  # connection set up before the baseline, like the requests row
    reset_peak()
    base = status_mb("VmRSS")
    started = time.monotonic()
    if mode.startswith("uploader"):
        opener = lambda: open(path, "rb")  # noqa: E731, SIM115 - the uploader closes what it opens
        result = uploader.upload(opener, size=size, name="clip.mp4", content_type="video/mp4", shown=path)
    elif mode == "requests":
        with open(path, "rb") as handle:
            answer = session.post(sink, data=handle)
        answer.raise_for_status()
        result = answer.text
    else:  # fal_client: its own upload_file (multipart in threads above 100 MiB)
        import fal_client
        import fal_client.client as module

        module.REST_URL = module.CDN_URL = url
        result = fal_client.SyncClient(key=KEY).upload_file(Path(path))
    print(
        json.dumps(
            {"seconds": time.monotonic() - started, "base": base, "growth": status_mb("VmHWM") - base, "url": result}
        )
    )


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            left -= len(self.rfile.read(min(left, MiB)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        return


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for offset in range(0, size, 4 * MiB):
            block = os.urandom(min(4 * MiB, size - offset))
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="size of the multipart file, MB (default 500)")
    parser.add_argument("--single-mb", type=int, default=100, help="size of the single-upload file, MB (default 100)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from airflow_provider_fal.emulator import FalEmulator

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}/"
    with tempfile.TemporaryDirectory() as folder, FalEmulator(api_key=KEY) as emu:
        big, single = Path(folder) / "big.mp4", Path(folder) / "single.mp4"
        sums = {big: make_file(big, args.mb * 1000 * 1000), single: make_file(single, args.single_mb * MiB)}
        rows = [("uploader (multipart)", "uploader", big), ("uploader (single)", "uploader", single)]
        rows.append(("requests stream", "requests", big))
        try:
            import fal_client  # noqa: F401

            rows.append(("fal_client.upload_file", "fal_client", big))
        except ImportError:
            pass
        print(f"{'row':<24}{'MB':>7}{'seconds':>9}{'MB/s':>8}{'RSS growth MB':>15}  content")
        for label, mode, path in rows:
            command = [sys.executable, __file__, "--child", mode, emu.url, str(path), sink_url]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            size = path.stat().st_size / 1e6
            check = "-"
            if mode != "requests":
                import requests

                served = hashlib.sha256()
                with requests.get(report["url"], stream=True) as answer:
                    for block in answer.iter_content(MiB):
                        served.update(block)
                check = "same sha256" if served.hexdigest() == sums[path] else "DIFFERENT"
            speed = size / report["seconds"]
            print(f"{label:<24}{size:>7.0f}{report['seconds']:>9.2f}{speed:>8.0f}{report['growth']:>15.1f}  {check}")
    sink.shutdown()


if __name__ == "__main__":
    main()
