"""Block selection and rebalancing: unit cases, swarm simulations and properties, all without a network."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from swarm.errors import ConfigError
from swarm.node.selection import (
    MIN_REPLICAS,
    BlockStats,
    block_stats,
    bottleneck_upper_bound,
    choose_span,
    counted_servers,
    plan_move,
)
from swarm.records import ServerRecord, ServerState


def server(
    peer: str, start: int, end: int, throughput: float = 10.0, state: ServerState = ServerState.ONLINE
) -> ServerRecord:
    return ServerRecord(
        state=state,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        model="m",
        start=start,
        end=end,
        throughput=throughput,
        software_version="0",
    )


# ------------------------------------------------------------------------------------ block_stats ---


def test_block_stats_sums_throughput_and_counts_servers() -> None:
    stats = block_stats([server("a", 0, 4, 10.0), server("b", 2, 6, 5.0)], 8)
    assert stats.totals == (10.0, 10.0, 15.0, 15.0, 5.0, 5.0, 0.0, 0.0)
    assert stats.replicas == (1, 1, 2, 2, 1, 1, 0, 0)
    assert (stats.bottleneck, stats.uncovered, stats.under_replicated) == (0.0, 2, 6)


def test_duplicates_count_once_and_the_last_record_wins() -> None:
    assert block_stats([server("a", 0, 4), server("a", 0, 4)], 4).replicas == (1, 1, 1, 1)
    moved = block_stats([server("a", 0, 4), server("a", 4, 8)], 8)
    assert moved.replicas == (0, 0, 0, 0, 1, 1, 1, 1)
    gone = [server("a", 0, 4), server("a", 0, 4, state=ServerState.OFFLINE)]
    assert block_stats(gone, 4).uncovered == 4


def test_only_joining_and_online_servers_count() -> None:
    records = [
        server("on", 0, 1),
        server("join", 1, 2, state=ServerState.JOINING),
        server("drain", 2, 3, state=ServerState.DRAINING),
        server("off", 3, 4, state=ServerState.OFFLINE),
    ]
    assert [r.peer_id for r in counted_servers(records)] == ["on", "join"]
    assert block_stats(records, 4).replicas == (1, 1, 0, 0)


def test_spans_beyond_the_model_are_clipped() -> None:
    stats = block_stats([server("a", 6, 12), server("b", 10, 12)], 8)
    assert stats.replicas == (0, 0, 0, 0, 0, 0, 1, 1)


def test_bottleneck_upper_bound() -> None:
    # capacity 10*4 + 5*8 = 80 over 8 blocks -> 10; the sum of throughputs (15) does not bind
    assert bottleneck_upper_bound([(10.0, 4), (5.0, 8)], 8) == 10.0
    # one server can give a block no more than its own throughput, however long its span
    assert bottleneck_upper_bound([(3.0, 8)], 4) == 3.0


# ------------------------------------------------------------------------------------ choose_span ---


def test_empty_swarm_starts_at_block_zero() -> None:
    assert choose_span([], 8, 3, 1.0) == (0, 3)
    start, end = choose_span([], 8, 3, 1.0, rng=random.Random(1))
    assert start >= 0 and end == start + 3 <= 8


def test_uncovered_blocks_are_filled_first() -> None:
    # blocks 0-3 are weak but covered twice; 4-7 have nobody
    records = [server("a", 0, 4, 1.0), server("b", 0, 4, 1.0)]
    assert choose_span(records, 8, 4, 100.0) == (4, 8)


def test_a_span_that_leaves_no_sliver_wins_among_equals() -> None:
    # (4, 8), (6, 10) and (8, 12) each leave 4 blocks bare, but only (4, 8) leaves them in one piece
    assert choose_span([server("a", 0, 4)], 12, 4, 1.0, rng=random.Random(0)) == (4, 8)


def test_redundancy_comes_before_throughput() -> None:
    # blocks 0-3: one big server (100 tokens/s); blocks 4-7: two small ones (20 in all)
    records = [server("big", 0, 4, 100.0), server("c", 4, 8, 10.0), server("d", 4, 8, 10.0)]
    assert choose_span(records, 8, 4, 5.0) == (0, 4)
    # a bottleneck-only policy would have picked the other half
    base = block_stats(records, 8)
    assert base.with_span(4, 8, 5.0).bottleneck > base.with_span(0, 4, 5.0).bottleneck


def test_a_server_holding_every_block_does_not_hide_missing_redundancy() -> None:
    records = [server("huge", 0, 8, 1000.0)]
    for i in range(2):
        start, end = choose_span(records, 8, 4, 1.0)
        records.append(server(f"small{i}", start, end, 1.0))
    assert block_stats(records, 8).under_replicated == 0


def test_with_redundancy_in_place_the_bottleneck_is_raised() -> None:
    records = [server("a", 0, 8, 10.0), server("b", 0, 8, 10.0), server("c", 0, 4, 5.0)]
    assert choose_span(records, 8, 4, 1.0) == (4, 8)


def test_exact_ties_go_to_the_rng() -> None:
    # min blocks at both ends: no span of 2 lifts the bottleneck, (0, 2) and (6, 8) are mirror images
    records = [server("a", 0, 8), server("b", 0, 8), server("c", 2, 6, 5.0)]
    assert choose_span(records, 8, 2, 1.0) == (0, 2)
    chosen = {choose_span(records, 8, 2, 1.0, rng=random.Random(seed)) for seed in range(20)}
    assert chosen == {(0, 2), (6, 8)}


def test_exclude_leaves_the_node_itself_out() -> None:
    records = [server("me", 0, 4, 100.0), server("x", 4, 8, 1.0)]
    assert choose_span(records, 8, 4, 1.0) == (4, 8)
    assert choose_span(records, 8, 4, 1.0, exclude="me") == (0, 4)


@pytest.mark.parametrize(
    ("num_blocks", "span_len", "throughput", "message"),
    [
        (8, 0, 1.0, "got 0"),
        (8, 9, 1.0, "num_blocks=8, got 9"),
        (0, 1, 1.0, "num_blocks must be >= 1, got 0"),
        (8, 2, 0.0, "got 0.0"),
        (8, 2, -1.0, "got -1.0"),
        (8, 2, math.nan, "got nan"),
        (8, 2, math.inf, "got inf"),
    ],
)
def test_bad_arguments_are_refused_with_the_numbers(
    num_blocks: int, span_len: int, throughput: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        choose_span([], num_blocks, span_len, throughput)


def test_plan_move_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"my_span \[6, 10\).*num_blocks=8"):
        plan_move([], 8, "me", (6, 10), 1.0)
    with pytest.raises(ConfigError, match=r"got -0\.1"):
        plan_move([], 8, "me", (0, 4), 1.0, threshold=-0.1)


# -------------------------------------------------------------------------------------- plan_move ---


def test_plan_move_stays_when_nothing_is_gained() -> None:
    records = [server("a", 0, 4), server("b", 4, 8), server("c", 4, 8)]
    assert plan_move(records, 8, "me", (0, 4), 10.0) is None


def test_plan_move_goes_to_uncovered_blocks_when_its_own_stay_covered() -> None:
    records = [server("a", 0, 4), server("b", 0, 4), server("me", 0, 4)]
    assert plan_move(records, 8, "me", (0, 4), 10.0) == (4, 8)


def test_plan_move_does_not_trade_one_hole_for_another() -> None:
    # me alone serves 0-3 and 4-7 is bare: moving would only uncover 0-3
    assert plan_move([server("me", 0, 4)], 8, "me", (0, 4), 10.0) is None


def test_plan_move_uses_my_span_not_my_stale_records() -> None:
    # the DHT still shows me at 4-8, but I now serve 0-4: blocks 4-7 are bare
    records = [server("a", 0, 4), server("b", 0, 4), server("me", 4, 8)]
    assert plan_move(records, 8, "me", (0, 4), 10.0) == (4, 8)


def test_plan_move_needs_more_than_the_threshold() -> None:
    # every block has 2+ servers; moving me (2 tokens/s) from 0-4 to 4-8 lifts the bottleneck 20 -> 22 (+10%)
    records = [server("a", 0, 8, 10.0), server("b", 0, 8, 10.0), server("x", 0, 4, 2.0)]
    assert block_stats(records, 8).with_span(0, 4, 2.0).bottleneck == 20.0
    assert plan_move(records, 8, "me", (0, 4), 2.0) is None
    assert plan_move(records, 8, "me", (0, 4), 2.0, threshold=0.05) == (4, 8)


def test_plan_move_lifts_part_of_a_split_bottleneck() -> None:
    # blocks 0-1 and 6-7 hold the bottleneck (20); no span of 2 lifts it, but me (4 tokens/s) moving from
    # 2-4 to 0-2 halves the shortfall below 1.15 * 20 = 23 (4 blocks short by 3 -> 2 blocks), and adds
    # no block below 23: a large step towards the move (of another node) that lifts 6-7 too.
    records = [server("a", 0, 8, 10.0), server("b", 0, 8, 10.0), server("c", 2, 6, 5.0)]
    assert block_stats(records, 8).with_span(2, 4, 4.0).totals == (20, 20, 29, 29, 25, 25, 20, 20)
    assert plan_move(records, 8, "me", (2, 4), 4.0) == (0, 2)
    # 0.5 tokens/s cuts the shortfall only from 12 to 11: not by more than the threshold (15%) ...
    assert plan_move(records, 8, "me", (2, 4), 0.5) is None
    # ... but from 4 to 3 below 1.05 * 20, more than 5%
    assert plan_move(records, 8, "me", (2, 4), 0.5, threshold=0.05) == (0, 2)


# ------------------------------------------------------------------------------------ simulations ---


@dataclass(frozen=True)
class Node:
    peer: str
    throughput: float  # tokens/s through its whole span
    span_len: int


def make_nodes(rng: random.Random, count: int, lengths: tuple[int, int]) -> list[Node]:
    # throughput spread 1x-8x; span length (set by memory, not speed) drawn independently
    return [Node(f"n{i}", rng.uniform(1.0, 8.0), rng.randint(*lengths)) for i in range(count)]


def join_one_by_one(nodes: list[Node], num_blocks: int, rng: random.Random) -> dict[str, ServerRecord]:
    swarm: dict[str, ServerRecord] = {}
    for n in nodes:
        start, end = choose_span(list(swarm.values()), num_blocks, n.span_len, n.throughput, rng=rng)
        swarm[n.peer] = server(n.peer, start, end, n.throughput, state=ServerState.JOINING)
    return swarm


def rebalance_round(
    swarm: dict[str, ServerRecord], nodes: list[Node], num_blocks: int, rng: random.Random
) -> int:
    """Every node, in random order, asks plan_move on the current snapshot (which includes the moves of
    the nodes before it, as the DHT would) and moves if told. Returns how many moved."""
    moved = 0
    for n in rng.sample(nodes, len(nodes)):
        mine = swarm[n.peer]
        span = plan_move(
            list(swarm.values()), num_blocks, n.peer, (mine.start, mine.end), n.throughput, rng=rng
        )
        if span is not None:
            swarm[n.peer] = server(n.peer, span[0], span[1], n.throughput)
            moved += 1
    return moved


def rebalance(
    swarm: dict[str, ServerRecord], nodes: list[Node], num_blocks: int, rng: random.Random, max_rounds: int
) -> int:
    """Rounds with at least one move, until a quiet round or `max_rounds`."""
    for rounds in range(max_rounds):
        if rebalance_round(swarm, nodes, num_blocks, rng) == 0:
            return rounds
    return max_rounds


def two_cover_is_feasible(nodes: list[Node], num_blocks: int) -> bool:
    # Sufficient: fill one group until it spans the model (overshoot < the longest span), the rest still does.
    lengths = [n.span_len for n in nodes]
    return sum(lengths) >= 2 * num_blocks + max(lengths)


NUM_BLOCKS = 24
# The exact optimum (a MILP) takes 0.4-18 s per seed, 1.4 s median: these are the first five seeds of
# 0-9 whose MILP takes about a second. On the other five the ratio to the optimum is 0.90-0.95.
SEEDS = (0, 2, 6, 7, 8)
RECOVER_ROUNDS = 2  # B: rounds within which the 8 survivors must cover every block again


@pytest.mark.parametrize("seed", SEEDS)
def test_simulation_joins_then_rebalances(seed: int) -> None:
    """A: 12 nodes (1x-8x throughput, spans of 6-12 blocks) join a 24-block model, then rebalance.

    The bottleneck reached must be >= 80% of the best any placement achieves with every block on 2+
    servers (the policy puts redundancy first, so it is judged against the optimum under the same
    constraint), found exactly by `exact_best_bottleneck`. Over seeds 0-99 the ratio is 0.784 min,
    0.896 median and mean; 2 seeds stay below 0.8 (51: 0.784, 56: 0.794), where weak blocks that
    joining left in several places can only be lifted by several nodes moving at once (a node moving
    alone would open a deeper hole where it leaves). Joining alone reaches 0.83 on average.
    B: re-covering took 1 round on every one of seeds 0-99.
    """
    rng = random.Random(seed)
    nodes = make_nodes(rng, 12, (6, 12))
    swarm = join_one_by_one(nodes, NUM_BLOCKS, rng)
    joined = block_stats(swarm.values(), NUM_BLOCKS).bottleneck
    rounds = rebalance(swarm, nodes, NUM_BLOCKS, rng, max_rounds=10)
    stats = block_stats(swarm.values(), NUM_BLOCKS)
    bound = bottleneck_upper_bound([(n.throughput, n.span_len) for n in nodes], NUM_BLOCKS)
    assert rounds < 10
    assert stats.uncovered == 0
    assert two_cover_is_feasible(nodes, NUM_BLOCKS) and stats.under_replicated == 0
    best = exact_best_bottleneck(nodes, NUM_BLOCKS, MIN_REPLICAS)
    assert best is not None  # the policy's own placement has 2+ servers on every block
    print(
        f"\nA seed={seed}: bottleneck after joins {joined:.2f}, after {rounds} rebalancing rounds "
        f"{stats.bottleneck:.2f}; exact optimum {best:.2f}, LP bound {bound:.2f}; "
        f"ratio to the optimum {stats.bottleneck / best:.3f}, to the LP bound {stats.bottleneck / bound:.3f}"
    )
    assert stats.bottleneck >= joined
    assert stats.bottleneck >= 0.8 * best

    # B: the 4 nodes whose loss leaves the most blocks bare leave; the other 8 re-cover every block
    # using plan_move alone, then rebalance until quiet.
    leaving = worst_leavers(swarm, NUM_BLOCKS, 4)
    stayers = [n for n in nodes if n.peer not in leaving]
    swarm = {peer: record for peer, record in swarm.items() if peer not in leaving}
    holes = block_stats(swarm.values(), NUM_BLOCKS).uncovered
    rounds_to_cover = 0
    while block_stats(swarm.values(), NUM_BLOCKS).uncovered and rounds_to_cover < RECOVER_ROUNDS:
        rebalance_round(swarm, stayers, NUM_BLOCKS, rng)
        rounds_to_cover += 1
    assert block_stats(swarm.values(), NUM_BLOCKS).uncovered == 0
    more_rounds = rebalance(swarm, stayers, NUM_BLOCKS, rng, max_rounds=10)
    stats = block_stats(swarm.values(), NUM_BLOCKS)
    bound = bottleneck_upper_bound([(n.throughput, n.span_len) for n in stayers], NUM_BLOCKS)
    print(
        f"B seed={seed}: {holes} blocks bare after 4 left, all covered after {rounds_to_cover} rounds; "
        f"quiet after {more_rounds} more: {stats.under_replicated} blocks with < 2 servers, "
        f"bottleneck {stats.bottleneck:.2f}, LP bound {bound:.2f}, ratio {stats.bottleneck / bound:.3f}"
    )
    assert stats.uncovered == 0 and more_rounds < 10


def worst_leavers(swarm: dict[str, ServerRecord], num_blocks: int, count: int) -> set[str]:
    """The `count` peers whose departure leaves the most blocks bare (the first such set: deterministic)."""

    def bare_without(gone: Iterable[str]) -> int:
        return block_stats([r for p, r in swarm.items() if p not in set(gone)], num_blocks).uncovered

    return set(max(itertools.combinations(sorted(swarm), count), key=bare_without))


def all_placements(nodes: Sequence[Node], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block totals and replica counts (one row each) of EVERY combination of the nodes' starts."""
    totals = np.zeros((1, num_blocks))
    replicas = np.zeros((1, num_blocks), dtype=np.int64)
    for n in nodes:  # extend every partial placement by every start of the next node
        cover = np.array(
            [[s <= b < s + n.span_len for b in range(num_blocks)] for s in range(num_blocks - n.span_len + 1)]
        )
        totals = (totals[:, None, :] + n.throughput * cover[None]).reshape(-1, num_blocks)
        replicas = (replicas[:, None, :] + cover[None]).reshape(-1, num_blocks)
    return totals, replicas


