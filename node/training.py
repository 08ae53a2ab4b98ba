"""A training node (`swarm-node join --train`): one stage of a model, with trainable weights.

The stage's peers form one collaboration (run id "<model>-stage<K>", swarm.training.averaging):
each Backward hands its request's weight gradients to it, and all peers step at once, on the
same averaged gradient, when the stage has accumulated `--target-batch-size` samples, so the
peers stay identical. A peer that joins a stage others already train loads their state
(weights, AdamW moments, epoch) before it serves; the stage's averaging RPCs
(swarm.v1.AveragingService) share the node's gRPC server. With `--averaging diloco` each peer
steps on its own gradients and the peers average parameter deltas every `--outer-every` steps
(swarm.training.diloco).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hivemind.dht import DHT

import swarm
from swarm import checkpoint, receipts, tls
from swarm.errors import ConfigError, PeerUnavailable, SwarmError
from swarm.models.llama import LlamaBlock, LlamaConfig, init_weights
from swarm.node import device as devices
from swarm.node.announcer import Announcer
from swarm.node.backend import BlockBackend
from swarm.node.config import NodeConfig
from swarm.node.metrics import NodeMetrics
from swarm.node.push import PushGate, records_lookup
from swarm.node.reachability import announce_host
from swarm.node.runtime import serve_metrics, stop_on_signals
from swarm.node.server import SERVICE_NAME, BlockServicer, ServerLimits, start_grpc_server
from swarm.records import NodeIdentity, ServerRecord, ServerState, fetch_records, latest_per_peer
from swarm.training.averaging import AveragingConfig, LocalState
from swarm.training.collaboration import Collaboration, RoundStats
from swarm.training.peers import AveragingServicer, DHTMembership
from swarm.training.stages import has_weights, model_name, read_config, run_id, save_atomically, stage_span

log = logging.getLogger("swarm.node")


# ---- pure decisions -------------------------------------------------------------------------------


def stage_totals(records: Iterable[ServerRecord], num_stages: int) -> tuple[list[float], list[int]]:
    """Total announced throughput and number of online training peers, per stage."""
    totals = [0.0] * num_stages
    peers = [0] * num_stages
    for r in records:
        if r.state == ServerState.ONLINE and r.trainable_stage is not None and r.trainable_stage < num_stages:
            totals[r.trainable_stage] += r.throughput
            peers[r.trainable_stage] += 1
    return totals, peers


def choose_stage(records: Iterable[ServerRecord], num_stages: int) -> int:
    """The stage with the least total throughput among online training peers (ties: the lowest)."""
    totals, peers = stage_totals(records, num_stages)
    return min(range(num_stages), key=lambda k: (totals[k], peers[k], k))


def plan_stage_move(
    totals: list[float], peers: list[int], mine: int, my_throughput: float, threshold: float
) -> int | None:
    """The stage this peer should move to, or None (SWARM's adaptive rebalancing).

    The pipeline runs at the pace of its least-served stage. Only a peer of the best-served
    stage moves, and only to the worst-served one, never leaving its stage empty, and only when
    the bottleneck then rises by more than `threshold` (a fraction). Every move raises the
    bottleneck, so peers cannot move in circles.
    """
    worst = min(range(len(totals)), key=lambda k: (totals[k], k))
    best = max(range(len(totals)), key=lambda k: (totals[k], -k))
    if mine != best or worst == mine or peers[mine] < 2:
        return None
    after = list(totals)
    after[mine] -= my_throughput
    after[worst] += my_throughput
    before = min(totals)
    if before <= 0:
        return worst  # a stage with no peer stops all training: any peer helps
    return worst if min(after) > before * (1 + threshold) else None


# ---- weights -----------------------------------------------------------------------------------


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


# ---- the collaboration ---------------------------------------------------------------------------


def averaging_config(cfg: NodeConfig) -> AveragingConfig:
    return AveragingConfig(
        target_batch_size=cfg.target_batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        round_timeout=cfg.averaging_timeout,
        mode=cfg.averaging,
        outer_every=cfg.outer_every,
        outer_lr=cfg.outer_lr,
        outer_momentum=cfg.outer_momentum,
        codec=cfg.averaging_codec,
    )


def save_stage_checkpoint(path: Path, blocks: list[LlamaBlock], state: LocalState) -> None:
    """<run id>.pt: the stage's weights, AdamW state and epoch (atomically replaced); call exclusively."""
    save_atomically({"blocks": [b.state_dict() for b in blocks], **state.state_dict()}, path)


def load_stage_checkpoint(path: Path, blocks: list[LlamaBlock], state: LocalState) -> None:
    """Resume from save_stage_checkpoint's file: weights, Adam moments and the epoch."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if len(saved["blocks"]) != len(blocks) or "optimizer" not in saved:
        raise ConfigError(
            f"{path} holds {len(saved['blocks'])} blocks (this stage has {len(blocks)}) or no optimizer "
            "state: move it away to start the stage afresh"
        )
    with torch.no_grad():
        for block, weights in zip(blocks, saved["blocks"], strict=True):
            block.load_state_dict(weights)
    state.load_state_dict(saved)


# ---- the node's life -------------------------------------------------------------------------


async def serve_training(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> int | None:
    """Train a stage until SIGTERM/SIGINT (-> None). With --stage auto, leave it when moving to
    another stage raises the pipeline's bottleneck (see plan_stage_move) and return that stage:
    the caller then starts the node afresh, and the fresh node joins the least-served stage,
    which is that one. (A restart: the plainest way to drop one stage's weights, state and
    collaboration for another's.)"""
    stop = stop_on_signals()
    config = read_config(cfg.model)
    model = model_name(cfg.model)
    peers = await training_peers(dht, model, config.num_hidden_layers)
    stage = choose_stage(peers, cfg.num_stages) if cfg.stage == "auto" else int(cfg.stage)
    return await _train_stage(cfg, dht, identity, on_ready, stop, config, model, stage, peers)


async def training_peers(dht: DHT, model: str, num_blocks: int) -> list[ServerRecord]:
    """Online training peers of `model` other than this node that answer a health check: a
    crashed peer's record outlives it in the DHT, and counting it would send this node to the
    wrong stage (or wait on it for state)."""
    records = await fetch_records(dht, model, list(range(num_blocks)))
    announced = latest_per_peer(x for rs in records.values() for x in rs)
    others = [r for r in announced if r.peer_id != str(dht.peer_id) and r.trainable_stage is not None]
    return await _answering([r for r in others if r.state == ServerState.ONLINE])


async def _train_stage(
    cfg: NodeConfig,
    dht: DHT,
    identity: NodeIdentity,
    on_ready: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    config: LlamaConfig,
    model: str,
    stage: int,
    peers: list[ServerRecord],
) -> int | None:
    """Serve `stage` until `stop` (-> None) or until moving pays (-> the stage to move to)."""
    span = stage_span(config.num_hidden_layers, cfg.num_stages, stage)
    device = devices.resolve_device(cfg.device)
    blocks = [b.to(device) for b in await asyncio.to_thread(stage_blocks, cfg.model, config, span, cfg.seed)]
    rid = run_id(model, stage)
    saved = Path(cfg.checkpoint_dir) / f"{rid}.pt" if cfg.checkpoint_dir else None
    state = LocalState([p for b in blocks for p in b.parameters()], averaging_config(cfg))
    mates = {
        r.peer_id: tls.Endpoint(r.grpc_address, r.tls_cert_sha256)
        for r in peers
        if r.trainable_stage == stage
    }
    if not mates and saved is not None and saved.is_file():
        load_stage_checkpoint(saved, blocks, state)
        log.info("resumed stage %d from %s at epoch %d", stage, saved, state.epoch)
    return await _serve_stage(
        cfg, dht, identity, on_ready, stop, config, model, stage, span, blocks, state, mates, saved
    )


async def _answering(records: list[ServerRecord], timeout: float = 3.0) -> list[ServerRecord]:
    """The records whose node answers a gRPC health check as SERVING within `timeout` seconds."""

    async def serving(record: ServerRecord) -> bool:
        try:
            channel = await tls.open_channel(
                record.grpc_address, record.tls_cert_sha256, peer=record.peer_id, timeout=timeout
            )
            async with channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
                )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except (grpc.aio.AioRpcError, PeerUnavailable):  # PeerUnavailable: no TLS, or another certificate
            return False

    answers = await asyncio.gather(*(serving(r) for r in records))
    return [r for r, ok in zip(records, answers, strict=True) if ok]


def measure_throughput(blocks: list[LlamaBlock], hidden_size: int, slowdown: float) -> float:
    """Tokens/s this node can train through its stage, as a trainer's traffic counts them (a
    forward request and a training backward of the same tokens), on random inputs."""
    params = [p for b in blocks for p in b.parameters()]
    h = torch.randn(4, 64, hidden_size, device=params[0].device)

    def run(x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, 0, None)
        return x

    began = time.monotonic()
    for _ in range(2):
        with torch.no_grad():
            run(h)
        with torch.enable_grad():
            h_in = h.detach().requires_grad_(True)
            out = run(h_in)
            torch.autograd.grad(out, [h_in, *params], torch.ones_like(out), allow_unused=True)
    seconds = (time.monotonic() - began) * slowdown
    return 2 * 2 * h.shape[0] * h.shape[1] / seconds


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
    state: LocalState,
    mates: dict[str, tls.Endpoint],
    saved: Path | None,
) -> int | None:
    device = next(blocks[0].parameters()).device
    metrics = NodeMetrics()
    metrics.set_info(
        version=swarm.__version__,
        model=model,
        device=str(device),
        dtype="float32",
        quant="none",
        peer_id=str(dht.peer_id),
    )
    metrics.set_span(*span)
    metrics.set_state(str(ServerState.JOINING))
    me = str(dht.peer_id)
    holder: list[Collaboration] = []  # the backend's hook needs the collaboration, which needs the backend
    backend = BlockBackend(
        config,
        blocks,
        span[0],
        dtype=torch.float32,
        device=device,
        cache_bytes=cfg.cache_bytes or (64 << 20),
        cache_share=cfg.client_share,
        batching=cfg.batching,
        batch_tokens=cfg.batch_tokens,
        on_gradients=lambda grads, samples, step: holder[0].accumulate(grads, samples, step),
        slowdown=cfg.slowdown,
    )

    counted = RoundStats()  # what is in the metrics already

    def on_step(epoch: int) -> None:
        metrics.training_steps.inc()
        metrics.count_averaging(holder[0].stats, counted)
        if saved is not None and epoch % cfg.checkpoint_every == 0:
            save_stage_checkpoint(saved, blocks, state)

    collab = Collaboration(
        run_id(model, stage),
        me,
        state,
        averaging_config(cfg),
        exclusive=backend.worker.call,
        membership=None,
        on_step=on_step,
    )
    holder.append(collab)
    collab.on_traffic = lambda: metrics.count_averaging(collab.stats, counted)
    collab.members = dict(mates)
    averaging = AveragingServicer()
    averaging.collaborations[collab.run_id] = collab
    limits = ServerLimits(
        cfg.max_batch, cfg.max_tokens, cfg.max_session_length, cfg.max_message_bytes, cfg.session_idle_timeout
    )
    servicer = BlockServicer(
        backend,
        model,
        me,
        limits,
        metrics=metrics,
        signer=receipts.ReceiptSigner(identity.private_key),
        corrupt_rate=cfg.corrupt_rate,
        # An inference session here may name push targets too: the same signed records vouch for them.
        push_allowed=PushGate(records_lookup(dht, model)).allowed,
    )
    servicer.training_status = lambda: (state.epoch, dict(state.fingerprints))
    servicer.shared_epoch = state.shared_epoch

    async def await_epoch(epoch: int, time_left: float | None) -> None:
        await collab.wait_for_epoch(epoch, None if time_left is None else time_left / 2)

    servicer.await_epoch = await_epoch
    estimate = cfg.throughput
    if estimate is None:
        estimate = await asyncio.to_thread(measure_throughput, blocks, config.hidden_size, cfg.slowdown)

    def throughput() -> float:
        """The measured figure once this node has done real work, else the start-up estimate."""
        worker = backend.worker
        if cfg.throughput or worker.busy_seconds < 2.0:
            return estimate
        return worker.tokens_done / worker.busy_seconds

    certificate = tls.NodeCertificate.generate(me) if cfg.tls else None
    server, port, health = await start_grpc_server(
        servicer, cfg.host, cfg.port, cfg.max_message_bytes, averaging=averaging, certificate=certificate
    )
    cert_sha256 = certificate.sha256 if certificate is not None else None
    metrics_port, stop_metrics = await serve_metrics(cfg, metrics, server)
    address = f"{announce_host(cfg)}:{cfg.announce_port or port}"
    collab.membership = DHTMembership(dht, identity, collab.run_id, me, address, cert_sha256)
    if mates:  # others train this stage already: start from where they are
        source = min(mates)  # the stage's leader, unless it is this node (then any mate will do)
        log.info("loading stage %d's state from %s (peers: %s)", stage, source, ", ".join(sorted(mates)))
        try:
            await collab.catch_up(source)
        except SwarmError as e:  # train anyway: the stage's leader brings us in line at its next round
            log.warning("could not load stage %d's state (%s); starting from epoch %d", stage, e, state.epoch)
    announcer = Announcer(
        dht,
        identity,
        cfg.announce_period,
        refresh=lambda r: r.model_copy(update={"throughput": throughput()}),
        num_blocks=config.num_hidden_layers,
    )
    record = ServerRecord(
        state=ServerState.ONLINE,
        peer_id=me,
        grpc_address=address,
        model=model,
        start=span[0],
        end=span[1],
        throughput=estimate,
        trainable_stage=stage,
        software_version=swarm.__version__,
        tls_cert_sha256=cert_sha256,
    )
    leave = asyncio.Event()  # set by stop, or by a decision to move
    move: list[int] = []
    background: list[asyncio.Task[None]] = []
    try:
        await announcer.publish(record, required=True)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        metrics.set_state(str(ServerState.ONLINE))
        on_ready(
            {
                "peer_id": me,
                "grpc_address": address,
                "tls_cert_sha256": cert_sha256,
                "model": model,
                "span": f"{span[0]}:{span[1]}",
                "stage": stage,
                "epoch": state.epoch,
                "throughput": round(estimate, 1),
                "metrics_port": metrics_port,
                "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                "pid": os.getpid(),
            }
        )
        background = [
            asyncio.create_task(announcer.run(leave)),
            asyncio.create_task(collab.run(leave)),
            asyncio.create_task(_forward(stop, leave)),
        ]
        if cfg.stage == "auto":
            background.append(
                asyncio.create_task(_rebalance(cfg, dht, config, model, stage, throughput, leave, move))
            )
        await leave.wait()
    finally:
        leave.set()
        servicer.state = str(ServerState.DRAINING)
        metrics.set_state(str(ServerState.DRAINING))
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await announcer.withdraw()
        await _drain(servicer, cfg.drain_timeout)
        for task in background:  # the collaboration withdraws its membership as it ends
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.stop(grace=2)
        stop_metrics()
        backend.shutdown()
        if saved is not None:  # the compute thread has stopped: nothing steps now
            await asyncio.to_thread(save_stage_checkpoint, saved, blocks, state)
    return move[0] if move and not stop.is_set() else None


