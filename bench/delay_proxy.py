"""A network round trip between a benchmark's client and the emulator, as fal is reached over the internet.

On 127.0.0.1 an answer comes back in well under a millisecond, so a 429 reaches the client
before it has sent its next request; from a cloud worker to fal it takes tens of milliseconds,
and every request sent meanwhile goes out blind. :func:`delayed` starts a TCP proxy in its own
process (so it does not share the client's interpreter lock) that holds every chunk of bytes
``one_way`` seconds in each direction, in order, and yields the proxy's URL:

    with delayed(url, 0.025) as far_url:      # a 50 ms round trip
        ...

Run as a script it is the proxy: ``python bench/delay_proxy.py <upstream port> <one-way seconds>``
prints ``ready <port>`` once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit


@contextlib.contextmanager
def delayed(url: str, one_way: float) -> Iterator[str]:
    """``url`` (``http://127.0.0.1:<port>``) behind a proxy adding ``one_way`` seconds each way; 0: ``url`` itself."""
    if one_way <= 0:
        yield url
        return
    upstream = urlsplit(url)
    proxy = subprocess.Popen(
        [sys.executable, __file__, str(upstream.port), str(one_way)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proxy.stdout.readline() if proxy.stdout else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"the delay proxy did not start (it printed {line!r})")
        yield f"{upstream.scheme}://127.0.0.1:{int(line.split()[1])}"
    finally:
        proxy.terminate()
        proxy.wait()


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, one_way: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``one_way`` seconds after it arrived; end with its end."""
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while True:
            chunk = await reader.read(65536)
            held.put_nowait((time.monotonic() + one_way, chunk))
            if not chunk:
                return

    async def send() -> None:
        while True:
            due, chunk = await held.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    try:
        await asyncio.gather(receive(), send())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(upstream_port: int, one_way: float) -> None:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _forward(client_reader, upstream_writer, one_way), _forward(upstream_reader, client_writer, one_way)
        )

    server = await asyncio.start_server(connect, "127.0.0.1", 0, backlog=1024)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), float(sys.argv[2])))
