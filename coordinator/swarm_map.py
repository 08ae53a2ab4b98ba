"""The swarm map: a cached snapshot of who serves which blocks, read from the DHT."""

from __future__ import annotations

import asyncio
import time

from hivemind.dht import DHT

from swarm.coordinator.routing import SwarmMap
from swarm.records import fetch_records, latest_per_peer


async def fetch_swarm_map(dht: DHT, model: str, num_blocks: int) -> SwarmMap:
    """Read every block's records; a server appears once, as its newest announcement says."""
    per_block = await fetch_records(dht, model, list(range(num_blocks)))
    servers = latest_per_peer(r for records in per_block.values() for r in records)
    return SwarmMap(model=model, num_blocks=num_blocks, servers=tuple(servers), taken_at=time.time())


class SwarmMapCache:
    """Hands out immutable snapshots, refreshing from the DHT when older than `ttl` seconds."""

    def __init__(self, dht: DHT, model: str, num_blocks: int, ttl: float = 5.0) -> None:
        self.dht, self.model, self.num_blocks, self.ttl = dht, model, num_blocks, ttl
        self._snapshot: SwarmMap | None = None
        self._lock = asyncio.Lock()

    async def get(self, *, refresh: bool = False) -> SwarmMap:
        async with self._lock:
            snapshot = self._snapshot
            if refresh or snapshot is None or time.time() - snapshot.taken_at > self.ttl:
                snapshot = self._snapshot = await fetch_swarm_map(self.dht, self.model, self.num_blocks)
            return snapshot