def exact_optimum(nodes: list[Node], num_blocks: int) -> tuple[int, int, float]:
    """Best (uncovered, under-replicated, bottleneck) over ALL start combinations, judged as choose_span
    judges (fewest uncovered, then fewest under-replicated, then highest bottleneck)."""
    totals, replicas = all_placements(nodes, num_blocks)
    uncovered = (replicas == 0).sum(axis=1)
    under = (replicas < 2).sum(axis=1)
    best = np.lexsort((-totals.min(axis=1), under, uncovered))[0]
    return int(uncovered[best]), int(under[best]), float(totals[best].min())


def exact_best_bottleneck(nodes: Sequence[Node], num_blocks: int, min_replicas: int) -> float | None:
    """The best bottleneck of any placement of `nodes` with >= `min_replicas` servers on every block
    (None if there is none), by a mixed-integer program solved with HiGHS.

    Binary x[i, s]: node i starts at block s; every node starts once; T (continuous) <= every block's
    total; maximise T. The fastest node is kept in the model's left half: a placement and its mirror
    image are equally good, so this only rules one of each pair out. What is returned is the solver's
    bound on the optimum: the optimum itself (to HiGHS's 1e-4 relative gap) when the search ends, and
    above it when the 20 s limit cuts the search short, so a ratio to it never flatters the policy.
    """
    starts = [(i, s) for i, n in enumerate(nodes) for s in range(num_blocks - n.span_len + 1)]
    t = len(starts)  # column of T, after the x columns
    once = np.zeros((len(nodes), t + 1))
    cover = np.zeros((num_blocks, t + 1))
    mirror = np.zeros(t + 1)
    fastest = max(range(len(nodes)), key=lambda i: nodes[i].throughput)
    for col, (i, s) in enumerate(starts):
        once[i, col] = 1
        cover[s : s + nodes[i].span_len, col] = 1
        if i == fastest:  # start <= its mirror image's start, num_blocks - span_len - start
            mirror[col] = 2 * s + nodes[i].span_len - num_blocks
    load = cover * np.array([nodes[i].throughput for i, _ in starts] + [0.0])
    load[:, t] = -1.0
    objective = np.zeros(t + 1)
    objective[t] = -1.0  # milp minimises
    integrality = np.ones(t + 1)
    integrality[t] = 0
    upper = np.ones(t + 1)
    upper[t] = np.inf
    result = milp(
        objective,
        integrality=integrality,
        bounds=Bounds(0.0, upper),
        constraints=[
            LinearConstraint(once, 1.0, 1.0),
            LinearConstraint(load, 0.0, np.inf),
            LinearConstraint(cover, min_replicas, np.inf),
            LinearConstraint(mirror[None], -np.inf, 0.0),
        ],
        options={"time_limit": 20},
    )
    if result.status == 2:  # infeasible
        return None
    assert result.status in (0, 1) and result.mip_dual_bound is not None, result.message  # 1: time limit
    return float(-result.mip_dual_bound)


