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
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hivemind.dht import DHT

import swarm
from swarm import checkpoint
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
from swarm.training.stages import has_weights, model_name, read_config, run_id, stage_span

log = logging.getLogger("swarm.node")


# ---- pure decisions -------------------------------------------------------------------------------


def choose_stage(records: Iterable[ServerRecord], num_stages: int) -> int:
    """The stage with the least total throughput among online training peers (ties: the lowest)."""
    totals = [0.0] * num_stages
    peers = [0] * num_stages
    for r in records:
        if r.state == ServerState.ONLINE and r.trainable_stage is not None and r.trainable_stage < num_stages:
            totals[r.trainable_stage] += r.throughput
            peers[r.trainable_stage] += 1
    return min(range(num_stages), key=lambda k: (totals[k], peers[k], k))


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


# ---- the optimizer -----------------------------------------------------------------------------


class StageOptimizer:
    """hivemind.Optimizer for one stage, driven from the compute thread only.

    hivemind talks to the other peers only inside `step`. A peer that gets no Backward while its
    mates average would miss their round, and worse, a mate already matched with it in a group
    would wait for it until the averaging timeout, its compute thread (and every trainer's
    micro-batch there) stalled. So a ticker calls `tick` every KEEP_UP_PERIOD: once the stage
    has its target batch, this peer steps too, with whatever it has accumulated (possibly
    nothing: it then takes part with weight 0 and still receives the averaged gradients). A
    peer that missed a step anyway loads the stage's state from a mate.

    hivemind sees a peer only once it reports samples, so peers that start together would each
    take their first steps alone and drift apart for good. Until this peer's tracker sees every
    online peer of the stage (`expected_peers`, from the DHT's records) or START_GATE seconds
    pass, it only reports its samples and keeps their gradients.

    Gradients are summed in the weights' own .grad (hivemind's reuse_grad_buffers): a request's
    gradient is a mean over its samples, and hivemind divides the sum by the number of step
    calls, so the sum is rescaled whenever the calls and the requests differ.

    `fingerprints` keeps, per epoch, the weights' sums of squares as the epoch began here: the
    peers of a stage in sync show equal fingerprints (to float rounding) for the epochs they share.
    """

    HISTORY = 256  # epochs of fingerprints kept
    START_GATE = 15.0  # seconds the first step waits to see the stage's other peers

    def __init__(
        self, dht: DHT, run_id: str, params: list[torch.nn.Parameter], cfg: NodeConfig, identity: NodeIdentity
    ) -> None:
        from hivemind import Optimizer

        warmup = max(1, cfg.warmup_steps)
        self.params = params
        self.target_batch_size = cfg.target_batch_size
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
            reuse_grad_buffers=True,
            offload_optimizer=False,  # step the weights themselves, on this (the compute) thread's watch
            # Averaged gradients keep the peers identical; averaging the whole state (a second
            # round, with its own matchmaking) now and then is the safety net.
            average_state_every=cfg.average_state_every,
            delay_state_averaging=False,
            average_opt_statistics=("exp_avg", "exp_avg_sq"),
            averager_opts={"request_timeout": 0.5},
            # Progress records are signed, and our DHT checks signatures against the node's key:
            # hivemind's default (a process-wide key) would be refused, and peers never meet.
            # A short refresh period: peers learn of each other's progress within 2 s.
            tracker_opts={"private_key": identity.private_key, "max_refresh_period": 2.0},
            verbose=os.environ.get("SWARM_HIVEMIND_VERBOSE") == "1",
        )
        self.expected_peers = 1  # online peers of this stage, this one included (set by the node)
        self._gated: tuple[int, int, float] | None = (0, 0, 0.0)  # (requests, samples, since)
        self.fingerprints: OrderedDict[int, list[float]] = OrderedDict()
        self._note_epoch()

    @property
    def epoch(self) -> int:
        return int(self.opt.local_epoch)

    def on_gradients(self, samples: int) -> None:
        """One request's gradients (a mean over its `samples` sequences) were added to .grad."""
        if self._gated is None:
            self._step(samples)
            return
        requests, total, since = self._gated
        self._gated = (requests + 1, total + samples, since or time.monotonic())
        self.opt.tracker.report_local_progress(self.epoch, total + samples)  # be seen
        self._open_gate()

    def tick(self) -> None:
        """Take part in the stage's step once it is due, or catch up if it went on without us."""
        if self._gated is not None:
            self._open_gate()
            return
        tracker = self.opt.tracker
        if int(tracker.global_epoch) > self.epoch:
            log.info(
                "the stage is at epoch %d, this peer at %d: loading state", tracker.global_epoch, self.epoch
            )
            self.load_state_from_peers()
            return
        progress = tracker.global_progress
        if progress.samples_accumulated >= self.target_batch_size and progress.num_peers > 1:
            calls = self.opt.grad_averager.local_times_accumulated  # hivemind's divisor
            if calls:  # one more call, no more gradients: keep sum / calls the mean
                self._scale_grads((calls + 1) / calls)
            self._step(0)

    def load_state_from_peers(self) -> None:
        self.opt.load_state_from_peers()
        self._note_epoch()

    def shutdown(self) -> None:
        self.opt.shutdown()

    def _open_gate(self) -> None:
        assert self._gated is not None
        requests, samples, since = self._gated
        if not requests:
            return
        seen = self.opt.tracker.global_progress.num_peers
        if seen < self.expected_peers and time.monotonic() - since < self.START_GATE:
            return
        log.info("first step with %d of %d peers of the stage in view", seen, self.expected_peers)
        self._gated = None
        self._scale_grads(1 / requests)  # the sum of `requests` means, handed over as one call
        self._step(samples)

    def _scale_grads(self, factor: float) -> None:
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def _step(self, samples: int) -> None:
        self.opt.step(batch_size=samples)
        self._note_epoch()

    def _note_epoch(self) -> None:
        if self.epoch not in self.fingerprints:
            self.fingerprints[self.epoch] = weights_fingerprint(self.params)
            while len(self.fingerprints) > self.HISTORY:
                self.fingerprints.popitem(last=False)


