"""Autograd through remote blocks: Forward RPCs on the way in, Backward RPCs on the way back.

`RemoteSpans` is one node of the client's autograd graph standing for every remote block.
Its forward keeps the input each hop received; its backward walks the hops in reverse and
asks a server of each span for d(loss)/d(input). Backward is stateless on the node (it
recomputes the span from the saved input), so when a hop's server fails, any other server
of the same span can answer the retry.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.remote import ChannelPool, remote_backward, remote_forward
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop, span_throughput
from swarm.coordinator.swarm_map import SwarmMapCache

log = logging.getLogger(__name__)


@dataclass
class RemotePipeline:
    """A route through the swarm; a hop whose server fails is moved to another server of its span."""

    pool: ChannelPool
    swarm_map: SwarmMapCache
    config: ClientConfig
    route: list[Hop]
    banned: set[str] = field(default_factory=set)  # failed during this pipeline's life
    bans: BanList | None = None  # the client's bans, shared with later routes

    async def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run `hidden` [batch, tokens, hidden] through every hop; also return each hop's input."""
        inputs: list[torch.Tensor] = []
        for i in range(len(self.route)):
            inputs.append(hidden)
            call = partial(remote_forward, self.pool, self.swarm_map.model, hidden=hidden, config=self.config)
            hidden = await self._with_retry(i, call)
        return hidden, inputs

    async def backward(self, inputs: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(pipeline input), given the hop inputs of `forward` and d(loss)/d(its output)."""
        for i in reversed(range(len(self.route))):
            call = partial(
                remote_backward,
                self.pool,
                self.swarm_map.model,
                hidden=inputs[i],
                grad_outputs=grad,
                config=self.config,
            )
            grad = await self._with_retry(i, call)
        return grad

    async def _with_retry(self, i: int, call: Callable[[Hop], Awaitable[torch.Tensor]]) -> torch.Tensor:
        async def attempt(n: int) -> torch.Tensor:
            if n > 1:
                await self._replace(i)
            return await call(self.route[i])

        return await self.config.retry.run(attempt)

    async def _replace(self, i: int) -> None:
        """Point hop i at another online server covering its span; keep it if there is none.

        Only the failed hop moves: the other hops' saved inputs stay valid for backward, since
        every server of a span holds the same weights.
        """
        hop = self.route[i]
        self.banned.add(hop.peer_id)
        avoid = set(self.banned)
        if self.bans is not None:
            self.bans.ban(hop.peer_id)
            avoid |= self.bans.banned()
        snapshot = await self.swarm_map.get(refresh=True)
        candidates = [
            s
            for s in snapshot.online()
            if s.start <= hop.start and hop.end <= s.end and s.peer_id not in avoid
        ]
        if candidates:  # drawn by throughput, as the route itself was (SWARM wiring)
            weights = [span_throughput(s) for s in candidates]
            if not sum(weights) > 0:  # underflowing announced figures: treat them as equal
                weights = [1.0] * len(candidates)
            self.route[i] = Hop(random.choices(candidates, weights)[0], hop.start, hop.end)
            log.warning(
                "peer %s failed; blocks %d:%d go to %s",
                hop.peer_id,
                hop.start,
                hop.end,
                self.route[i].peer_id,
            )


class RemoteSpans(torch.autograd.Function):
    """hidden [batch, tokens, hidden] -> the same after every remote block, differentiable."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, pipeline: RemotePipeline) -> torch.Tensor:
        # run_sync blocks this (caller or autograd) thread, never the client loop's own thread.
        output, inputs = run_sync(pipeline.forward(hidden.detach()))
        ctx.pipeline, ctx.hop_inputs = pipeline, inputs
        ctx.dtype, ctx.device = hidden.dtype, hidden.device
        return output.to(hidden)  # the node may compute in another dtype

    @staticmethod
    @once_differentiable  # the node returns numbers, not a graph: no double backward
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        pipeline: RemotePipeline = ctx.pipeline
        grad = run_sync(pipeline.backward(ctx.hop_inputs, grad_output.contiguous()))
        return grad.to(device=ctx.device, dtype=ctx.dtype), None


def run_remote_blocks(hidden: torch.Tensor, pipeline: RemotePipeline) -> torch.Tensor:
    """`RemoteSpans.apply`, typed: gradients reach `hidden` when it requires them."""
    output: torch.Tensor = RemoteSpans.apply(hidden, pipeline)
    return output
