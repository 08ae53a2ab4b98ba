"""Routing is a pure function of a swarm-map snapshot: tested without any network."""

from __future__ import annotations

import itertools
import random

import pytest

from swarm.coordinator.routing import DEFAULT_RTT, Hop, SwarmMap, min_latency_route
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState


def server(
    peer: str, start: int, end: int, throughput: float = 100.0, state: ServerState = ServerState.ONLINE
) -> ServerRecord:
    return ServerRecord(
        state=state,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        model="m",
        start=start,
        end=end,
        compute_throughput=throughput,
        software_version="test",
    )


def spans(route: list[Hop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route]


def test_one_server_per_half() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 4), server("b", 4, 8)))
    assert spans(min_latency_route(swarm_map)) == [("a", 0, 4), ("b", 4, 8)]


def test_prefers_fewer_hops_when_compute_is_equal() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 4), server("b", 4, 8), server("c", 0, 8)))
    assert spans(min_latency_route(swarm_map)) == [("c", 0, 8)]


def test_a_much_faster_pair_beats_one_slow_server() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 4, 1000), server("b", 4, 8, 1000), server("slow", 0, 8, 10)))
    assert spans(min_latency_route(swarm_map)) == [("a", 0, 4), ("b", 4, 8)]


def test_banned_and_offline_servers_are_skipped() -> None:
    swarm_map = SwarmMap(
        "m", 4, (server("a", 0, 4), server("b", 0, 4), server("gone", 0, 4, 1e6, ServerState.OFFLINE))
    )
    assert spans(min_latency_route(swarm_map, banned=frozenset({"a"}))) == [("b", 0, 4)]


def test_sub_range_routes_only_those_blocks() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 6), server("b", 3, 8)))
    assert spans(min_latency_route(swarm_map, 4, 8)) == [("b", 4, 8)]


def test_missing_blocks_are_named() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 3), server("b", 5, 7)))
    with pytest.raises(MissingBlocksError) as info:
        min_latency_route(swarm_map)
    assert info.value.blocks == [3, 4, 7]
    assert "3:5, 7:8" in str(info.value)


def _route_cost(route: list[Hop], rtt: dict[str, float]) -> float:
    return sum(
        rtt.get(h.peer_id, DEFAULT_RTT) + (h.end - h.start) / h.server.compute_throughput for h in route
    )


def _brute_force_best(swarm_map: SwarmMap, rtt: dict[str, float]) -> float:
    """Enumerate every way to cut [0, n) into hops served by some server."""
    n, best = swarm_map.num_blocks, float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        segments = list(itertools.pairwise(bounds))
        choices = [[s for s in swarm_map.online() if s.start <= a and b <= s.end] for a, b in segments]
        for pick in itertools.product(*choices):
            route = [Hop(s, a, b) for s, (a, b) in zip(pick, segments, strict=True)]
            best = min(best, _route_cost(route, rtt))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_min_latency_equals_brute_force_on_random_swarms(seed: int) -> None:
    rng = random.Random(seed)
    n = 6
    servers = [server(f"p{i}", 0, n, rng.uniform(5, 200)) for i in range(1)]
    for i in range(1, 6):
        a = rng.randrange(n)
        servers.append(server(f"p{i}", a, rng.randrange(a + 1, n + 1), rng.uniform(5, 200)))
    swarm_map = SwarmMap("m", n, tuple(servers))
    rtt = {s.peer_id: rng.uniform(0.001, 0.2) for s in servers}
    route = min_latency_route(swarm_map, rtt=rtt)
    assert route[0].start == 0 and route[-1].end == n
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    assert _route_cost(route, rtt) == pytest.approx(_brute_force_best(swarm_map, rtt), rel=1e-9)