@pytest.mark.parametrize("seed", range(4))
def test_exact_best_bottleneck_matches_brute_force(seed: int) -> None:
    """The MILP against enumerating every placement: 5 nodes (spans of 4-8 blocks) on 10 blocks."""
    nodes = make_nodes(random.Random(seed), 5, (4, 8))
    totals, replicas = all_placements(nodes, 10)
    for min_replicas in range(4):
        feasible = (replicas >= min_replicas).all(axis=1)
        expected = float(totals[feasible].min(axis=1).max()) if feasible.any() else None
        got = exact_best_bottleneck(nodes, 10, min_replicas)
        assert (got is None) == (expected is None), (min_replicas, got, expected)
        if got is not None:
            assert got == pytest.approx(expected, rel=1e-3)


def test_small_swarm_against_the_exact_optimum() -> None:
    """5 nodes (spans of 4-8 blocks) on a 10-block model, 20 seeds, vs brute force over all placements.

    Greedy joins plus single-node moves reach the optimal coverage counts, and a bottleneck of about
    0.93 of the optimum on average; a few seeds stop lower, at a local optimum that only several nodes
    moving together could leave, so the 80% is asserted on the median and a floor on the worst seed.
    """
    ratios = []
    for seed in range(20):
        rng = random.Random(seed)
        nodes = make_nodes(rng, 5, (4, 8))
        swarm = join_one_by_one(nodes, 10, rng)
        rebalance(swarm, nodes, 10, rng, max_rounds=10)
        stats = block_stats(swarm.values(), 10)
        uncovered, under, best = exact_optimum(nodes, 10)
        assert (stats.uncovered, stats.under_replicated) == (uncovered, under)
        ratios.append(stats.bottleneck / best)
    print(
        f"\nsmall: bottleneck / exact optimum: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}"
    )
    assert statistics.median(ratios) >= 0.8
    assert min(ratios) >= 0.5


