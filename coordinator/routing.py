"""Routing policies: pure functions from a swarm-map snapshot to a pipeline of hops.

No I/O here, so every policy is unit-tested on hand-made snapshots.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState

# Cost assumed for a server whose throughput or RTT has not been measured yet.
DEFAULT_BLOCK_THROUGHPUT = 100.0  # tokens/s through one block
DEFAULT_RTT = 0.02  # seconds


@dataclass(frozen=True)
class SwarmMap:
    """Who serves which blocks of one model, as seen at `taken_at`."""

    model: str
    num_blocks: int
    servers: tuple[ServerRecord, ...]
    taken_at: float = 0.0

    def online(self) -> list[ServerRecord]:
        return [s for s in self.servers if s.state == ServerState.ONLINE]

    def servers_for(self, block: int) -> list[ServerRecord]:
        return [s for s in self.online() if s.start <= block < s.end]

    def missing_blocks(
        self, start: int = 0, end: int | None = None, banned: frozenset[str] = frozenset()
    ) -> list[int]:
        end = self.num_blocks if end is None else end
        covered: set[int] = set()
        for s in self.online():
            if s.peer_id not in banned:
                covered.update(range(max(s.start, start), min(s.end, end)))
        return [b for b in range(start, end) if b not in covered]


@dataclass(frozen=True)
class Hop:
    """Run blocks [start, end) on `server`."""

    server: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def min_latency_route(
    swarm_map: SwarmMap,
    start: int = 0,
    end: int | None = None,
    *,
    banned: frozenset[str] = frozenset(),
    rtt: Mapping[str, float] | None = None,
) -> list[Hop]:
    """Fastest pipeline for blocks [start, end): shortest path over block boundaries.

    Edge (i -> j on server s) costs s's round-trip time plus (j - i) blocks of its per-token
    compute time, so a route with fewer hops wins unless a detour is truly faster. Ties go to
    fewer hops, then to the lexically smaller peer id, so the choice is deterministic.
    """
    end = swarm_map.num_blocks if end is None else end
    missing = swarm_map.missing_blocks(start, end, banned)
    if missing:
        raise MissingBlocksError(swarm_map.model, missing)
    rtt = rtt or {}
    servers = [s for s in swarm_map.online() if s.peer_id not in banned]

    # Dijkstra: state = block boundary; entries (cost, hops, tiebreak, boundary)
    best: dict[int, tuple[float, int, str]] = {start: (0.0, 0, "")}
    came_from: dict[int, Hop] = {}
    queue: list[tuple[float, int, str, int]] = [(0.0, 0, "", start)]
    while queue:
        cost, hops, tie, i = heapq.heappop(queue)
        if i == end:
            break
        if best.get(i, (float("inf"), 0, "")) < (cost, hops, tie):
            continue
        for s in servers:
            if not s.start <= i < s.end:
                continue
            per_block = 1.0 / (s.compute_throughput or DEFAULT_BLOCK_THROUGHPUT)
            for j in range(i + 1, min(s.end, end) + 1):
                candidate = (
                    cost + rtt.get(s.peer_id, DEFAULT_RTT) + (j - i) * per_block,
                    hops + 1,
                    s.peer_id,
                )
                if candidate < best.get(j, (float("inf"), 0, "")):
                    best[j] = candidate
                    came_from[j] = Hop(s, i, j)
                    heapq.heappush(queue, (*candidate, j))

    route: list[Hop] = []
    position = end
    while position != start:
        hop = came_from[position]
        route.append(hop)
        position = hop.start
    return route[::-1]