def weights_fingerprint(params: Iterable[torch.Tensor]) -> list[float]:
    """Each tensor's sum of squares, in float64: equal for weights equal to float rounding, and
    apart by far more for weights that took different steps."""
    return [float(p.detach().double().square().sum()) for p in params]


def _warmup(steps: int, epoch: int) -> float:
    return min(1.0, (epoch + 1) / steps)


async def _keep_up(backend: BlockBackend, optimizer: StageOptimizer, stop: asyncio.Event) -> None:
    """Every KEEP_UP_PERIOD, on the compute thread (between requests): step with the stage, or
    catch up with it; see StageOptimizer."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), KEEP_UP_PERIOD)
        if stop.is_set():
            return
        try:
            await backend.worker.call(optimizer.tick)
        except Exception:  # keep serving; the next tick (or hivemind's own step) tries again
            log.exception("could not keep up with the stage's peers")


async def _count_mates(
    dht: DHT, model: str, stage: int, span: tuple[int, int], optimizer: StageOptimizer, stop: asyncio.Event
) -> None:
    """Keep `optimizer.expected_peers` at the number of online peers of the stage, from the DHT."""
    while not stop.is_set():
        try:
            records = await fetch_records(dht, model, [span[0]])
            mates = {
                r.peer_id
                for r in latest_per_peer(x for rs in records.values() for x in rs)
                if r.trainable_stage == stage and r.state == ServerState.ONLINE
            }
            optimizer.expected_peers = max(1, len(mates | {str(dht.peer_id)}))
        except Exception:  # the DHT may hiccup; the gate also opens on its own timer
            log.debug("could not read the stage's peers", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


KEEP_UP_PERIOD = 0.2

# ---- the node's life -------------------------------------------------------------------------


async def serve_training(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> None:
    stop = stop_on_signals()
    config = read_config(cfg.model)
    model = model_name(cfg.model)
    device = devices.resolve_device(cfg.device)
    n = config.num_hidden_layers
    records = await fetch_records(dht, model, list(range(n)))
    # Only peers that answer: a crashed peer's record stays in the DHT until it expires, and
    # counting it would send this node to the wrong stage (or wait on it for state).
    peers = await _answering(
        [
            r
            for r in latest_per_peer(x for rs in records.values() for x in rs)
            if r.peer_id != str(dht.peer_id)
            and r.trainable_stage is not None
            and r.state == ServerState.ONLINE
        ]
    )
    stage = choose_stage(peers, cfg.num_stages) if cfg.stage == "auto" else int(cfg.stage)
    span = stage_span(n, cfg.num_stages, stage)
    blocks = [b.to(device) for b in await asyncio.to_thread(stage_blocks, cfg.model, config, span, cfg.seed)]
    params = [p for b in blocks for p in b.parameters()]
    # On this thread: hivemind installs signal handlers, which only the main thread may do.
    optimizer = StageOptimizer(dht, run_id(model, stage), params, cfg, identity)
    try:
        mates = [r for r in peers if r.trainable_stage == stage and r.state == ServerState.ONLINE]
        if mates:  # others train this stage already: start from where they are
            log.info("loading stage %d's state from %d peer(s)", stage, len(mates))
            await asyncio.to_thread(optimizer.load_state_from_peers)
        await _serve_stage(cfg, dht, identity, on_ready, stop, config, model, stage, span, blocks, optimizer)
    finally:
        await asyncio.to_thread(optimizer.shutdown)


async def _answering(records: list[ServerRecord], timeout: float = 3.0) -> list[ServerRecord]:
    """The records whose node answers a gRPC health check as SERVING within `timeout` seconds."""

    async def serving(record: ServerRecord) -> bool:
        try:
            async with grpc.aio.insecure_channel(record.grpc_address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
                )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return False

    answers = await asyncio.gather(*(serving(r) for r in records))
    return [r for r, ok in zip(records, answers, strict=True) if ok]


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
        slowdown=cfg.slowdown,
    )
    limits = ServerLimits(
        cfg.max_batch, cfg.max_tokens, cfg.max_session_length, cfg.max_message_bytes, cfg.session_idle_timeout
    )
    servicer = BlockServicer(backend, model, str(dht.peer_id), limits, metrics=metrics)
    servicer.training_status = lambda: (optimizer.epoch, dict(optimizer.fingerprints))
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
    background: list[asyncio.Task[None]] | None = None
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
        background = [
            asyncio.create_task(announcer.run(stop)),
            asyncio.create_task(_keep_up(backend, optimizer, stop)),
            asyncio.create_task(_count_mates(dht, model, stage, span, optimizer, stop)),
        ]
        await stop.wait()
    finally:
        for task in background or ():
            task.cancel()
        servicer.state = str(ServerState.DRAINING)
        await announcer.withdraw()
        await server.stop(grace=2)
        backend.shutdown()
