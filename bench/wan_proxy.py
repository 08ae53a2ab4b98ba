"""A TCP proxy that makes a loopback link behave like a WAN link: one-way delay and a rate cap.

Used by bench/inference.py when the kernel has no netem qdisc (`tc qdisc ... netem` fails with
"Specified qdisc kind is unknown"). Each direction of each connection is a FIFO: a chunk read
at time t leaves at max(t + delay, when the previous chunk finished) + size / rate, which is
what a netem `delay D rate R` link does to a stream (without loss or jitter).

Runs in its own thread with its own event loop, so it does not compete with the client's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

CHUNK = 64 << 10


class WanProxy:
    """Listen on 127.0.0.1:`port` (0: any free port) and forward to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int, delay_s: float, rate_bytes_per_s: float) -> None:
        if delay_s < 0 or rate_bytes_per_s <= 0:
            raise ValueError(f"delay must be >= 0 and rate > 0, got {delay_s} s and {rate_bytes_per_s} B/s")
        self.target = (target_host, target_port)
        self.delay, self.rate = delay_s, rate_bytes_per_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-proxy", daemon=True)

    def start(self, port: int = 0) -> int:
        self._listen_port = port
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the WAN proxy did not start within 10 s")
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self._listen_port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                self._pipe(client_reader, server_writer),
                self._pipe(server_reader, client_writer),
                return_exceptions=True,
            )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: chunks leave in order, each delayed and paced by the rate."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            free_at = 0.0  # when the link finishes sending the previous chunk
            while True:
                arrived, data = await queue.get()
                if not data:
                    break
                free_at = max(arrived + self.delay, free_at) + len(data) / self.rate
                wait = free_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(CHUNK):
                queue.put_nowait((time.monotonic(), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((time.monotonic(), b""))
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await sender
            with contextlib.suppress(Exception):
                writer.close()


@contextlib.contextmanager
def wan_proxy(target_port: int, delay_s: float, rate_bytes_per_s: float, port: int = 0) -> Iterator[WanProxy]:
    proxy = WanProxy("127.0.0.1", target_port, delay_s, rate_bytes_per_s)
    proxy.start(port)
    try:
        yield proxy
    finally:
        proxy.stop()
