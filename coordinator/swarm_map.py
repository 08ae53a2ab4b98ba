"""The swarm map: snapshots of who serves which blocks, read from the DHT and refreshed in the background."""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.dht import DHT

from swarm.coordinator.routing import SwarmMap
from swarm.errors import ConfigError, DHTError
from swarm.records import DHT_TIMEOUT, fetch_records, latest_per_peer

logger = logging.getLogger(__name__)


async def fetch_swarm_map(dht: DHT, model: str, num_blocks: int) -> SwarmMap:
    """Read every block's records; a server appears once, as its newest announcement says."""
    per_block = await fetch_records(dht, model, list(range(num_blocks)))
    servers = latest_per_peer(r for records in per_block.values() for r in records)
    return SwarmMap(model=model, num_blocks=num_blocks, servers=tuple(servers), taken_at=time.time())


class SwarmMapCache:
    """Hands out immutable `SwarmMap` snapshots of one model, refreshed from the DHT in the background.

    Policy:
    - The first `get()` (or `start()`) starts a task on the running loop that re-reads the DHT every
      `ttl / 2` seconds, so `get()` normally answers at once with a snapshot at most about `ttl` old.
    - A failed or slow background read (each bounded by `fetch_timeout`) is logged and the previous
      snapshot kept; the task tries again after `ttl / 2`. Callers never see its errors.
    - `get()` reads the DHT inline only when there is no snapshot yet, or the newest is older than
      `max_age` (default 3 x ttl: the refresher is stuck), and then raises `DHTError` as a read would.
    - `get(refresh=True)` (after a peer failure) returns a snapshot read after the call. Concurrent
      forced refreshes share one lookup: one waiting to start is joined; one already under way may
      predate the caller's news, so they queue ONE lookup behind it and all share that.
    - `close()` cancels the task (and any lookup under way). Afterwards `get()` still works, reading
      inline once the snapshot is older than `max_age`, and starts no task; `start()` starts one again.

    Everything runs on the event loop that first used the cache (the client's loop): hivemind's DHT
    must be called from one thread. Using it from another live loop is a RuntimeError.
    """

    def __init__(
        self,
        dht: DHT,
        model: str,
        num_blocks: int,
        ttl: float = 5.0,
        *,
        max_age: float | None = None,
        fetch_timeout: float = DHT_TIMEOUT,
    ) -> None:
        max_age = 3 * ttl if max_age is None else max_age
        for name, value in (("ttl", ttl), ("max_age", max_age), ("fetch_timeout", fetch_timeout)):
            if not value > 0:
                raise ConfigError(f"swarm map {name} must be > 0 seconds, got {value}")
        self.dht, self.model, self.num_blocks, self.ttl = dht, model, num_blocks, ttl
        self.max_age, self.fetch_timeout = max_age, fetch_timeout
        self._snapshot: SwarmMap | None = None
        self._fetched_at = float("-inf")  # time.monotonic() of the newest snapshot: immune to clock steps
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[SwarmMap] | None = None  # the lookup under way, if any
        self._queued: asyncio.Task[SwarmMap] | None = None  # the next lookup, not sent yet
        self._closed = False

    async def get(self, *, refresh: bool = False) -> SwarmMap:
        """The current snapshot; with `refresh`, one read from the DHT after this call."""
        loop = self._bind()
        if not self._closed:
            self._start_refresher(loop)
        snapshot = self._snapshot
        if snapshot is not None and not refresh and self._age() <= self.max_age:
            return snapshot
        # A stale caller is served by any lookup under way (it is newer than what we have); a forced
        # refresh needs one sent after its request.
        return await self._await(self._shared_fetch(loop, after_now=refresh))

    async def start(self) -> None:
        """Start the background refresher now (the first `get()` does it otherwise); idempotent."""
        self._closed = False
        self._start_refresher(self._bind())

    async def close(self) -> None:
        """Stop the refresher and any lookup under way; safe to call twice, or without a start."""
        self._closed = True
        if self._loop is None or self._loop.is_closed():  # never used, or its tasks died with the loop
            return
        self._bind()
        tasks = [t for t in (self._refresher, self._queued, self._inflight) if t is not None]
        self._refresher = self._queued = self._inflight = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self) -> SwarmMap:
        """One DHT read (the seam tests override to count, stall or fail lookups)."""
        return await fetch_swarm_map(self.dht, self.model, self.num_blocks)

    # ------------------------------------------------------------------------------------ internals ---

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    f"SwarmMapCache({self.model!r}) belongs to another running event loop; "
                    "call it from that loop (the client's: swarm.client.loop.run_sync)"
                )
            # First use, or the old loop is closed and its tasks are gone with it: start over here.
            self._loop, self._refresher, self._queued, self._inflight = loop, None, None, None
        return loop

    def _age(self) -> float:
        return time.monotonic() - self._fetched_at

    def _start_refresher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = loop.create_task(self._refresh_forever(), name=f"swarm-map:{self.model}")

    def _shared_fetch(self, loop: asyncio.AbstractEventLoop, *, after_now: bool) -> asyncio.Task[SwarmMap]:
        if self._queued is not None:  # not sent yet, so it reads the DHT after every caller so far
            return self._queued
        if self._inflight is not None and not after_now:
            return self._inflight
        self._queued = loop.create_task(self._run_fetch(ahead=self._inflight))
        return self._queued

    async def _run_fetch(self, ahead: asyncio.Task[SwarmMap] | None) -> SwarmMap:
        if ahead is not None:
            await asyncio.wait([ahead])  # one lookup at a time; its outcome is its own callers' business
        me = asyncio.current_task()
        self._queued, self._inflight = None, me
        try:
            async with asyncio.timeout(self.fetch_timeout):
                snapshot = await self._fetch()
        except TimeoutError:
            raise DHTError(f"reading the swarm map of {self.model!r} took > {self.fetch_timeout} s") from None
        finally:
            if self._inflight is me:
                self._inflight = None
        # Lookups run one at a time, so this is never older than the snapshot it replaces.
        self._snapshot, self._fetched_at = snapshot, time.monotonic()
        return snapshot

    async def _await(self, task: asyncio.Task[SwarmMap]) -> SwarmMap:
        try:
            # Shielded: a caller that gives up must not cancel a lookup other callers share.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # close() cancelled the shared lookup, not this caller: a CancelledError would look
                # like the caller's own cancellation to everything above it.
                raise DHTError(f"the swarm map of {self.model!r} was closed during the lookup") from None
            raise

    async def _refresh_forever(self) -> None:
        interval, failures = self.ttl / 2, 0
        while True:
            # Due counts from the newest snapshot, so a forced refresh in between postpones this one.
            wait = self._fetched_at + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await self._await(self._shared_fetch(asyncio.get_running_loop(), after_now=False))
            except Exception as e:  # a DHT hiccup must not end the refresher; callers keep the old map
                failures += 1
                # Warn once per outage; a DHT that stays down would otherwise flood the log.
                log = logger.warning if failures == 1 else logger.debug
                log("refreshing the swarm map of %r failed (%d in a row): %s", self.model, failures, e)
                await asyncio.sleep(interval)  # do not hammer a failing DHT
            else:
                if failures:
                    logger.info("swarm map refresh of %r works again after %d failures", self.model, failures)
                failures = 0
