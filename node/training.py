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
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

import swarm
from swarm import checkpoint
from swarm.dht import dht_call, keep_sigint
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
        self,
        dht: DHT,
        run_id: str,
        blocks: list[LlamaBlock],
        cfg: NodeConfig,
        identity: NodeIdentity,
        *,
        checkpoint: Path | None = None,
    ) -> None:
        from hivemind import Optimizer

        warmup = max(1, cfg.warmup_steps)
        self.blocks = blocks
        self.params = params = [p for b in blocks for p in b.parameters()]
        self.checkpoint, self.checkpoint_every = checkpoint, cfg.checkpoint_every
        self.target_batch_size = cfg.target_batch_size
        with keep_sigint():  # hivemind would leave Ctrl-C ignored
            self.opt = Optimizer(
                dht=dht,
                run_id=run_id,
                params=params,
                optimizer=partial(torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay),
                scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=partial(_warmup, warmup)),
                target_batch_size=cfg.target_batch_size,
                matchmaking_time=cfg.matchmaking_time,
                averaging_timeout=cfg.averaging_timeout,
                # Wait for every part of an all-reduce (hivemind's default: 1 s, then it keeps its own
                # values for the missing parts, and the peers of a stage silently drift apart).
                next_chunk_timeout=cfg.averaging_timeout,
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
        self.repaired: set[int] = set()  # epochs whose weights reconcile() replaced
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

    def reconcile(self, me: str, mates: dict[str, tuple[int, list[float]]]) -> bool:
        """Compare this epoch's weights with mates' at the same epoch (`mates`: peer id -> (epoch,
        fingerprint), as published); if they differ and a mate with a smaller peer id disagrees,
        take the stage's state from the mates. hivemind's all-reduce sometimes returns part of a
        round's results (it logs "received 88.9% results") and keeps local values for the rest;
        this is how the peers of a stage find out and agree again (the smallest id wins)."""
        epoch = self.epoch
        mine = self.fingerprints.get(epoch)
        if mine is None:
            return False
        differ = [
            peer
            for peer, (their_epoch, theirs) in mates.items()
            if peer != me and their_epoch == epoch and not _same_weights(mine, theirs)
        ]
        if not differ or min(differ) > me:
            return False
        log.warning("weights differ from %s's at epoch %d: loading the stage's state", min(differ), epoch)
        self.opt.load_state_from_peers()
        self.repaired.add(self.epoch)
        self.fingerprints[self.epoch] = weights_fingerprint(self.params)
        return True

    def save_checkpoint(self) -> None:
        """<run id>.pt: the stage's weights, optimizer state and epoch (atomically replaced)."""
        if self.checkpoint is None:
            return
        state = {
            "blocks": [b.state_dict() for b in self.blocks],
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
        }
        save_atomically(state, self.checkpoint)

    def load_checkpoint(self) -> None:
        """Resume from save_checkpoint's file: weights, Adam moments and the epoch."""
        assert self.checkpoint is not None
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if len(state["blocks"]) != len(self.blocks):
            raise ConfigError(
                f"{self.checkpoint} holds {len(state['blocks'])} blocks, this stage {len(self.blocks)}"
            )
        with torch.no_grad():
            for block, weights in zip(self.blocks, state["blocks"], strict=True):
                block.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.opt.tracker.report_local_progress(self.epoch, 0)
        self._note_epoch()

    def shutdown(self) -> None:
        self.opt.shutdown()

    def _open_gate(self) -> None:
        assert self._gated is not None
        requests, samples, since = self._gated
        if not requests:
            return
        seen = self.opt.tracker.global_progress.num_peers
        alone = self.expected_peers <= 1  # nobody to wait for
        if not alone and seen < self.expected_peers and time.monotonic() - since < self.START_GATE:
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
        if self.epoch in self.fingerprints:
            return
        self.fingerprints[self.epoch] = weights_fingerprint(self.params)
        while len(self.fingerprints) > self.HISTORY:
            self.fingerprints.popitem(last=False)
        if self.epoch and self.epoch % self.checkpoint_every == 0:
            self.save_checkpoint()


def weights_fingerprint(params: Iterable[torch.Tensor]) -> list[float]:
    """Each tensor's sum of squares, in float64: equal for weights equal to float rounding, and
    apart by far more for weights that took different steps."""
    return [float(p.detach().double().square().sum()) for p in params]


