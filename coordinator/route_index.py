"""What routing needs of a swarm-map snapshot, as arrays: built once per snapshot, read by every route.

A snapshot of an internet-scale swarm holds ~10,000 servers. Walking their pydantic records
for every route (and every boundary of every route) cost ~200 ms; routing reads only a
handful of numbers per server, so those are laid out here once, as numpy arrays indexed by
the server's position in peer-id order, together with the servers covering each block.
Routes then touch only the servers of the blocks they cross, in vectorized steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from swarm.records import ServerRecord, ServerState

# Cost assumed for a server whose throughput or RTT has not been measured yet.
DEFAULT_BLOCK_THROUGHPUT = 100.0  # tokens/s through one block
DEFAULT_RTT = 0.02  # seconds
# Per-block seconds are capped here: a server announcing ~0 tokens/s would make them infinite, and
# 0 x inf is NaN in the routing arithmetic. Such a server is still chosen only when nothing else is.
MAX_SECONDS_PER_BLOCK = 1e9

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


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


@dataclass(frozen=True, eq=False)
class RouteIndex:
    """The ONLINE servers of a snapshot, sorted by peer id (position = tie-break rank), as arrays."""

    servers: tuple[ServerRecord, ...]
    peer_ids: tuple[str, ...]
    position: Mapping[str, int]  # peer id -> index into the arrays
    start: Ints
    end: Ints
    seconds_per_block: Floats
    span_throughput: Floats
    free_cache: Ints
    covering: tuple[Ints, ...]  # per block: indices of the servers serving it, ascending
    covering_before: tuple[Floats, ...]  # per block b: b x p of those servers (p: seconds_per_block)
    covering_through: tuple[Floats, ...]  # per block b: (b + 1) x p, the same through block b

    @classmethod
    def build(cls, servers: Sequence[ServerRecord], num_blocks: int) -> RouteIndex:
        online = sorted((s for s in servers if s.state == ServerState.ONLINE), key=lambda s: s.peer_id)
        start = np.array([s.start for s in online], dtype=np.int64)
        end = np.array([s.end for s in online], dtype=np.int64)
        blocks = np.arange(num_blocks)[:, None]  # [blocks, 1] against [servers]: one pass per block
        cover = (start[None, :] <= blocks) & (blocks < end[None, :])
        covering = tuple(np.flatnonzero(cover[b]) for b in range(num_blocks))
        per_block = np.array([seconds_per_block(s) for s in online], dtype=np.float64)
        per_block = per_block.clip(None, MAX_SECONDS_PER_BLOCK)
        return cls(
            servers=tuple(online),
            peer_ids=tuple(s.peer_id for s in online),
            position={s.peer_id: i for i, s in enumerate(online)},
            start=start,
            end=end,
            seconds_per_block=per_block,
            span_throughput=np.array([span_throughput(s) for s in online], dtype=np.float64),
            free_cache=np.array([s.free_cache_tokens for s in online], dtype=np.int64),
            covering=covering,
            covering_before=tuple(b * per_block[c] for b, c in enumerate(covering)),
            covering_through=tuple((b + 1) * per_block[c] for b, c in enumerate(covering)),
        )

    def usable(self, banned: frozenset[str] = frozenset(), cache_tokens: int = 0) -> Mask | None:
        """Mask of servers a route may use (None: all of them), without banned peers and, if
        `cache_tokens` > 0, without servers that cannot hold that much KV cache."""
        mask = self.free_cache >= cache_tokens if cache_tokens > 0 else None
        hits = [i for peer in banned if (i := self.position.get(peer)) is not None]
        if hits:
            mask = np.ones(len(self.servers), dtype=np.bool_) if mask is None else mask.copy()
            mask[hits] = False
        return mask

    def per_peer(self, values: Mapping[str, float], default: float) -> Floats:
        """`values` by peer id as an array in index order; `default` for peers it does not name."""
        if len(values) * 4 > len(self.peer_ids):  # most peers named (a session's RTTs): one pass
            return np.array([values.get(p, default) for p in self.peer_ids], dtype=np.float64)
        out = np.full(len(self.peer_ids), default, dtype=np.float64)
        for peer, value in values.items():
            if (i := self.position.get(peer)) is not None:
                out[i] = value
        return out

    def candidates(self, block: int, usable: Mask | None) -> Ints:
        """Indices of the usable servers covering `block`, ascending (peer-id order)."""
        covering = self.covering[block]
        return covering if usable is None else covering[usable[covering]]

    def missing_blocks(self, start: int, end: int, usable: Mask | None) -> list[int]:
        """Blocks of [start, end) that no usable server covers."""
        starts, ends = (self.start, self.end) if usable is None else (self.start[usable], self.end[usable])
        blocks = len(self.covering)  # a record reaching past the model's last block counts up to it
        # +1 where a server's span starts, -1 where it ends: the running sum counts servers per block
        served = np.bincount(starts.clip(None, blocks), minlength=blocks + 1)
        served -= np.bincount(ends.clip(None, blocks), minlength=blocks + 1)
        covered = np.cumsum(served)[start:end] > 0
        return [start + int(b) for b in np.flatnonzero(~covered)]
