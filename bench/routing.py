"""Benchmark both routing policies on an internet-scale swarm-map snapshot.

    python bench/routing.py [--servers 10000] [--blocks 80] [--routes 50] [--out bench/results/routing.json]

Builds a snapshot of `--servers` random servers over a `--blocks`-block model (spans of 4-24
blocks at random offsets, 5% of servers not ONLINE, per-block speeds over two orders of
magnitude, half with measured inference steps/s, random free cache) with an RTT measured for
every online server, as an inference session has after its pings. Then times, per route:

- `min_latency_route` (the whole model, every server's RTT, a KV-cache requirement and a few
  banned peers, as a session opening asks) against the Dijkstra it replaced (kept below as
  `reference_min_latency_route`);
- `throughput_weighted_route` (with a load on 100 peers, as training asks).

and the one-off cost of the snapshot's `RouteIndex` (built once per snapshot, i.e. once per
swarm-map refresh). Then checks, on 300 smaller random snapshots (sub-ranges, bans, cache
limits included), that the new min-latency route costs exactly what the reference's does.
Exit status 1 if a cost differs or a policy misses the per-route target.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from swarm.coordinator.routing import (
    DEFAULT_RTT,
    Hop,
    SwarmMap,
    min_latency_route,
    seconds_per_block,
    throughput_weighted_route,
)
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState

TARGET_S = 0.010  # per route, both policies


def random_server(rng: random.Random, i: int, num_blocks: int, span: tuple[int, int]) -> ServerRecord:
    length = rng.randint(*span)
    start = rng.randrange(0, max(1, num_blocks - length + 1))
    return ServerRecord(
        state=ServerState.ONLINE if rng.random() > 0.05 else rng.choice(list(ServerState)),
        peer_id=f"peer{i:06d}",
        grpc_address=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:31337",
        model="bench",
        start=start,
        end=min(num_blocks, start + length),
        compute_throughput=rng.uniform(10, 1000),
        inference_rps=rng.choice([0.0, rng.uniform(5, 500)]),
        throughput=rng.uniform(1, 100),
        free_cache_tokens=rng.choice([0, 1024, 8192, 65536]),
        software_version="bench",
    )


def snapshot(rng: random.Random, servers: int, num_blocks: int, span: tuple[int, int]) -> SwarmMap:
    records = [random_server(rng, i, num_blocks, span) for i in range(servers)]
    # Coverage: one full-model server, so every block is served whatever the draw.
    records.append(
        random_server(rng, servers, num_blocks, (num_blocks, num_blocks)).model_copy(
            update={"state": ServerState.ONLINE, "free_cache_tokens": 1 << 20}
        )
    )
    return SwarmMap("bench", num_blocks, tuple(records))


# ---- the algorithm routing.py had before (Dijkstra over boundaries), the reference ------------


def reference_min_latency_route(
    swarm_map: SwarmMap,
    start: int = 0,
    end: int | None = None,
    *,
    banned: frozenset[str] = frozenset(),
    rtt: Mapping[str, float] | None = None,
    cache_tokens: int = 0,
) -> list[Hop]:
    end = swarm_map.num_blocks if end is None else end
    servers = [
        s
        for s in swarm_map.online()
        if s.peer_id not in banned and (cache_tokens <= 0 or s.free_cache_tokens >= cache_tokens)
    ]
    covered = {b for s in servers for b in range(max(s.start, start), min(s.end, end))}
    if missing := [b for b in range(start, end) if b not in covered]:
        raise MissingBlocksError(swarm_map.model, missing)
    rtt = rtt or {}
    unreached = (float("inf"), 0, "")
    best: dict[int, tuple[float, int, str]] = {start: (0.0, 0, "")}
    came_from: dict[int, Hop] = {}
    queue: list[tuple[float, int, str, int]] = [(0.0, 0, "", start)]
    while queue:
        cost, hops, tie, i = heapq.heappop(queue)
        if i == end:
            break
        if best.get(i, unreached) < (cost, hops, tie):
            continue
        for s in servers:
            if not s.start <= i < s.end:
                continue
            hop_rtt, per_block = rtt.get(s.peer_id, DEFAULT_RTT), seconds_per_block(s)
            for j in range(i + 1, min(s.end, end) + 1):
                candidate = (cost + hop_rtt + (j - i) * per_block, hops + 1, s.peer_id)
                if candidate < best.get(j, unreached):
                    best[j] = candidate
                    came_from[j] = Hop(s, i, j)
                    heapq.heappush(queue, (*candidate, j))
    route: list[Hop] = []
    position = end
    while position != start:
        route.append(came_from[position])
        position = route[-1].start
    return route[::-1]


def route_cost(route: list[Hop], rtt: Mapping[str, float]) -> float:
    return sum(
        rtt.get(h.peer_id, DEFAULT_RTT) + (h.end - h.start) * seconds_per_block(h.server) for h in route
    )


# ---- measurements ------------------------------------------------------------------------------


def per_call(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of n calls."""
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def check_costs(rng: random.Random, cases: int) -> dict[str, Any]:
    """New min-latency route vs the reference on small random snapshots: equal costs (or both fail)."""
    worst, failures, compared = 0.0, [], 0
    for case in range(cases):
        servers, blocks = rng.choice([(5, 6), (20, 12), (100, 24), (400, 80)])
        swarm_map = snapshot(rng, servers, blocks, (1, max(2, blocks // 3)))
        if case % 3 == 0:  # a few without the full-model server, so some blocks may be missing
            swarm_map = SwarmMap("bench", blocks, swarm_map.servers[:-1])
        rtt = {s.peer_id: rng.uniform(0.001, 0.2) for s in swarm_map.servers if rng.random() < 0.8}
        peers = [s.peer_id for s in swarm_map.servers]
        kwargs: dict[str, Any] = {
            "banned": frozenset(rng.sample(peers, k=min(len(peers), rng.randint(0, 3)))),
            "rtt": rtt,
            "cache_tokens": rng.choice([0, 0, 2048, 16384]),
        }
        start = rng.randrange(blocks)
        end = rng.randint(start + 1, blocks)
        try:
            expected = route_cost(reference_min_latency_route(swarm_map, start, end, **kwargs), rtt)
        except MissingBlocksError as e:
            try:
                min_latency_route(swarm_map, start, end, **kwargs)
                failures.append(
                    f"case {case}: reference found blocks {e.blocks} missing, the new route did not"
                )
            except MissingBlocksError as mine:
                if mine.blocks != e.blocks:
                    failures.append(f"case {case}: missing {mine.blocks}, reference {e.blocks}")
            continue
        route = min_latency_route(swarm_map, start, end, **kwargs)
        contiguous = route[0].start == start and route[-1].end == end
        contiguous &= all(a.end == b.start for a, b in itertools.pairwise(route))
        got = route_cost(route, rtt)
        compared += 1
        worst = max(worst, abs(got - expected) / expected)
        if not contiguous or abs(got - expected) > 1e-9 * expected:
            failures.append(f"case {case}: cost {got!r} vs reference {expected!r}, contiguous={contiguous}")
    return {"cases": cases, "compared_routes": compared, "worst_rel_diff": worst, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--routes", type=int, default=50, help="timed routes per policy (median reported)")
    parser.add_argument("--reference-routes", type=int, default=5, help="timed routes of the old algorithm")
    parser.add_argument("--check-cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    swarm_map = snapshot(rng, args.servers, args.blocks, (4, 24))
    began = time.perf_counter()
    index = swarm_map.index
    build_s = time.perf_counter() - began
    online = index.servers
    rtt = {s.peer_id: rng.uniform(0.005, 0.3) for s in online}
    banned = frozenset(s.peer_id for s in rng.sample(online, 5))
    load = {s.peer_id: rng.uniform(0, 8) for s in rng.sample(online, 100)}
    session: dict[str, Any] = {"banned": banned, "rtt": rtt, "cache_tokens": 2048}
    routes_rng = random.Random(args.seed)

    new = per_call(lambda: min_latency_route(swarm_map, **session), args.routes)
    old = per_call(lambda: reference_min_latency_route(swarm_map, **session), args.reference_routes)
    weighted = per_call(
        lambda: throughput_weighted_route(swarm_map, rng=routes_rng, banned=banned, load=load), args.routes
    )
    same = route_cost(min_latency_route(swarm_map, **session), rtt) == route_cost(
        reference_min_latency_route(swarm_map, **session), rtt
    )
    check = check_costs(random.Random(args.seed + 1), args.check_cases)

    med = {
        name: statistics.median(t) for name, t in (("min_latency", new), ("weighted", weighted), ("old", old))
    }
    ok = med["min_latency"] < TARGET_S and med["weighted"] < TARGET_S and same and not check["failures"]
    print(
        f"snapshot: {args.servers} servers ({len(online)} online) x {args.blocks} blocks, "
        "spans 4-24 blocks, "
        f"{sum(len(c) for c in index.covering) / args.blocks:.0f} servers per block; "
        f"RouteIndex built once per snapshot in {build_s * 1000:.1f} ms"
    )
    print(
        f"min_latency_route:         median {med['min_latency'] * 1000:6.2f} ms, "
        f"max {max(new) * 1000:6.2f} ms "
        f"({args.routes} routes; RTTs of all {len(rtt)} servers, cache 2048 tokens, 5 banned)"
    )
    print(
        f"  reference (old Dijkstra): median {med['old'] * 1000:6.1f} ms ({args.reference_routes} routes); "
        f"same cost on this snapshot: {'yes' if same else 'NO'}"
    )
    print(
        f"throughput_weighted_route: median {med['weighted'] * 1000:6.2f} ms, "
        f"max {max(weighted) * 1000:6.2f} ms "
        f"({args.routes} routes; load on 100 peers, 5 banned)"
    )
    print(
        f"cost check vs reference: {check['compared_routes']} routes compared "
        f"on {check['cases']} small snapshots, "
        f"worst relative difference {check['worst_rel_diff']:.1e}, {len(check['failures'])} failures"
    )
    for failure in check["failures"][:10]:
        print(f"  {failure}")
    print(
        f"routing: min_latency {med['min_latency'] * 1000:.2f} ms/route (was {med['old'] * 1000:.0f} ms), "
        f"throughput_weighted {med['weighted'] * 1000:.2f} ms/route, target < {TARGET_S * 1000:.0f} ms: "
        f"{'met' if ok else 'NOT met'}"
    )
    if args.out is not None:
        report = {
            "servers": args.servers,
            "online": len(online),
            "blocks": args.blocks,
            "index_build_s": build_s,
            "min_latency_s": new,
            "reference_min_latency_s": old,
            "throughput_weighted_s": weighted,
            "median_s": med,
            "same_cost_on_big_snapshot": same,
            "cost_check": check,
            "target_s": TARGET_S,
            "met": ok,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