async def _forward(stop: asyncio.Event, leave: asyncio.Event) -> None:
    await stop.wait()
    leave.set()


async def _drain(servicer: BlockServicer, timeout: float) -> None:
    """Let requests in flight finish (new ones get UNAVAILABLE), for at most `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(servicer.idle.wait(), timeout)


async def _rebalance(
    cfg: NodeConfig,
    dht: DHT,
    config: LlamaConfig,
    model: str,
    stage: int,
    throughput: Callable[[], float],
    leave: asyncio.Event,
    move: list[int],
) -> None:
    """Every --rebalance-period (with jitter, so peers do not all move at once): compare the
    stages' total throughput and move when plan_stage_move says it pays."""
    while not leave.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leave.wait(), cfg.rebalance_period * random.uniform(0.5, 1.5))
        if leave.is_set():
            return
        try:
            peers = await training_peers(dht, model, config.num_hidden_layers)
        except Exception:  # the DHT may hiccup: look again next period
            log.debug("could not read the training peers", exc_info=True)
            continue
        totals, counts = stage_totals(peers, cfg.num_stages)
        mine = throughput()
        totals[stage] += mine
        counts[stage] += 1
        target = plan_stage_move(totals, counts, stage, mine, cfg.balance_threshold)
        if target is not None:
            log.info(
                "moving from stage %d to stage %d: stage totals %s tokens/s",
                stage,
                target,
                [round(t) for t in totals],
            )
            move.append(target)
            leave.set()
            return
