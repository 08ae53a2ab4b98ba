"""Routing is a pure function of a swarm-map snapshot: tested without any network."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.coordinator.routing import (
    DEFAULT_RTT,
    Hop,
    SwarmMap,
    min_latency_route,
    span_throughput,
    throughput_weighted_route,
)
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState


def server(
    peer: str,
    start: int,
    end: int,
    throughput: float = 100.0,
    state: ServerState = ServerState.ONLINE,
    *,
    inference_rps: float = 0.0,
    span_throughput: float = 0.0,
    free_cache: int = 0,
) -> ServerRecord:
    """`throughput` is per-block compute; `span_throughput` is the announced whole-span figure."""
    return ServerRecord(
        state=state,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        model="m",
        start=start,
        end=end,
        compute_throughput=throughput,
        inference_rps=inference_rps,
        throughput=span_throughput,
        free_cache_tokens=free_cache,
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
    """Written out independently of routing.py: RTT + blocks x (1 / inference_rps, else 1 / compute)."""

    def per_block(s: ServerRecord) -> float:
        return 1 / s.inference_rps if s.inference_rps > 0 else 1 / s.compute_throughput

    return sum(rtt.get(h.peer_id, DEFAULT_RTT) + (h.end - h.start) * per_block(h.server) for h in route)


def _brute_force_best(servers: list[ServerRecord], n: int, rtt: dict[str, float]) -> float:
    """Enumerate every way to cut [0, n) into hops served by some server (inf if none works)."""
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        segments = list(itertools.pairwise(bounds))
        choices = [[s for s in servers if s.start <= a and b <= s.end] for a, b in segments]
        for pick in itertools.product(*choices):
            route = [Hop(s, a, b) for s, (a, b) in zip(pick, segments, strict=True)]
            best = min(best, _route_cost(route, rtt))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_min_latency_equals_brute_force_on_random_swarms(seed: int) -> None:
    rng = random.Random(seed)
    n = 6
    spans_ = [(0, n)] + [(a, rng.randrange(a + 1, n + 1)) for a in (rng.randrange(n) for _ in range(5))]
    servers = [
        server(
            f"p{i}",
            a,
            b,
            rng.uniform(5, 200),
            # Half the servers measured single-token steps; the rest fall back to forward throughput.
            inference_rps=rng.choice([0.0, rng.uniform(5, 200)]),
            free_cache=rng.choice([0, 500, 2000]),
        )
        for i, (a, b) in enumerate(spans_)
    ]
    swarm_map = SwarmMap("m", n, tuple(servers))
    rtt = {s.peer_id: rng.uniform(0.001, 0.2) for s in servers}
    cache_tokens = rng.choice([0, 0, 100, 1000])
    usable = [s for s in servers if cache_tokens == 0 or s.free_cache_tokens >= cache_tokens]
    expected = _brute_force_best(usable, n, rtt)
    if expected == float("inf"):
        with pytest.raises(MissingBlocksError):
            min_latency_route(swarm_map, rtt=rtt, cache_tokens=cache_tokens)
        return
    route = min_latency_route(swarm_map, rtt=rtt, cache_tokens=cache_tokens)
    assert route[0].start == 0 and route[-1].end == n
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    assert all(h.server in usable for h in route)
    assert _route_cost(route, rtt) == pytest.approx(expected, rel=1e-9)


def test_inference_rps_outweighs_forward_throughput() -> None:
    # "fwd" has the higher batched throughput but is slower per single-token step.
    swarm_map = SwarmMap("m", 4, (server("fwd", 0, 4, 1000, inference_rps=10), server("step", 0, 4, 50)))
    assert spans(min_latency_route(swarm_map)) == [("step", 0, 4)]


def test_cache_filter_skips_servers_without_room() -> None:
    fast_but_full = server("full", 0, 8, 1000, free_cache=10)
    swarm_map = SwarmMap("m", 8, (fast_but_full, server("roomy", 0, 8, 10, free_cache=4096)))
    assert spans(min_latency_route(swarm_map)) == [("full", 0, 8)]
    assert spans(min_latency_route(swarm_map, cache_tokens=512)) == [("roomy", 0, 8)]


def test_cache_filter_names_blocks_nobody_has_room_for() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 4, free_cache=4096), server("b", 4, 8, free_cache=10)))
    with pytest.raises(MissingBlocksError) as info:
        min_latency_route(swarm_map, cache_tokens=512)
    assert info.value.blocks == [4, 5, 6, 7]


# ------------------------------------------------------------------ throughput-weighted random ---


def _peer_shares(routes: list[list[Hop]]) -> dict[str, float]:
    counts = Counter(h.peer_id for route in routes for h in route)
    return {peer: c / len(routes) for peer, c in counts.items()}


def _draw(swarm_map: SwarmMap, load: dict[str, float] | None = None) -> list[list[Hop]]:
    rng = random.Random(0)  # seeded: the share checks below are exact, reproducible numbers
    return [throughput_weighted_route(swarm_map, rng=rng, load=load) for _ in range(20_000)]


def test_traffic_shares_match_throughput_shares() -> None:
    swarm_map = SwarmMap(
        "m", 8, tuple(server(p, 0, 8, span_throughput=t) for p, t in [("a", 10), ("b", 30), ("c", 60)])
    )
    routes = _draw(swarm_map)
    assert all(len(route) == 1 for route in routes)
    shares = _peer_shares(routes)
    for peer, expected in {"a": 0.1, "b": 0.3, "c": 0.6}.items():
        assert shares[peer] == pytest.approx(expected, abs=0.02), shares


def test_per_block_shares_match_throughput_in_each_layer() -> None:
    layers = [("a", 0, 4, 1), ("b", 0, 4, 3), ("c", 4, 8, 2), ("d", 4, 8, 2)]
    swarm_map = SwarmMap("m", 8, tuple(server(p, s, e, span_throughput=t) for p, s, e, t in layers))
    routes = _draw(swarm_map)
    per_block = Counter((b, h.peer_id) for route in routes for h in route for b in range(h.start, h.end))
    expected = {"a": 0.25, "b": 0.75, "c": 0.5, "d": 0.5}
    for (block, peer), count in per_block.items():
        assert count / len(routes) == pytest.approx(expected[peer], abs=0.02), (block, peer)
    assert sum(per_block.values()) == 8 * len(routes)


def test_load_halves_the_weight_of_a_busy_server() -> None:
    swarm_map = SwarmMap(
        "m", 8, (server("busy", 0, 8, span_throughput=1), server("idle", 0, 8, span_throughput=1))
    )
    shares = _peer_shares(_draw(swarm_map, load={"busy": 1.0}))
    assert shares["busy"] == pytest.approx(1 / 3, abs=0.02)
    assert shares["idle"] == pytest.approx(2 / 3, abs=0.02)


def test_unmeasured_throughput_falls_back_to_per_block_compute() -> None:
    assert span_throughput(server("a", 0, 8, 80)) == 10  # 80 tokens/s per block over 8 blocks
    assert span_throughput(server("a", 0, 8, 0)) == 100 / 8  # nothing measured: the default
    assert span_throughput(server("a", 0, 8, 80, span_throughput=3)) == 3


def test_weighted_route_names_missing_blocks() -> None:
    swarm_map = SwarmMap("m", 8, (server("a", 0, 5), server("b", 5, 8)))
    with pytest.raises(MissingBlocksError) as info:
        throughput_weighted_route(swarm_map, rng=random.Random(0), banned=frozenset({"b"}))
    assert info.value.blocks == [5, 6, 7]


def test_weighted_route_survives_underflowing_throughputs() -> None:
    # Found by hypothesis: 5e-324 / (1 + load) is 0.0, and random.choices refuses all-zero weights.
    tiny = SwarmMap("m", 2, (server("a", 0, 2, 5e-324), server("b", 0, 2, 5e-324)))
    for seed in range(20):
        (hop,) = throughput_weighted_route(tiny, rng=random.Random(seed), load={"a": 1.0, "b": 1.0})
        assert (hop.start, hop.end) == (0, 2)


_span = st.integers(0, 7).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, 8)))
_swarms = st.lists(
    st.tuples(_span, st.floats(0.0, 100.0), st.sampled_from([ServerState.ONLINE, ServerState.OFFLINE])),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_swarms, st.data())
def test_weighted_routes_are_contiguous_and_avoid_banned(
    specs: list[tuple[tuple[int, int], float, ServerState]], data: st.DataObject
) -> None:
    servers = [server(f"p{i}", a, b, t, state) for i, ((a, b), t, state) in enumerate(specs)]
    swarm_map = SwarmMap("m", 8, tuple(servers))
    banned = frozenset(data.draw(st.sets(st.sampled_from([s.peer_id for s in servers]))))
    start = data.draw(st.integers(0, 7))
    end = data.draw(st.integers(start + 1, 8))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    missing = swarm_map.missing_blocks(start, end, banned)
    if missing:
        with pytest.raises(MissingBlocksError) as info:
            throughput_weighted_route(swarm_map, start, end, rng=rng, banned=banned)
        assert info.value.blocks == missing
        return
    route = throughput_weighted_route(swarm_map, start, end, rng=rng, banned=banned)
    assert route[0].start == start and route[-1].end == end
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    for hop in route:
        assert hop.peer_id not in banned and hop.server.state == ServerState.ONLINE
        assert hop.server.start <= hop.start < hop.end <= hop.server.end


def test_equal_costs_go_to_fewer_hops_then_the_smaller_peer_id() -> None:
    free = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}  # no RTT: one hop or two cost the same compute
    swarm_map = SwarmMap("m", 4, (server("c", 0, 2), server("d", 2, 4), server("b", 0, 4), server("a", 0, 4)))
    assert spans(min_latency_route(swarm_map, rtt=free)) == [("a", 0, 4)]


@settings(max_examples=200, deadline=None)
@given(_swarms, st.data())
def test_min_latency_costs_equal_brute_force_on_sub_ranges_with_bans(
    specs: list[tuple[tuple[int, int], float, ServerState]], data: st.DataObject
) -> None:
    """The vectorized sweep against exhaustive search: any span, bans, RTTs, unmeasured servers."""
    servers = [
        server(f"p{i}", a, min(b, 6), t + 1, state) for i, ((a, b), t, state) in enumerate(specs) if a < 6
    ]
    swarm_map = SwarmMap("m", 6, tuple(servers))
    banned = frozenset(data.draw(st.sets(st.sampled_from([s.peer_id for s in servers] or ["x"]))))
    rtt = {s.peer_id: data.draw(st.floats(0.0, 0.3)) for s in servers}
    start = data.draw(st.integers(0, 5))
    end = data.draw(st.integers(start + 1, 6))
    usable = [s for s in servers if s.state == ServerState.ONLINE and s.peer_id not in banned]
    clipped = [s.model_copy(update={"start": max(s.start, start), "end": min(s.end, end)}) for s in usable]
    clipped = [
        s.model_copy(update={"start": s.start - start, "end": s.end - start})
        for s in clipped
        if s.start < s.end
    ]
    expected = _brute_force_best(clipped, end - start, rtt)
    if expected == float("inf"):
        with pytest.raises(MissingBlocksError):
            min_latency_route(swarm_map, start, end, banned=banned, rtt=rtt)
        return
    route = min_latency_route(swarm_map, start, end, banned=banned, rtt=rtt)
    assert route[0].start == start and route[-1].end == end
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    assert all(h.server in usable and h.server.start <= h.start < h.end <= h.server.end for h in route)
    assert _route_cost(route, rtt) == pytest.approx(expected, rel=1e-9, abs=1e-12)
