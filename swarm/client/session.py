"""An inference session through a pipeline of remote spans, with failover.

The session keeps, per hop, every input it has sent. When a hop fails, its peer is
banned for the session, only that span is re-routed, and the stored inputs are replayed
to rebuild the KV cache on the replacement before the current step continues. The same
greedy prompt therefore gives the same tokens with or without a failure.
"""

from __future__ import annotations

import logging

import torch

from swarm.client.config import ClientConfig
from swarm.client.remote import ChannelPool, InferenceStream
from swarm.coordinator.routing import Hop, min_latency_route
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.errors import SwarmError

log = logging.getLogger(__name__)


class InferenceSession:
    def __init__(
        self,
        pool: ChannelPool,
        swarm_map: SwarmMapCache,
        config: ClientConfig,
        *,
        batch_size: int,
        max_length: int,
    ) -> None:
        self.pool, self.swarm_map, self.config = pool, swarm_map, config
        self.batch_size, self.max_length = batch_size, max_length
        self.streams: list[InferenceStream] = []
        self.history: list[list[torch.Tensor]] = []  # inputs sent to each stream, in order
        self.banned: set[str] = set()
        self.position = 0

    async def open(self) -> None:
        snapshot = await self.swarm_map.get()
        self.streams = [
            self._stream(hop) for hop in min_latency_route(snapshot, banned=frozenset(self.banned))
        ]
        self.history = [[] for _ in self.streams]

    def _stream(self, hop: Hop) -> InferenceStream:
        return InferenceStream(
            self.pool, self.swarm_map.model, hop, self.config, self.batch_size, self.max_length
        )

    @property
    def route(self) -> list[str]:
        return [f"{s.hop.peer_id}[{s.hop.start}:{s.hop.end}]" for s in self.streams]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run new hidden states [batch, new_tokens, hidden] through every block of the model."""
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(
                f"inference session max_length {self.max_length} exceeded: holds {self.position}, "
                f"step adds {hidden.shape[1]}"
            )
        new_tokens = hidden.shape[1]
        i = 0
        while i < len(self.streams):
            x = hidden

            async def attempt(n: int, i: int = i, x: torch.Tensor = x) -> torch.Tensor:
                if n > 1:
                    await self._reroute(i)
                return await self.streams[i].step(x)

            hidden = await self.config.retry.run(attempt)
            self.history[i].append(x)
            i += 1
        self.position += new_tokens
        return hidden

    async def _reroute(self, i: int) -> None:
        """Replace stream i (whose peer just failed) by a fresh route over the same span."""
        failed = self.streams[i]
        self.banned.add(failed.hop.peer_id)
        await failed.close()
        snapshot = await self.swarm_map.get(refresh=True)
        hops = min_latency_route(snapshot, failed.hop.start, failed.hop.end, banned=frozenset(self.banned))
        log.warning(
            "peer %s failed; re-routing blocks %d:%d via %s",
            failed.hop.peer_id,
            failed.hop.start,
            failed.hop.end,
            [h.peer_id for h in hops],
        )
        replacements = [self._stream(hop) for hop in hops]
        histories: list[list[torch.Tensor]] = []
        past = torch.cat(self.history[i], dim=1) if self.history[i] else None
        for stream in replacements:
            histories.append([past] if past is not None else [])
            if past is not None:
                try:
                    past = await stream.step(past)
                except SwarmError:
                    self.banned.add(stream.hop.peer_id)
                    for s in replacements:
                        await s.close()
                    raise
        self.streams[i : i + 1] = replacements
        self.history[i : i + 1] = histories

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()
        self.streams, self.history = [], []
