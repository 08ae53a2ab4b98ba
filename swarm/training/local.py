"""The one-process reference: the swarm's training, done in one process.

Same model and initial weights (the client parts and block i drawn as the nodes and the trainer
draw them), same data order, same optimizer settings and schedule, same micro-batches and the
same number of samples per optimizer step. What a SWARM run must match (bench/convergence.py,
the demo's summary and the parity test compare against it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from swarm import wire
from swarm.models.llama import ClientParts, LlamaBlock
from swarm.training.data import ByteDataset
from swarm.training.stages import read_config, stage_span, warmup_factor

if TYPE_CHECKING:  # imported where used: the trainer pulls in the client and gRPC
    from swarm.training.trainer import TrainerConfig


@dataclass
class LocalRun:
    """Per micro-batch (seconds, samples, loss), and held-out losses (samples, loss)."""

    losses: list[tuple[float, int, float]] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    def recent_loss(self, n: int = 20) -> float:
        tail = [loss for _, _, loss in self.losses[-n:]]
        return sum(tail) / len(tail) if tail else math.nan


class _WireRounding(torch.autograd.Function):
    """Identity, except that the tensor and its gradient come out rounded as `codec` sends them."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, codec: str) -> torch.Tensor:
        ctx.codec = codec  # type: ignore[attr-defined]
        return _round_trip(x, codec)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _round_trip(grad, ctx.codec), None  # type: ignore[attr-defined]


def _round_trip(x: torch.Tensor, codec: str) -> torch.Tensor:
    return wire.decode_tensor(wire.encode_tensor(x.detach(), codec)).to(x.dtype)


class WireBlock(torch.nn.Module):
    """A block whose input (and, for the last block, output) crosses the wire in `codec`, forward
    and backward, as in the swarm, where the trainer sends each stage its input and its output's
    gradient and gets back its output and its input's gradient."""

    def __init__(self, block: LlamaBlock, codec: str, before: bool, after: bool) -> None:
        super().__init__()
        self.block, self.codec, self.before, self.after = block, codec, before, after

    def forward(self, x: torch.Tensor, start: int, cache: None) -> torch.Tensor:
        if self.before:
            x = _WireRounding.apply(x, self.codec)
        x = self.block(x, start, cache)
        return _WireRounding.apply(x, self.codec) if self.after else x


def wire_blocks(blocks: list[LlamaBlock], codec: str, num_stages: int) -> list[torch.nn.Module]:
    """`blocks` with the swarm's wire rounding at the edges of each of `num_stages` stages."""
    starts = {stage_span(len(blocks), num_stages, s)[0] for s in range(num_stages)}
    return [WireBlock(b, codec, i in starts, i == len(blocks) - 1) for i, b in enumerate(blocks)]


def next_byte_loss(
    parts: ClientParts, blocks: Sequence[LlamaBlock | torch.nn.Module], tokens: torch.Tensor
) -> torch.Tensor:
    """Mean next-byte cross-entropy of `tokens` [batch, seq_len] through the whole model."""
    hidden = parts.embed(tokens[:, :-1])
    for block in blocks:
        hidden = block(hidden, 0, None)
    logits = parts.logits(hidden)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def held_out_loss(
    parts: ClientParts, blocks: list[LlamaBlock], data: ByteDataset, sequences: int = 256
) -> float:
    """Mean loss over the first `sequences` held-out sequences (in batches of 16)."""
    batch = data.validation_batch(sequences)
    if len(batch) == 0:
        return math.nan
    with torch.no_grad():
        losses = [float(next_byte_loss(parts, blocks, chunk)) * len(chunk) for chunk in batch.split(16)]
    return sum(losses) / len(batch)


def train_locally(
    cfg: TrainerConfig,
    *,
    trainers: int = 1,
    evaluate_every: int = 0,
    wire_codec: str = "none",
    num_stages: int = 2,
    reverse_sums: bool = False,
    on_step: Callable[[int, LocalRun], None] = lambda step, run: None,
) -> LocalRun:
    """Train `cfg` in this process: steps x target_batch_size samples, in
    micro-batches of micro_batch_size taken in the trainer's data order (batch index i = the i-th
    micro-batch), one AdamW step per target batch on the mean of its micro-batches' gradients.

    With `trainers` = n > 1, the data order of n trainers with `--shard k n`: each step takes
    each shard's next micro-batches, as many as that trainer's share of the step (the step's
    micro-batches split evenly, the first shards taking the remainder). Several trainers see
    other sequences than one does, so this is their reference.

    `wire_codec` other than "none" rounds the hidden states and their gradients where a swarm of
    `num_stages` stages sends them (bench/codec_parity.py): what the codec alone does to learning.
    Held-out losses are computed without rounding.

    `reverse_sums` runs each step's micro-batches in reverse order: the same gradients summed in
    another order, so only float rounding differs. Against an unchanged run it sizes how far
    rounding alone moves the loss (bench/convergence.py's `local_reversed`)."""
    from swarm.node.training import stage_blocks  # the nodes' initial weights, block by block
    from swarm.training.trainer import initial_parts

    if trainers < 1:
        raise ValueError(f"trainers must be >= 1, got {trainers}")
    config = read_config(cfg.model)
    parts = initial_parts(cfg.model, config, cfg.seed)
    blocks = stage_blocks(cfg.model, config, (0, config.num_hidden_layers), cfg.seed)
    shards = [
        ByteDataset(replace(cfg.data, seed=cfg.seed, shard=(k, trainers) if trainers > 1 else cfg.data.shard))
        for k in range(trainers)
    ]
    params = list(parts.parameters()) + [p for b in blocks for p in b.parameters()]
    trained = blocks if wire_codec == "none" else wire_blocks(blocks, wire_codec, num_stages)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: warmup_factor(cfg.warmup_steps, e))
    per_step = math.ceil(cfg.target_batch_size / cfg.micro_batch_size)  # as the trainer counts
    base, extra = divmod(per_step, trainers)
    order = [k for k in range(trainers) for _ in range(base + (k < extra))]  # shard of each micro-batch
    run = LocalRun()
    began = time.monotonic()
    index = [0] * trainers
    for step in range(cfg.steps):
        todo = []  # (shard, its batch index) of this step's micro-batches
        for k in order:
            todo.append((k, index[k]))
            index[k] += 1
        if reverse_sums:
            todo.reverse()
        before = sum(index) - len(todo)  # micro-batches of earlier steps
        for done, (k, i) in enumerate(todo, 1):
            tokens = shards[k].batch(i, cfg.micro_batch_size)
            loss = next_byte_loss(parts, trained, tokens)
            (loss / per_step).backward()
            samples = (before + done) * cfg.micro_batch_size
            run.losses.append((time.monotonic() - began, samples, float(loss.detach())))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if evaluate_every and (step + 1) % evaluate_every == 0:
            run.held_out.append((sum(index) * cfg.micro_batch_size, held_out_loss(parts, blocks, shards[0])))
        on_step(step + 1, run)
    run.seconds = time.monotonic() - began
    return run
