"""The sync facade: one background asyncio loop per process runs all client I/O.

Users call plain methods (`generate`, `forward`); those submit coroutines to this loop
and wait, so gRPC streams and DHT lookups live on one loop no matter which user thread
calls in.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _start_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    loop = uvloop.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    threading.Thread(target=run, name="swarm-client-loop", daemon=True).start()
    ready.wait()
    return loop


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = _start_loop()
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the client loop and wait for its result from any thread but that loop's."""
    loop = get_loop()
    try:
        if asyncio.get_running_loop() is loop:
            raise RuntimeError("run_sync called from the client loop itself; await the coroutine instead")
    except RuntimeError as e:
        if "client loop" in str(e):
            coro.close()
            raise
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


async def run_on_client_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on the client loop from another running loop (an HTTP server's, say).

    The DHT and the swarm map must be used from the client loop; this lets an async caller wait
    for them without blocking its own loop. Cancelling the caller cancels `coro`.
    """
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, get_loop()))
