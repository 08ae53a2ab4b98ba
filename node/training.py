"""A training node (`swarm-node join --train`): one stage of a model, with trainable weights.

The stage's peers form one hivemind.Optimizer collaboration (run id "<model>-stage<K>"): each
Backward leaves its request's weight gradients for the optimizer, which steps all peers at
once when the swarm has accumulated `--target-batch-size` samples, averaging gradients (and
parameters) so the peers stay identical. A peer that joins a stage others already train loads
their state (weights, optimizer, epoch) before it serves.

Order matters: hivemind's averagers fork processes, so the optimizer is built before the gRPC
server starts (forking a process with live gRPC threads is unsafe).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from grpc_health.v1 import health_pb2
from hivemind.dht import DHT

import swarm
from swarm import checkpoint
from swarm.errors import ConfigError
from swarm.models.llama import LlamaBlock, LlamaConfig, init_weights
from swarm.node import device as devices
from swarm.node.announcer import Announcer
from swarm.node.backend import BlockBackend
from swarm.node.config import NodeConfig
from swarm.node.metrics import NodeMetrics
from swarm.node.reachability import announce_host
from swarm.node.runtime import stop_on_signals
from swarm.node.server import SERVICE_NAME, BlockServicer, ServerLimits, start_grpc_server
from swarm.records import NodeIdentity, ServerRecord, ServerState, fetch_records, latest_per_peer

log = logging.getLogger("swarm.node")


# ---- pure decisions -------------------------------------------------------------------------------


def stage_span(num_blocks: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Blocks [start, end) of `stage` when `num_blocks` are cut into `num_stages` near-equal stages."""
    if not 1 <= num_stages <= num_blocks:
        raise ConfigError(f"--num-stages must be in 1..{num_blocks} (the model's blocks), got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ConfigError(f"--stage must be in 0..{num_stages - 1}, got {stage}")
    bounds = [round(i * num_blocks / num_stages) for i in range(num_stages + 1)]
    return bounds[stage], bounds[stage + 1]


def choose_stage(records: Iterable[ServerRecord], num_stages: int) -> int:
    """The stage with the least total throughput among online training peers (ties: the lowest)."""
    totals = [0.0] * num_stages
    peers = [0] * num_stages
    for r in records:
        if r.state == ServerState.ONLINE and r.trainable_stage is not None and r.trainable_stage < num_stages:
            totals[r.trainable_stage] += r.throughput
            peers[r.trainable_stage] += 1
    return min(range(num_stages), key=lambda k: (totals[k], peers[k], k))


def run_id(model: str, stage: int) -> str:
    """The stage's hivemind run id: "<model>-stage<K>", the model name reduced to [A-Za-z0-9_-]
    (hivemind uses it as a DHT key prefix, which must not contain '.')."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', model)}-stage{stage}"


# ---- weights -----------------------------------------------------------------------------------


def read_config(model: str) -> LlamaConfig:
    """The model's config: a config.json file, or a directory holding one (weights optional)."""
    path = Path(model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--train --model needs a config.json or a checkpoint directory, got {model}")
    try:
        return LlamaConfig.from_hf_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def has_weights(model: str) -> bool:
    path = Path(model)
    return path.is_dir() and any(path.glob("*.safetensors"))


def stage_blocks(model: str, config: LlamaConfig, span: tuple[int, int], seed: int) -> list[LlamaBlock]:
    """The stage's blocks in float32: from the checkpoint's weights, or initialised from `seed`
    (block i from seed + i + 1, so every peer and the exporter agree whatever the stages)."""
    if has_weights(model):
        ckpt = checkpoint.open_checkpoint(model)
        return checkpoint.load_blocks(ckpt, *span, dtype=torch.float32)
    blocks = []
    for i in range(*span):
        block = LlamaBlock(config)
        init_weights(block, seed + i + 1)
        blocks.append(block)
    return blocks


# ---- the optimizer -----------------------------------------------------------------------------


class StageOptimizer:
    """hivemind.Optimizer for one stage, fed one Backward request at a time (on the compute thread)."""

    def __init__(self, dht: DHT, run_id: str, params: list[torch.nn.Parameter], cfg: NodeConfig) -> None:
        from hivemind import Optimizer

        warmup = max(1, cfg.warmup_steps)
        self.opt = Optimizer(
            dht=dht,
            run_id=run_id,
            params=params,
            optimizer=partial(torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=partial(_warmup, warmup)),
            target_batch_size=cfg.target_batch_size,
            matchmaking_time=cfg.matchmaking_time,
            averaging_timeout=cfg.averaging_timeout,
            load_state_timeout=cfg.averaging_timeout * 3,
            # Average parameters and Adam's moments in every step, in the step: peers that stepped
            # alone (before they found each other) become identical again at the next one.
            average_state_every=1,
            delay_state_averaging=False,
            average_opt_statistics=("exp_avg", "exp_avg_sq"),
            averager_opts={"request_timeout": 0.5},
            verbose=False,
        )

    @property
    def epoch(self) -> int:
        return int(self.opt.local_epoch)

    def on_gradients(self, samples: int) -> None:
        """The weights' .grad hold one request's gradients (a mean over `samples` sequences)."""
        self.opt.step(batch_size=samples)
        self.opt.zero_grad()  # hivemind adds .grad into its own accumulators at every step

    def load_state_from_peers(self) -> None:
        self.opt.load_state_from_peers()

    def shutdown(self) -> None:
        self.opt.shutdown()


def _warmup(steps: int, epoch: int) -> float:
    return min(1.0, (epoch + 1) / steps)


# ---- the node's life -------------------------------------------------------------------------


async def serve_training(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> None:
    stop = stop_on_signals()
    config = read_config(cfg.model)
    model = checkpoint.model_name(cfg.model)
    device = devices.resolve_device(cfg.device)
    n = config.num_hidden_layers
    records = await fetch_records(dht, model, list(range(n)))
    peers = [
        r for r in latest_per_peer(x for rs in records.values() for x in rs) if r.peer_id != str(dht.peer_id)
    ]
    stage = choose_stage(peers, cfg.num_stages) if cfg.stage == "auto" else int(cfg.stage)
    span = stage_span(n, cfg.num_stages, stage)
    blocks = [b.to(device) for b in await asyncio.to_thread(stage_blocks, cfg.model, config, span, cfg.seed)]
    params = [p for b in blocks for p in b.parameters()]
    # On this thread: hivemind installs signal handlers, which only the main thread may do.
    optimizer = StageOptimizer(dht, run_id(model, stage), params, cfg)
    try:
        mates = [r for r in peers if r.trainable_stage == stage and r.state == ServerState.ONLINE]
        if mates:  # others train this stage already: start from where they are
            log.info("loading stage %d's state from %d peer(s)", stage, len(mates))
            await asyncio.to_thread(optimizer.load_state_from_peers)
        await _serve_stage(cfg, dht, identity, on_ready, stop, config, model, stage, span, blocks, optimizer)
    finally:
        await asyncio.to_thread(optimizer.shutdown)


async def _serve_stage(
    cfg: NodeConfig,
    dht: DHT,
    identity: NodeIdentity,
    on_ready: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    config: LlamaConfig,
    model: str,
    stage: int,
    span: tuple[int, int],
    blocks: list[LlamaBlock],
    optimizer: StageOptimizer,
) -> None:
    device = next(blocks[0].parameters()).device
    metrics = NodeMetrics()
    backend = BlockBackend(
        config,
        blocks,
        span[0],
        dtype=torch.float32,
        device=device,
        cache_bytes=cfg.cache_bytes or (64 << 20),
        batching=cfg.batching,
        batch_tokens=cfg.batch_tokens,
        on_gradients=optimizer.on_gradients,
    )
    limits = ServerLimits(
        cfg.max_batch, cfg.max_tokens, cfg.max_session_length, cfg.max_message_bytes, cfg.session_idle_timeout
    )
    servicer = BlockServicer(backend, model, str(dht.peer_id), limits, metrics=metrics)
    servicer.training_epoch = lambda: optimizer.epoch
    server, port, health = await start_grpc_server(servicer, cfg.host, cfg.port, cfg.max_message_bytes)
    address = f"{announce_host(cfg)}:{cfg.announce_port or port}"
    announcer = Announcer(dht, identity, cfg.announce_period)
    record = ServerRecord(
        state=ServerState.ONLINE,
        peer_id=str(dht.peer_id),
        grpc_address=address,
        model=model,
        start=span[0],
        end=span[1],
        throughput=cfg.throughput or 1.0,
        trainable_stage=stage,
        software_version=swarm.__version__,
    )
    background = None
    try:
        await announcer.publish(record, required=True)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        on_ready(
            {
                "peer_id": str(dht.peer_id),
                "grpc_address": address,
                "model": model,
                "span": f"{span[0]}:{span[1]}",
                "stage": stage,
                "epoch": optimizer.epoch,
                "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                "pid": os.getpid(),
            }
        )
        background = asyncio.create_task(announcer.run(stop))
        await stop.wait()
    finally:
        if background is not None:
            background.cancel()
        servicer.state = str(ServerState.DRAINING)
        await announcer.withdraw()
        await server.stop(grace=2)
        backend.shutdown()
