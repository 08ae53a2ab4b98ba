"""Which contiguous span of blocks a node serves, and when it should move: pure functions.

Everything here works on a snapshot (a sequence of `ServerRecord`) and does no I/O, so the policy is
unit-tested and simulated without a network. Randomness comes only from a caller's `random.Random`.

The state of a swarm is judged, most important first, by
  1. the number of uncovered blocks (a pipeline needs every block),
  2. the number of blocks with fewer than two servers ("redundancy first": one failure there breaks
     every pipeline, and a big server holding every block must not hide that each block has one server),
  3. the bottleneck: the least total throughput of any block, which bounds the swarm's throughput,
  4. the number of coverage boundaries (places where the replica count changes): a span that abuts
     others or the model's ends leaves no sliver that a later node could only fill by wasting most of
     its span (in the 24-block simulation of tests/test_selection.py this raised the bottleneck reached
     by joining alone from ~0.70 to ~0.75 of the upper bound),
  5. the blocks' totals, weakest first (leximin): among spans that cannot lift the bottleneck, prefer
     the one that strengthens the weakest blocks, so that load spreads and a later node can lift it.

Snapshot rules:
  * only JOINING and ONLINE servers count (a joining node has already picked its span);
  * a peer_id seen several times counts once, as its LAST record in the sequence (so a later OFFLINE
    record supersedes an earlier ONLINE one);
  * spans are clipped to [0, num_blocks): blocks a record claims beyond the model are ignored.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from swarm.errors import ConfigError
from swarm.records import ServerRecord, ServerState

__all__ = [
    "MIN_REPLICAS",
    "BlockStats",
    "block_stats",
    "bottleneck_upper_bound",
    "choose_span",
    "counted_servers",
    "plan_move",
]

MIN_REPLICAS = 2  # servers per block below which a block counts as under-replicated
_COUNTED_STATES = frozenset({ServerState.JOINING, ServerState.ONLINE})

Quality = tuple[int, int, float, int, tuple[float, ...]]  # larger is better; see the module docstring


@dataclass(frozen=True)
class BlockStats:
    """Per block: total throughput (tokens/s) and number of servers covering it."""

    totals: tuple[float, ...]
    replicas: tuple[int, ...]

    @property
    def bottleneck(self) -> float:
        """Least per-block total: what a pipeline through the whole model can get (0 if a block is bare)."""
        return min(self.totals, default=0.0)

    @property
    def uncovered(self) -> int:
        return sum(1 for r in self.replicas if r == 0)

    @property
    def under_replicated(self) -> int:
        return sum(1 for r in self.replicas if r < MIN_REPLICAS)

    def with_span(self, start: int, end: int, throughput: float) -> BlockStats:
        """These stats plus one more server on [start, end)."""
        totals = list(self.totals)
        replicas = list(self.replicas)
        for b in range(max(start, 0), min(end, len(totals))):
            totals[b] += throughput
            replicas[b] += 1
        return BlockStats(tuple(totals), tuple(replicas))

    @property
    def boundaries(self) -> int:
        """How many times the replica count changes between neighbouring blocks (fragmentation)."""
        return sum(1 for a, b in itertools.pairwise(self.replicas) if a != b)

    def quality(self) -> Quality:
        """Criteria 1-5 of the module docstring as one tuple: larger is better."""
        leximin = tuple(sorted(self.totals))
        return (-self.uncovered, -self.under_replicated, self.bottleneck, -self.boundaries, leximin)


def counted_servers(records: Iterable[ServerRecord], *, exclude: str | None = None) -> list[ServerRecord]:
    """The servers that count: last record per peer_id, JOINING/ONLINE only, `exclude` left out."""
    latest = {r.peer_id: r for r in records}  # dict keeps the last record seen per peer
    return [r for peer, r in latest.items() if peer != exclude and r.state in _COUNTED_STATES]


def block_stats(
    records: Iterable[ServerRecord], num_blocks: int, *, exclude: str | None = None
) -> BlockStats:
    """Per-block totals and replica counts of the counted servers (spans clipped to the model)."""
    _check_num_blocks(num_blocks)
    stats = BlockStats((0.0,) * num_blocks, (0,) * num_blocks)
    for r in counted_servers(records, exclude=exclude):
        stats = stats.with_span(r.start, r.end, r.throughput)
    return stats


def bottleneck_upper_bound(servers: Iterable[tuple[float, int]], num_blocks: int) -> float:
    """No placement of `servers` ((throughput, span_len) pairs) can give a bottleneck above this.

    Every block gets at most the sum of all throughputs, and the blocks share the total capacity
    sum(throughput * span_len): the bound is the smaller of the two (the LP relaxation's optimum when
    spans could be split freely).
    """
    _check_num_blocks(num_blocks)
    pairs = [(t, min(n, num_blocks)) for t, n in servers]
    return min(sum(t for t, _ in pairs), sum(t * n for t, n in pairs) / num_blocks)


def choose_span(
    records: Sequence[ServerRecord],
    num_blocks: int,
    span_len: int,
    my_throughput: float,
    *,
    exclude: str | None = None,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """The span [start, start + span_len) whose addition leaves the swarm in the best state.

    States are compared as the module docstring says. Exact ties go to `rng.choice`, or to the lowest
    start when `rng` is None (so an empty swarm gets (0, span_len)).
    """
    _check_span_len(num_blocks, span_len)
    _check_throughput(my_throughput)
    base = block_stats(records, num_blocks, exclude=exclude)
    scored = [
        (base.with_span(s, s + span_len, my_throughput).quality(), s)
        for s in range(num_blocks - span_len + 1)
    ]
    start = _best_start(scored, rng)
    return start, start + span_len


def plan_move(
    records: Sequence[ServerRecord],
    num_blocks: int,
    me: str,
    my_span: tuple[int, int],
    my_throughput: float,
    *,
    threshold: float = 0.15,
    rng: random.Random | None = None,
) -> tuple[int, int] | None:
    """The span `me` should move to (same length), or None to stay.

    `me`'s own records are ignored: it is placed at `my_span` with `my_throughput`. Of the spans worth
    moving to, the one that leaves the swarm in the best state (as `choose_span` judges) wins, ties as
    there. A span is worth moving to when, with `me` there instead,
      * fewer blocks are uncovered, or as many and fewer are under-replicated; or, both counts unchanged,
      * the bottleneck B rises above (1 + threshold) * B; or
      * B does not fall, no block joins the weak ones (those below (1 + threshold) * B), and their
        shortfall, the throughput they lack to reach (1 + threshold) * B, shrinks by more than
        `threshold` of itself. Such a move does not raise B by itself, but it is a large step towards
        the move that will: with only the bottleneck rule, weak blocks in several places (the usual
        result of nodes joining one by one) stop every single move, though nodes moving one after
        another could lift them all.
    The threshold keeps nodes from reloading weights for a marginal gain. Every move strictly raises
    (-uncovered, -under-replicated, B, -shortfall below (1 + threshold) * B), a function of the whole
    swarm's state, so nodes that take turns cannot move in circles.
    """
    start, end = my_span
    if not 0 <= start < end <= num_blocks:
        raise ConfigError(
            f"my_span [{start}, {end}) must satisfy 0 <= start < end <= num_blocks={num_blocks}"
        )
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"threshold must be a finite number >= 0, got {threshold}")
    _check_throughput(my_throughput)
    span_len = end - start
    others = block_stats(records, num_blocks, exclude=me)
    now = others.with_span(start, end, my_throughput)
    scored = []
    for s in range(num_blocks - span_len + 1):
        after = others.with_span(s, s + span_len, my_throughput)
        if s != start and _worth_moving(now, after, threshold):
            scored.append((after.quality(), s))
    if not scored:
        return None
    new_start = _best_start(scored, rng)
    return new_start, new_start + span_len


def _best_start(scored: Sequence[tuple[Quality, int]], rng: random.Random | None) -> int:
    """The start of best quality; exact ties go to `rng.choice`, or to the lowest start without one."""
    best = max(q for q, _ in scored)
    ties = [s for q, s in scored if q == best]
    return ties[0] if rng is None else rng.choice(ties)


def _worth_moving(now: BlockStats, after: BlockStats, threshold: float) -> bool:
    # Both counts include the blocks that moving away would leave bare or single, so an apparent gain
    # elsewhere that uncovers my current blocks is not taken for one.
    counts_now = (now.uncovered, now.under_replicated)
    counts_after = (after.uncovered, after.under_replicated)
    if counts_after != counts_now:
        return counts_after < counts_now
    if now.bottleneck == 0:
        return after.bottleneck > 0
    level = now.bottleneck * (1 + threshold)
    if after.bottleneck > level:
        return True
    if after.bottleneck < now.bottleneck:
        return False
    weak_now, short_now = _shortfall(now, level)
    weak_after, short_after = _shortfall(after, level)
    return weak_after <= weak_now and short_after < (1 - threshold) * short_now


def _shortfall(stats: BlockStats, level: float) -> tuple[int, float]:
    """How many blocks fall short of `level`, and by how much throughput in all."""
    gaps = [level - t for t in stats.totals if t < level]
    return len(gaps), sum(gaps)


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")


def _check_span_len(num_blocks: int, span_len: int) -> None:
    _check_num_blocks(num_blocks)
    if not 1 <= span_len <= num_blocks:
        raise ConfigError(f"span_len must be between 1 and num_blocks={num_blocks}, got {span_len}")


def _check_throughput(throughput: float) -> None:
    if not (math.isfinite(throughput) and throughput > 0):
        raise ConfigError(f"throughput must be a finite number > 0 tokens/s, got {throughput}")