# ------------------------------------------------------------------------------------- properties ---

spans = st.integers(0, 11).flatmap(lambda s: st.tuples(st.just(s), st.integers(s + 1, 14)))
records_strategy = st.lists(
    st.builds(
        lambda i, span, t, state: server(f"p{i}", span[0], span[1], t, state),
        st.integers(0, 6),
        spans,
        st.floats(0.0, 100.0),
        st.sampled_from(list(ServerState)),
    ),
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(records_strategy, st.integers(1, 12), st.data())
def test_choose_span_stays_in_range(
    records: list[ServerRecord], num_blocks: int, data: st.DataObject
) -> None:
    span_len = data.draw(st.integers(1, num_blocks))
    throughput = data.draw(st.floats(0.01, 100.0))
    start, end = choose_span(records, num_blocks, span_len, throughput, rng=random.Random(0))
    assert start >= 0 and end == start + span_len <= num_blocks


@settings(max_examples=200, deadline=None)
@given(records_strategy, st.integers(1, 12), st.data())
def test_plan_move_never_makes_coverage_worse_and_always_makes_progress(
    records: list[ServerRecord], num_blocks: int, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, num_blocks - 1))
    end = data.draw(st.integers(start + 1, num_blocks))
    throughput = data.draw(st.floats(0.01, 100.0))
    others = block_stats(records, num_blocks, exclude="me")
    new = plan_move(records, num_blocks, "me", (start, end), throughput, rng=random.Random(0))
    if new is None:
        return
    before: BlockStats = others.with_span(start, end, throughput)
    after = others.with_span(*new, throughput)
    assert new[1] - new[0] == end - start
    assert after.uncovered <= before.uncovered
    assert (after.uncovered, after.under_replicated) <= (before.uncovered, before.under_replicated)
    # every move strictly raises (-uncovered, -under-replicated, bottleneck, -shortfall below 1.15 *
    # bottleneck), a function of the whole swarm: nodes taking turns cannot move in circles
    if (after.uncovered, after.under_replicated) == (before.uncovered, before.under_replicated):
        assert after.bottleneck >= before.bottleneck
        if after.bottleneck == before.bottleneck:
            level = 1.15 * before.bottleneck
            assert shortfall(after, level) < shortfall(before, level)


def shortfall(stats: BlockStats, level: float) -> float:
    return sum(level - t for t in stats.totals if t < level)
