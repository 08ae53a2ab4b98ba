"""Routing policies: pure functions from a swarm-map snapshot to a pipeline of hops.

No I/O here, so every policy is unit-tested on hand-made snapshots.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState

# Cost assumed for a server whose throughput or RTT has not been measured yet.
DEFAULT_BLOCK_THROUGHPUT = 100.0  # tokens/s through one block
DEFAULT_RTT = 0.02  # seconds
# Dijkstra's (cost, hops, peer id) for a boundary not reached yet.
_UNREACHED = (float("inf"), 0, "")


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


def usable_servers(
    swarm_map: SwarmMap, banned: frozenset[str] = frozenset(), cache_tokens: int = 0
) -> list[ServerRecord]:
    """Online, non-banned servers with room for `cache_tokens` of KV cache (if any is asked for)."""
    return [
        s
        for s in swarm_map.online()
        if s.peer_id not in banned and (cache_tokens <= 0 or s.free_cache_tokens >= cache_tokens)
    ]


def _require_coverage(swarm_map: SwarmMap, servers: list[ServerRecord], start: int, end: int) -> None:
    # Checked up front so that a route is never half-built before we find out it cannot finish.
    missing = replace(swarm_map, servers=tuple(servers)).missing_blocks(start, end)
    if missing:
        raise MissingBlocksError(swarm_map.model, missing)


def seconds_per_block(server: ServerRecord) -> float:
    """Compute time one token spends in one of the server's blocks.

    Interactive inference is single-token steps, so inference_rps is the relevant measure; the
    forward throughput (batched tokens) is only a fallback, as it flatters per-step latency.
    """
    if server.inference_rps > 0:
        return 1.0 / server.inference_rps
    return 1.0 / (server.compute_throughput or DEFAULT_BLOCK_THROUGHPUT)


def span_throughput(server: ServerRecord) -> float:
    """Tokens/s through the server's whole span; estimated from per-block numbers if not announced."""
    if server.throughput > 0:
        return server.throughput
    return (server.compute_throughput or DEFAULT_BLOCK_THROUGHPUT) / (server.end - server.start)


def min_latency_route(
    swarm_map: SwarmMap,
    start: int = 0,
    end: int | None = None,
    *,
    banned: frozenset[str] = frozenset(),
    rtt: Mapping[str, float] | None = None,
    cache_tokens: int = 0,
) -> list[Hop]:
    """Fastest pipeline for blocks [start, end): shortest path over block boundaries.

    Edge (i -> j on server s) costs s's round-trip time plus (j - i) blocks of its per-token
    compute time, so a route with fewer hops wins unless a detour is truly faster. Ties go to
    fewer hops, then to the lexically smaller peer id, so the choice is deterministic.
    With `cache_tokens` > 0, servers that cannot reserve that much KV cache are skipped: a session
    routed through them would be refused at its first step.
    """
    end = swarm_map.num_blocks if end is None else end
    servers = usable_servers(swarm_map, banned, cache_tokens)
    _require_coverage(swarm_map, servers, start, end)
    rtt = rtt or {}

    # Dijkstra: state = block boundary; entries (cost, hops, tiebreak, boundary)
    best: dict[int, tuple[float, int, str]] = {start: (0.0, 0, "")}
    came_from: dict[int, Hop] = {}
    queue: list[tuple[float, int, str, int]] = [(0.0, 0, "", start)]
    while queue:
        cost, hops, tie, i = heapq.heappop(queue)
        if i == end:
            break
        if best.get(i, _UNREACHED) < (cost, hops, tie):
            continue
        for s in servers:
            if not s.start <= i < s.end:
                continue
            hop_rtt, per_block = rtt.get(s.peer_id, DEFAULT_RTT), seconds_per_block(s)
            for j in range(i + 1, min(s.end, end) + 1):
                candidate = (cost + hop_rtt + (j - i) * per_block, hops + 1, s.peer_id)
                if candidate < best.get(j, _UNREACHED):
                    best[j] = candidate
                    came_from[j] = Hop(s, i, j)
                    heapq.heappush(queue, (*candidate, j))
    return _trace_back(came_from, start, end)


def _trace_back(came_from: dict[int, Hop], start: int, end: int) -> list[Hop]:
    route: list[Hop] = []
    position = end
    while position != start:
        hop = came_from[position]
        route.append(hop)
        position = hop.start
    return route[::-1]


def throughput_weighted_route(
    swarm_map: SwarmMap,
    start: int = 0,
    end: int | None = None,
    *,
    rng: random.Random,
    banned: frozenset[str] = frozenset(),
    load: Mapping[str, float] | None = None,
) -> list[Hop]:
    """Random pipeline for blocks [start, end) that spreads traffic in proportion to capacity.

    SWARM's stochastic wiring: at each boundary b, draw one of the servers covering block b with
    probability proportional to throughput / (1 + load); it takes blocks [b, min(its end, end)).
    Over many draws each server then gets a share of the traffic matching its share of the
    throughput, while the `load` (e.g. requests in flight) steers new work away from busy servers.
    `rng` is explicit so that callers and tests control reproducibility.
    """
    end = swarm_map.num_blocks if end is None else end
    servers = sorted(usable_servers(swarm_map, banned), key=lambda s: s.peer_id)  # order-independent
    _require_coverage(swarm_map, servers, start, end)
    load = load or {}

    route: list[Hop] = []
    position = start
    while position < end:
        candidates = [s for s in servers if s.start <= position < s.end]
        # Load counts outstanding work, so it is never negative; clamping keeps every weight > 0.
        weights = [span_throughput(s) / (1.0 + max(0.0, load.get(s.peer_id, 0.0))) for s in candidates]
        if not sum(weights) > 0:  # absurdly small announced figures underflow: treat them as equal
            weights = [1.0] * len(candidates)
        chosen = rng.choices(candidates, weights=weights)[0]
        route.append(Hop(chosen, position, min(chosen.end, end)))
        position = route[-1].end
    return route
