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
from typing import Any, TypeVar

import torch
from torch.autograd.function import once_differentiable

from swarm import wire
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.lora import RemoteLora
from swarm.client.remote import (
    BackwardReply,
    ChannelPool,
    Tuning,
    backward_request,
    call_backward,
    call_forward,
    forward_request,
)
from swarm.client.verify import SpotChecker
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop, span_throughput
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.records import ServerRecord

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RemotePipeline:
    """A route through the swarm; a hop whose server fails is moved to another server of its span."""

    pool: ChannelPool
    swarm_map: SwarmMapCache
    config: ClientConfig
    route: list[Hop]
    banned: set[str] = field(default_factory=set)  # failed during this pipeline's life
    bans: BanList | None = None  # the client's bans, shared with later routes
    adapter: RemoteLora | None = None  # the client's LoRA, applied on every hop
    # Which servers may replace a failed hop (the trainer takes training peers only); None: any.
    eligible: Callable[[ServerRecord], bool] | None = None
    # Training: every hop computes with its stage's weights of at least this epoch (see RequestHeader).
    min_epoch: int = 0
    # Training: the optimizer step the micro-batch belongs to, on every Backward (RequestHeader.step).
    step: int | None = None
    # Spot checks: re-runs a sample of the hops on other servers (None: no checks).
    checker: SpotChecker | None = None

    def tunings(self, prompts: torch.Tensor | None = None) -> list[Tuning]:
        """Each hop's share of the adapter and of deep prompts [num_blocks, batch or 1, prefix, hidden].

        Fixed before the forward pass, so backward sees the very adapter the forward pass used.
        """
        adapter = self.adapter
        return [
            Tuning(
                adapter.payload(hop.start, hop.end) if adapter is not None else None,
                prompts[hop.start : hop.end].detach() if prompts is not None else None,
            )
            for hop in self.route
        ]

    async def forward(
        self, hidden: torch.Tensor, tunings: list[Tuning] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run `hidden` [batch, tokens, hidden] through every hop; also return each hop's input."""
        tunings = tunings if tunings is not None else self.tunings()
        inputs: list[torch.Tensor] = []
        for i in range(len(self.route)):
            inputs.append(hidden)
            hidden = await self._with_retry(i, partial(self._forward_hop, hidden=hidden, tuning=tunings[i]))
        return hidden, inputs

    async def backward(
        self, inputs: list[torch.Tensor], grad: torch.Tensor, tunings: list[Tuning] | None = None
    ) -> BackwardReply:
        """d(loss)/d(pipeline input), given the hop inputs of `forward` and d(loss)/d(its output);
        with tunings, also the gradients of the prompts (all blocks) and of the adapter tensors."""
        tunings = tunings if tunings is not None else self.tunings()
        grad_prompts: list[torch.Tensor] = []
        adapter_grads: dict[str, torch.Tensor] = {}
        for i in reversed(range(len(self.route))):
            call = partial(self._backward_hop, hidden=inputs[i], grad=grad, tuning=tunings[i])
            reply = await self._with_retry(i, call)
            grad = reply.grad_inputs
            if reply.grad_prompts is not None:
                grad_prompts.insert(0, reply.grad_prompts)
            adapter_grads.update(reply.adapter_grads)
        prompts = torch.cat(grad_prompts) if grad_prompts else None
        return BackwardReply(grad, prompts, adapter_grads)

    async def _forward_hop(self, hop: Hop, *, hidden: torch.Tensor, tuning: Tuning) -> torch.Tensor:
        model, config = self.swarm_map.model, self.config
        request = forward_request(model, hop, hidden, config, tuning, self.min_epoch)
        response = await call_forward(self.pool, model, hop, request, config, tuning.adapter)
        if self.checker is not None and self.checker.sample(hop.peer_id):
            return await self.checker.check_forward(
                model, hop, request, response, tuning.adapter, config.codec
            )
        return wire.decode_tensor(response.hidden_states)

    async def _backward_hop(
        self, hop: Hop, *, hidden: torch.Tensor, grad: torch.Tensor, tuning: Tuning
    ) -> BackwardReply:
        model, config = self.swarm_map.model, self.config
        request = backward_request(model, hop, hidden, grad, config, tuning, self.min_epoch, self.step)
        reply = await call_backward(self.pool, model, hop, request, config, tuning)
        if self.checker is not None and self.checker.sample(hop.peer_id):
            return await self.checker.check_backward(model, hop, request, reply, tuning, config.codec)
        return reply

    async def _with_retry(self, i: int, call: Callable[[Hop], Awaitable[T]]) -> T:
        async def attempt(n: int) -> T:
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
            if self.eligible is None or self.eligible(s)
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
    """hidden [batch, tokens, hidden] -> the same after every remote block, differentiable in
    hidden, in the deep prompts and in the pipeline's adapter parameters."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        pipeline: RemotePipeline,
        prompts: torch.Tensor | None,
        *adapter_params: torch.Tensor,
    ) -> torch.Tensor:
        tunings = pipeline.tunings(prompts)
        # run_sync blocks this (caller or autograd) thread, never the client loop's own thread.
        output, inputs = run_sync(pipeline.forward(hidden.detach(), tunings))
        ctx.pipeline, ctx.hop_inputs, ctx.tunings = pipeline, inputs, tunings
        ctx.dtype, ctx.device = hidden.dtype, hidden.device
        ctx.prompts_like = prompts.detach() if prompts is not None else None
        ctx.params = adapter_params
        return output.to(hidden)  # the node may compute in another dtype

    @staticmethod
    @once_differentiable  # the node returns numbers, not a graph: no double backward
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pipeline: RemotePipeline = ctx.pipeline
        reply = run_sync(pipeline.backward(ctx.hop_inputs, grad_output.contiguous(), ctx.tunings))
        grad_prompts = None
        if ctx.prompts_like is not None and reply.grad_prompts is not None:
            grad_prompts = reply.grad_prompts.to(ctx.prompts_like)
        grads = pipeline.adapter.accumulate(reply.adapter_grads) if pipeline.adapter is not None else []
        param_grads = [g.to(p) if g is not None else None for g, p in zip(grads, ctx.params, strict=True)]
        grad_inputs = reply.grad_inputs.to(device=ctx.device, dtype=ctx.dtype)
        return (grad_inputs, None, grad_prompts, *param_grads)


def run_remote_blocks(
    hidden: torch.Tensor, pipeline: RemotePipeline, prompts: torch.Tensor | None = None
) -> torch.Tensor:
    """`RemoteSpans.apply`, typed: gradients reach `hidden`, the deep `prompts`
    [num_blocks, batch or 1, prefix, hidden] and the pipeline's adapter when they require them."""
    # parameters() runs in registration order, which is adapter.names order, as accumulate() returns
    params = list(pipeline.adapter.parameters()) if pipeline.adapter is not None else []
    output: torch.Tensor = RemoteSpans.apply(hidden, pipeline, prompts, *params)
    return output
