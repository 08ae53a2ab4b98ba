"""Routing policies: pure functions from a swarm-map snapshot to a pipeline of hops.

No I/O here, so every policy is unit-tested on hand-made snapshots. Both policies read the
snapshot's `RouteIndex` (arrays built once per snapshot), so a route over 10,000 servers
costs milliseconds: it touches only the servers of the blocks it crosses.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from swarm.coordinator.route_index import (
    DEFAULT_BLOCK_THROUGHPUT,
    DEFAULT_RTT,
    Floats,
    Ints,
    Mask,
    RouteIndex,
    seconds_per_block,
    span_throughput,
)
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState

__all__ = [
    "DEFAULT_BLOCK_THROUGHPUT",
    "DEFAULT_RTT",
    "Hop",
    "SwarmMap",
    "min_latency_route",
    "seconds_per_block",
    "span_throughput",
    "throughput_weighted_route",
]


@dataclass(frozen=True)
class SwarmMap:
    """Who serves which blocks of one model, as seen at `taken_at`."""

    model: str
    num_blocks: int
    servers: tuple[ServerRecord, ...]
    taken_at: float = 0.0

    @cached_property
    def index(self) -> RouteIndex:
        """What routing reads, laid out once for this (immutable) snapshot."""
        return RouteIndex.build(self.servers, self.num_blocks)

    def online(self) -> list[ServerRecord]:
        return [s for s in self.servers if s.state == ServerState.ONLINE]

    def servers_for(self, block: int) -> list[ServerRecord]:
        return [s for s in self.online() if s.start <= block < s.end]

    def missing_blocks(
        self, start: int = 0, end: int | None = None, banned: frozenset[str] = frozenset()
    ) -> list[int]:
        end = self.num_blocks if end is None else end
        return self.index.missing_blocks(start, end, self.index.usable(banned))


@dataclass(frozen=True)
class Hop:
    """Run blocks [start, end) on `server`."""

    server: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def _require_coverage(swarm_map: SwarmMap, usable: Mask | None, start: int, end: int) -> None:
    # Checked up front so that a route is never half-built before we find out it cannot finish.
    missing = swarm_map.index.missing_blocks(start, end, usable)
    if missing:
        raise MissingBlocksError(swarm_map.model, missing)


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
    index = swarm_map.index
    usable = index.usable(banned, cache_tokens)
    _require_coverage(swarm_map, usable, start, end)
    rtts = index.per_peer(rtt or {}, DEFAULT_RTT)
    if usable is not None:
        rtts[~usable] = np.inf  # never the cheapest edge: no per-block filtering needed
    return _ShortestPath(index, rtts, start, end).route()


class _ShortestPath:
    """Shortest path over boundaries start..end by dynamic programming (every edge points forward).

    cost[j] = min over servers s covering block j-1 and entries i of cost[i] + rtt[s] + (j-i) p[s].
    For a fixed s the best entry minimises cost[i] - i p[s], so one running minimum per server,
    updated as the sweep passes each boundary the server covers, replaces Dijkstra's edge
    relaxations: one vectorized step per block over the servers covering it. Entries are
    recovered afterwards for the hops of the chosen route only.
    """

    TIE = 1e-12  # relative: totals this close are equal (they differ by float rounding alone)

    def __init__(self, index: RouteIndex, rtt: Floats, start: int, end: int) -> None:
        self.index, self.rtt, self.start = index, rtt, start
        self.cost = [0.0] * (end + 1)  # a list: the sweep reads one boundary at a time
        self.winner = [0] * (end + 1)  # server of the last hop into each boundary
        self._hops: dict[int, int] = {start: 0}
        entry_value = np.full(len(index.servers), np.inf)  # per server: min of cost[i] - i p
        for b in range(start, end):
            servers = index.covering[b]
            value = np.minimum(entry_value.take(servers), self.cost[b] - index.covering_before[b])
            entry_value[servers] = value
            total = value + rtt.take(servers)
            total += index.covering_through[b]
            k = int(np.argmin(total))  # the first minimum: the smallest peer id
            best = float(total[k])
            if np.count_nonzero(total <= best * (1 + self.TIE)) == 1:
                self.winner[b + 1], self.cost[b + 1] = int(servers[k]), best
            else:
                near = servers[total <= best * (1 + self.TIE)]
                self.winner[b + 1] = winner = self._untie(near, b + 1)
                self.cost[b + 1] = self._edge(winner, b + 1)[0]

    def _entry(self, server: int, j: int) -> int:
        """The boundary where `server`'s hop into j best begins (cheapest, then fewest hops)."""
        return self._edge(server, j)[1]

    def _edge(self, server: int, j: int) -> tuple[float, int]:
        """(exact cost, entry) of the best hop on `server` that ends at boundary j."""
        first = max(self.start, int(self.index.start[server]))
        entries = np.arange(first, j)
        costs = np.array(self.cost[first:j])
        totals = costs + self.rtt[server] + (j - entries) * self.index.seconds_per_block[server]
        best = float(totals.min())
        ties = entries[totals == best]
        entry = int(ties[0]) if len(ties) == 1 else min(ties.tolist(), key=self.hops)
        return best, entry

    def hops(self, j: int) -> int:
        """Hops of the best route into boundary j (only needed to break ties)."""
        if j not in self._hops:
            self._hops[j] = self.hops(self._entry(self.winner[j], j)) + 1
        return self._hops[j]

    def _untie(self, servers: Ints, j: int) -> int:
        """Among servers whose totals into j tie: exact cost, then fewer hops, then peer id."""
        keys = []
        for s in servers.tolist():
            cost, entry = self._edge(s, j)
            keys.append((cost, self.hops(entry) + 1, s))
        return min(keys)[2]

    def route(self) -> list[Hop]:
        route: list[Hop] = []
        position = len(self.cost) - 1
        while position != self.start:
            server = self.winner[position]
            first = self._entry(server, position)
            route.append(Hop(self.index.servers[server], first, position))
            position = first
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
    `rng` is explicit so that callers and tests control reproducibility; candidates are in peer-id
    order and drawn as `rng.choices` draws, so a seed gives the same route whatever the map's order.
    """
    end = swarm_map.num_blocks if end is None else end
    index = swarm_map.index
    usable = index.usable(banned)
    _require_coverage(swarm_map, usable, start, end)
    # Load counts outstanding work, so it is never negative; clamping keeps every weight > 0.
    divisor = 1.0 + index.per_peer(load, 0.0).clip(0.0, None) if load else None

    route: list[Hop] = []
    position = start
    while position < end:
        candidates = index.candidates(position, usable)
        weights = index.span_throughput[candidates]
        if divisor is not None:
            weights = weights / divisor[candidates]
        chosen = index.servers[int(candidates[_draw(weights, rng)])]
        route.append(Hop(chosen, position, min(chosen.end, end)))
        position = route[-1].end
    return route


def _draw(weights: Floats, rng: random.Random) -> int:
    """An index drawn with probability proportional to `weights`, exactly as `rng.choices` draws."""
    cumulative = np.cumsum(weights)  # sequential sums, as itertools.accumulate in random.choices
    if not 0 < cumulative[-1] < np.inf:  # underflowing (or overflowing) figures: treat them as equal
        cumulative = np.arange(1, len(weights) + 1, dtype=np.float64)
    drawn = cumulative.searchsorted(rng.random() * float(cumulative[-1]), side="right")
    return min(int(drawn), len(weights) - 1)