def _same_weights(a: list[float], b: list[float], rel: float = 1e-6) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True)
    )


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
    dht: DHT,
    backend: BlockBackend,
    model: str,
    stage: int,
    span: tuple[int, int],
    optimizer: StageOptimizer,
    stop: asyncio.Event,
) -> None:
    """Every second: count the stage's online peers (for the start gate), publish this peer's
    latest weight fingerprint and reconcile with the mates' (see StageOptimizer.reconcile)."""
    me = str(dht.peer_id)
    key = f"{run_id(model, stage)}_fingerprints"
    while not stop.is_set():
        try:
            records = await fetch_records(dht, model, [span[0]])
            mates = {
                r.peer_id
                for r in latest_per_peer(x for rs in records.values() for x in rs)
                if r.trainable_stage == stage and r.state == ServerState.ONLINE
            }
            optimizer.expected_peers = max(1, len(mates | {me}))
            epoch, fingerprint = next(reversed(optimizer.fingerprints.items()))
            expires = get_dht_time() + FINGERPRINT_TTL
            await dht_call(
                dht.store(key, [epoch, fingerprint], expires, subkey=me, return_future=True), timeout=10
            )
            found = await dht_call(dht.get(key, latest=True, return_future=True), timeout=10)
            published = {
                str(peer): (int(item.value[0]), [float(x) for x in item.value[1]])
                for peer, item in (
                    found.value.items() if found is not None and isinstance(found.value, dict) else ()
                )
            }
            await backend.worker.call(partial(optimizer.reconcile, me, published))
        except Exception:  # the DHT may hiccup; the gate also opens on its own timer
            log.debug("could not read the stage's peers", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


FINGERPRINT_TTL = 60.0  # seconds a published fingerprint lives in the DHT
KEEP_UP_PERIOD = 0.2

# ---- the node's life -------------------------------------------------------------------------


async def serve_training(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> int | None:
    """Train a stage until SIGTERM/SIGINT (-> None). With --stage auto, leave it when moving to
    another stage raises the pipeline's bottleneck (see plan_stage_move) and return that stage:
    the caller then starts the node afresh, and the fresh node joins the least-served stage,
    which is that one. (A restart, because hivemind's averagers, forked from this process, do
    not survive a second optimizer here: the DHT daemon went down with the first.)"""
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
    # On this thread: hivemind installs signal handlers, which only the main thread may do.
    optimizer = StageOptimizer(dht, rid, blocks, cfg, identity, checkpoint=saved)
    try:
        mates = [r for r in peers if r.trainable_stage == stage]
        optimizer.expected_peers = len(mates) + 1  # kept current by _count_mates
        if mates:  # others train this stage already: start from where they are
            names = ", ".join(f"{r.peer_id} at {r.grpc_address}" for r in mates)
            log.info("loading stage %d's state from its peers (%s)", stage, names)
            await asyncio.to_thread(optimizer.load_state_from_peers)
        elif saved is not None and saved.is_file():
            await asyncio.to_thread(optimizer.load_checkpoint)
            log.info("resumed stage %d from %s at epoch %d", stage, saved, optimizer.epoch)
        return await _serve_stage(
            cfg, dht, identity, on_ready, stop, config, model, stage, span, blocks, optimizer
        )
    finally:
        # The compute thread has stopped (_serve_stage shut the backend down): nothing steps now.
        await asyncio.to_thread(optimizer.save_checkpoint)
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
    optimizer: StageOptimizer,
) -> int | None:
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
    estimate = cfg.throughput
    if estimate is None:
        estimate = await asyncio.to_thread(measure_throughput, blocks, config.hidden_size, cfg.slowdown)

    def throughput() -> float:
        """The measured figure once this node has done real work, else the start-up estimate."""
        worker = backend.worker
        if cfg.throughput or worker.busy_seconds < 2.0:
            return estimate
        return worker.tokens_done / worker.busy_seconds

    server, port, health = await start_grpc_server(servicer, cfg.host, cfg.port, cfg.max_message_bytes)
    address = f"{announce_host(cfg)}:{cfg.announce_port or port}"
    announcer = Announcer(
        dht,
        identity,
        cfg.announce_period,
        refresh=lambda r: r.model_copy(update={"throughput": throughput()}),
    )
    record = ServerRecord(
        state=ServerState.ONLINE,
        peer_id=str(dht.peer_id),
        grpc_address=address,
        model=model,
        start=span[0],
        end=span[1],
        throughput=estimate,
        trainable_stage=stage,
        software_version=swarm.__version__,
    )
    leave = asyncio.Event()  # set by stop, or by a decision to move
    move: list[int] = []
    background: list[asyncio.Task[None]] = []
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
                "throughput": round(estimate, 1),
                "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                "pid": os.getpid(),
            }
        )
        background = [
            asyncio.create_task(announcer.run(leave)),
            asyncio.create_task(_keep_up(backend, optimizer, leave)),
            asyncio.create_task(_count_mates(dht, backend, model, stage, span, optimizer, leave)),
            asyncio.create_task(_forward(stop, leave)),
        ]
        if cfg.stage == "auto":
            background.append(
                asyncio.create_task(_rebalance(cfg, dht, config, model, stage, throughput, leave, move))
            )
        await leave.wait()
    finally:
        leave.set()
        for task in background:
            task.cancel()
        servicer.state = str(ServerState.DRAINING)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await announcer.withdraw()
        await _drain(servicer, cfg.drain_timeout)
        await server.stop(grace=2)
        backend.shutdown()
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
