"""The SWARM trainer (`swarm train`): data, embeddings and LM head here; the blocks on the swarm.

Every micro-batch takes its own pipeline, drawn at random in proportion to each peer's
throughput divided by the work this trainer already has in flight there (SWARM's stochastic
wiring: a slow or busy peer simply gets less). Several micro-batches are in flight at once, so
all stages work in parallel. Backward goes back through the very peers of the forward pass;
a hop whose peer fails is re-sent to another peer of its stage (RemotePipeline's retry), and
a micro-batch whose pipeline fails altogether is run again on a new one. Every micro-batch is
counted once when it is issued and once when it completes; `run` asserts the two agree.

The client parts (embeddings, final norm, LM head) are this trainer's own stage: several
trainers average them in the collaboration "<model>-head" (swarm.training.averaging), as the
nodes of a stage do. Local compute runs on one thread of its own, so the event loop keeps the
network busy while the head computes, and every micro-batch's gradients reach it whole.

Steps are synchronous, alone or with other trainers: each step's micro-batches are split between
the live trainers (by peer id order), each trainer issues its share tagged with the step
(RequestHeader.min_epoch) and waits at the step boundary, so each step's gradient comes from that
step's weights everywhere, as in one process (see `_claim`). A step that stalls because a trainer
died holding part of it is topped up by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import torch
import torch.nn.functional as F
from hivemind.dht import DHT

from swarm import checkpoint, tls
from swarm._proto import swarm_pb2_grpc
from swarm.client.autograd import RemotePipeline
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.remote import ChannelPool
from swarm.client.verify import SpotChecker
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop, SwarmMap, throughput_weighted_route
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.errors import ConfigError, SwarmError
from swarm.models.llama import ClientParts, LlamaConfig, init_weights
from swarm.records import NodeIdentity
from swarm.request_parsing import ParseRequests
from swarm.training.averaging import AveragingConfig, LocalState
from swarm.training.collaboration import CHANNEL_OPTIONS, Collaboration
from swarm.training.data import ByteDataset, DataConfig
from swarm.training.peers import AveragingServicer, DHTMembership
from swarm.training.stages import HEAD, has_weights, model_name, read_config, run_id, save_atomically

log = logging.getLogger("swarm.training")
T = TypeVar("T")


class TrainingError(SwarmError):
    """Training cannot go on: a micro-batch failed on every pipeline tried, or counts disagree."""


@dataclass(frozen=True)
class TrainerConfig:
    model: str  # the nodes' --model: a config.json or a checkpoint directory
    steps: int = 100  # optimizer steps (of the trainers' collaboration) to run
    micro_batch_size: int = 8  # sequences per micro-batch
    in_flight: int = 4  # micro-batches in the swarm at once
    target_batch_size: int = 256  # samples per optimizer step, swarm-wide (as the nodes')
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    averaging_timeout: float = 10.0
    seed: int = 0  # initial weights (as the nodes') and the data order
    # Activations and gradients on the wire. bf16 (half of float32's bytes) ended within 0.035
    # nats/byte of one process on each of 3 seeds (bench/codec_parity.py); int8 (a quarter) swung
    # from -0.03 to +0.07 with the seed, so it is opt-in for thin links.
    codec: str = "bf16"
    max_attempts: int = 3  # pipelines tried per micro-batch (each hop also retries on its own)
    request_timeout: float = 60.0  # one Forward/Backward; a node may be averaging for a while
    max_seconds: float | None = None  # stop after this long, whatever the step
    # SWARM's random wiring per micro-batch, or one fixed pipeline (re-drawn only on failure),
    # the baseline that bench/training.py compares against.
    wiring: Literal["random", "fixed"] = "random"
    checkpoint_dir: Path | None = None  # trainer.pt here: saved every checkpoint_every steps, resumed
    checkpoint_every: int = 10
    host: str = "127.0.0.1"  # where the head's AveragingService listens (other trainers call it)
    # That service over TLS with a fresh certificate, pinned by the hash in the signed membership
    # entry (as nodes do); --no-tls: plaintext.
    tls: bool = True
    # Each step's micro-batches computed with that step's weights everywhere (one process's
    # semantics; the pipeline drains at every step). Off: micro-batches run on, a step stale at most.
    synchronous: bool = True
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        positive = [
            *("steps", "micro_batch_size", "in_flight", "target_batch_size", "lr", "warmup_steps"),
            *("averaging_timeout", "max_attempts", "request_timeout", "checkpoint_every"),
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.wiring not in ("random", "fixed"):
            raise ConfigError(f"--wiring must be 'random' or 'fixed', got {self.wiring!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"--max-seconds must be > 0, got {self.max_seconds}")
        if self.micro_batch_size > self.target_batch_size:
            raise ConfigError(
                f"--micro-batch-size {self.micro_batch_size} is above --target-batch-size "
                f"{self.target_batch_size}: every micro-batch would be a step of its own"
            )


@dataclass
class Progress:
    """What the trainer has done so far; `on_progress` gets it after every micro-batch."""

    step: int = 0  # optimizer steps of the trainers' collaboration
    issued: int = 0  # micro-batches sent into the swarm
    completed: int = 0  # micro-batches whose gradients reached every stage and the head
    resent: int = 0  # completed micro-batches that needed another peer for some hop
    samples: int = 0
    started: float = field(default_factory=time.monotonic)
    losses: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, samples, loss)
    peers: dict[int, int] = field(default_factory=dict)  # stage -> online training peers

    @property
    def samples_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.samples / elapsed if elapsed > 0 else 0.0

    def recent_loss(self, n: int = 20) -> float:
        """Mean loss of the last `n` micro-batches (nan before the first)."""
        tail = [loss for _, _, loss in self.losses[-n:]]
        return sum(tail) / len(tail) if tail else math.nan


def step_share(per_step: int, trainers: list[str], me: str) -> int:
    """How many of a step's `per_step` micro-batches trainer `me` issues: an even split between the
    `trainers` (peer ids, `me` among them), the first ones in id order taking the remainder. Every
    trainer computes the same split from the same membership, so the shares add up to one step."""
    ordered = sorted(set(trainers))
    if me not in ordered:
        raise ValueError(f"{me} is not among the trainers {ordered}")
    base, extra = divmod(per_step, len(ordered))
    return base + (ordered.index(me) < extra)


def initial_parts(model: str, config: LlamaConfig, seed: int) -> ClientParts:
    """The client parts from the checkpoint's weights, or fresh from `seed` (the nodes draw block i
    from seed + i + 1, so no two parts share a draw)."""
    if has_weights(model):
        return checkpoint.load_client_parts(checkpoint.open_checkpoint(model), dtype=torch.float32)
    parts = ClientParts(config)
    init_weights(parts, seed)
    parts.tie_weights()
    return parts


TRAINER_CHECKPOINT = "trainer.pt"


def save_trainer_checkpoint(
    path: Path, parts: ClientParts, optimizer_state: dict[str, Any], step: int, next_index: int
) -> None:
    """The trainer's own stage: client-part weights (our names), optimizer state, step, and the next
    micro-batch index. Written to a temporary file and renamed, so a crash never leaves half a file."""
    state = {
        "parts": parts.state_dict(),
        "optimizer": optimizer_state,
        "step": step,
        "next_index": next_index,
    }
    save_atomically(state, path)


def load_trainer_checkpoint(path: Path) -> dict[str, Any]:
    """What save_trainer_checkpoint wrote: {"parts", "optimizer", "step", "next_index"}."""
    if not path.is_file():
        raise ConfigError(
            f"no trainer checkpoint at {path} "
            f"(swarm train writes {TRAINER_CHECKPOINT} in its --checkpoint-dir)"
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def load_trainer_parts(path: Path, config: LlamaConfig) -> ClientParts:
    """The client parts (embeddings, final norm, LM head) from a trainer checkpoint."""
    parts = ClientParts(config)
    parts.load_state_dict(load_trainer_checkpoint(path)["parts"])
    parts.tie_weights()
    return parts


class Head:
    """The client parts and their collaboration (shared by all trainers of the model). Their compute
    always runs on one thread (`run`), so that an optimizer step never overlaps a micro-batch's use
    of the weights."""

    def __init__(self, parts: ClientParts, cfg: TrainerConfig, me: str, model: str) -> None:
        self.parts = parts
        self._params = list(parts.parameters())
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="swarm-head")
        averaging = AveragingConfig(
            target_batch_size=cfg.target_batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            round_timeout=cfg.averaging_timeout,
        )
        self.state = LocalState(self._params, averaging)
        self.collaboration = Collaboration(
            run_id(model, HEAD), me, self.state, averaging, exclusive=self.run, membership=None
        )

    @property
    def epoch(self) -> int:
        return self.state.epoch

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.parts.embed(tokens[:, :-1])

    def loss(
        self, hidden: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        """Next-byte loss of the blocks' output `hidden`; d(loss)/d(hidden) and d(loss)/d(head weights)."""
        hidden = hidden.float().requires_grad_(True)
        logits = self.parts.logits(hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        grad_hidden, *grads = torch.autograd.grad(loss, [hidden, *self._params], allow_unused=True)
        return (
            float(loss.detach()),
            grad_hidden,
            [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self._params, strict=True)],
        )

    def apply(
        self, tokens: torch.Tensor, grad_embedded: torch.Tensor, head_grads: list[torch.Tensor], step: int
    ) -> None:
        """Hand one micro-batch's gradients (head, plus embeddings from the blocks' input gradient)
        to the collaboration, which steps when it has its target batch."""
        for p, g in zip(self._params, head_grads, strict=True):
            p.grad = g.clone()
        with torch.enable_grad():
            embedded = self.parts.embed(tokens[:, :-1])
            embedded.backward(grad_embedded.to(embedded.dtype))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        for p in self._params:
            p.grad = None
        self.collaboration.accumulate(grads, tokens.shape[0], step)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        dht: DHT,
        identity: NodeIdentity,
        *,
        client_config: ClientConfig | None = None,
    ) -> None:
        self.cfg = cfg
        self.config = read_config(cfg.model)
        self.model = model_name(cfg.model)
        self.dht = dht
        self.data = ByteDataset(replace(cfg.data, seed=cfg.seed))
        self.parts = initial_parts(cfg.model, self.config, cfg.seed)
        self.identity = identity
        self.head = Head(self.parts, cfg, str(dht.peer_id), self.model)
        self._server: grpc.aio.Server | None = None
        base = client_config or ClientConfig()
        self.client_config = replace(base, codec=cfg.codec, request_timeout=cfg.request_timeout)
        self.swarm_map = SwarmMapCache(dht, self.model, self.config.num_hidden_layers, ttl=2.0)
        self.pool = ChannelPool(self.client_config)
        self.bans = BanList(self.client_config.ban_base, self.client_config.ban_limit)
        # Spot checks of the stages' work, against other training peers of the same stage only.
        self.checker = SpotChecker(
            self.pool,
            self.swarm_map,
            self.client_config,
            self.bans,
            None,
            eligible=lambda s: s.trainable_stage is not None,
        )
        self.rng = random.Random(cfg.seed)
        self.load: Counter[str] = Counter()  # this trainer's micro-batches in flight, per peer
        self.progress = Progress()
        self._done: set[int] = set()
        self._fixed: list[Hop] = []  # the one route of wiring="fixed"
        self.checkpoint = cfg.checkpoint_dir / TRAINER_CHECKPOINT if cfg.checkpoint_dir else None
        self._next_index = 0  # in the data order; a resumed run goes on from its checkpoint's
        self._in_flight: set[int] = set()
        self._issued: Counter[int] = Counter()  # this run's micro-batches per optimizer step
        self._pending: Counter[int] = Counter()  # ... of those, still in flight
        self._topped: Counter[int] = Counter()  # extra micro-batches for steps that stalled
        self._saved_step = 0
        if self.checkpoint is not None and self.checkpoint.is_file():
            state = load_trainer_checkpoint(self.checkpoint)
            self.parts.load_state_dict(state["parts"])
            if "epoch" not in state["optimizer"]:
                raise ConfigError(
                    f"{self.checkpoint} was written by an older Swarm (hivemind's optimizer state): "
                    "move it away to train afresh"
                )
            self.head.state.load_state_dict(state["optimizer"])
            self._next_index = int(state["next_index"])
            log.info(
                "resumed from %s: step %d, micro-batch %d", self.checkpoint, state["step"], self._next_index
            )
        self._stop = asyncio.Event()

    # ---- one micro-batch --------------------------------------------------------------------

    def _training_map(self, snapshot: SwarmMap) -> SwarmMap:
        return replace(snapshot, servers=tuple(s for s in snapshot.servers if s.trainable_stage is not None))

    async def _pipeline(self) -> RemotePipeline:
        snapshot = self._training_map(await self.swarm_map.get())
        banned = self.bans.banned()
        if self.cfg.wiring == "fixed" and self._fixed and not {h.peer_id for h in self._fixed} & banned:
            route = list(self._fixed)
        else:
            route = throughput_weighted_route(snapshot, rng=self.rng, banned=banned, load=self.load)
            self._fixed = list(route)
        return RemotePipeline(
            self.pool,
            self.swarm_map,
            self.client_config,
            route,
            bans=self.bans,
            eligible=lambda s: s.trainable_stage is not None,
            checker=self.checker if self.checker.enabled else None,
        )

    def _share(self, epoch: int) -> int:
        """Micro-batches of optimizer step `epoch` this trainer issues: its step_share, plus top-ups."""
        collab = self.head.collaboration
        per_step = math.ceil(self.cfg.target_batch_size / self.cfg.micro_batch_size)
        return step_share(per_step, [*collab.live_mates(), collab.me], collab.me) + self._topped[epoch]

    async def _claim(self) -> int | None:
        """The optimizer step the next micro-batch belongs to; None once the run is over.

        Synchronous (the default): the step under way, or the next one, while this trainer's share of
        it is not issued; else wait for the step to close. Every stage then computes a step's
        micro-batches with that step's weights, as one process does. A step that does not close
        within the averaging timeout after this trainer's share of it completed is missing
        micro-batches that a trainer took and never finished (it died or left before the others
        noticed): this trainer issues one more for it, and so on until it closes."""
        collab = self.head.collaboration
        waited_since: tuple[int, float] | None = None
        while not self._stop.is_set() and not self._finished():
            epoch = self.head.epoch
            if not self.cfg.synchronous:
                return epoch
            for e in (epoch, epoch + 1):
                if e < self.cfg.steps and self._issued[e] < self._share(e):
                    self._issued[e] += 1
                    return e
            if self._issued[epoch] == 0 and epoch + 1 >= self.cfg.steps:
                return None  # the last step is the others' to close (this trainer's share is 0)
            if waited_since is None or waited_since[0] != epoch or self._pending[epoch]:
                waited_since = (epoch, time.monotonic())
            elif time.monotonic() - waited_since[1] > self.cfg.averaging_timeout:
                self._topped[epoch] += 1
                waited_since = None
                log.info("step %d has not closed: issuing one more micro-batch for it", epoch)
                continue
            # Woken by the step, or after a second to look at the trainers and the stall again.
            await collab.reached(epoch + 1, 1.0)
        return None

    async def _micro_batch(self, index: int, epoch: int) -> tuple[float, bool]:
        """Forward and backward of micro-batch `index`, of optimizer step `epoch`, through the swarm;
        (loss, re-sent?)."""
        tokens = self.data.batch(index, self.cfg.micro_batch_size)
        await self.head.collaboration.wait_for_epoch(epoch)
        error: BaseException | None = None
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                pipeline = await self._pipeline()
                pipeline.min_epoch = pipeline.step = epoch
            except SwarmError as e:  # e.g. a stage with no peer right now
                error = e
                await self._wait_before(attempt, e)
                continue
            peers = [hop.peer_id for hop in pipeline.route]
            self.load.update(peers)
            try:
                embedded = await self.head.run(self.head.embed, tokens)
                hidden, inputs = await pipeline.forward(embedded)
                loss, grad_hidden, head_grads = await self.head.run(self.head.loss, hidden, tokens)
                reply = await pipeline.backward(inputs, grad_hidden)
                await self.head.run(self.head.apply, tokens, reply.grad_inputs, head_grads, epoch)
                return loss, attempt > 1 or bool(pipeline.banned)
            except SwarmError as e:
                if not e.retryable:
                    raise
                error = e
                await self._wait_before(attempt, e)
            finally:
                self.load.subtract(peers)
        raise TrainingError(
            f"micro-batch {index} failed on {self.cfg.max_attempts} pipelines; last error: {error}"
        )

    async def _wait_before(self, attempt: int, error: BaseException) -> None:
        if attempt < self.cfg.max_attempts:
            log.warning("micro-batch pipeline failed (%s); trying a new one", error)
            await asyncio.sleep(self.client_config.retry.delay(attempt))
            await self.swarm_map.get(refresh=True)

    # ---- the run ----------------------------------------------------------------------------

    def _finished(self) -> bool:
        if self.head.epoch >= self.cfg.steps:
            return True
        elapsed = time.monotonic() - self.progress.started
        return self.cfg.max_seconds is not None and elapsed >= self.cfg.max_seconds

    async def _worker(self, on_progress: Callable[[Progress], None]) -> None:
        while True:
            epoch = await self._claim()
            if epoch is None:
                return
            index = self._next_index
            self._next_index += 1
            self._in_flight.add(index)
            self._pending[epoch] += 1
            self.progress.issued += 1
            try:
                loss, resent = await self._micro_batch(index, epoch)
            finally:
                self._pending[epoch] -= 1
            self._in_flight.discard(index)
            if index in self._done:
                raise TrainingError(f"micro-batch {index} completed twice")
            self._done.add(index)
            p = self.progress
            p.completed += 1
            p.resent += resent
            p.samples += self.cfg.micro_batch_size
            p.step = self.head.epoch
            p.losses.append((time.monotonic() - p.started, p.samples, loss))
            if self.checkpoint is not None and p.step >= self._saved_step + self.cfg.checkpoint_every:
                self._saved_step = p.step
                await self.head.run(self.save_checkpoint)
            on_progress(p)

    def save_checkpoint(self) -> None:
        """Write trainer.pt (call on the head's thread, or once nothing runs there)."""
        if self.checkpoint is None:
            return
        resume_at = min(self._in_flight, default=self._next_index)  # unfinished ones run again
        state = self.head.state.state_dict()
        save_trainer_checkpoint(self.checkpoint, self.parts, state, self.head.epoch, resume_at)

    async def _watch_peers(self) -> None:
        """Keep `progress.peers` (online training peers per stage) current for the progress bar."""
        while not self._stop.is_set():
            snapshot = self._training_map(await self.swarm_map.get())
            counts: Counter[int] = Counter(
                s.trainable_stage for s in snapshot.online() if s.trainable_stage is not None
            )
            self.progress.peers = dict(sorted(counts.items()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)

    async def run(self, on_progress: Callable[[Progress], None] = lambda p: None) -> Progress:
        """Train until `steps` optimizer steps (or `max_seconds`, or `stop()`); then let the
        micro-batches in flight finish, so every issued micro-batch is completed (or the run fails
        loudly), and save the checkpoint. A Trainer may run again; stop() ends the run under way."""
        self._stop.clear()
        await self._join_head()
        self._issued.clear()
        self._pending.clear()
        self._topped.clear()
        self.progress = Progress(step=self.head.epoch)
        self._saved_step = self.head.epoch
        watcher = asyncio.create_task(self._watch_peers())
        averaging = asyncio.create_task(self.head.collaboration.run(self._stop))
        workers = [asyncio.create_task(self._worker(on_progress)) for _ in range(self.cfg.in_flight)]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            self._stop.set()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            self._stop.set()
            watcher.cancel()
            await asyncio.gather(averaging, return_exceptions=True)
        p = self.progress
        p.step = self.head.epoch
        await self.head.run(self.save_checkpoint)
        if p.completed != p.issued or len(self._done) != p.completed:
            raise TrainingError(
                f"issued {p.issued} micro-batches but completed {p.completed} ({len(self._done)} distinct)"
            )
        return p

    def stop(self) -> None:
        """Stop issuing micro-batches (thread-safe); those in flight finish."""
        from swarm.client.loop import get_loop

        get_loop().call_soon_threadsafe(self._stop.set)

    def train(self, on_progress: Callable[[Progress], None] = lambda p: None) -> Progress:
        return run_sync(self.run(on_progress))

    async def _join_head(self) -> None:
        """Serve the head's AveragingService and join the trainers' collaboration: take the state of
        trainers already at work (bounded; on failure the leader brings us in line later)."""
        collab = self.head.collaboration
        if self._server is None:
            servicer = AveragingServicer()
            servicer.collaborations[collab.run_id] = collab
            self._server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[ParseRequests()])
            swarm_pb2_grpc.add_AveragingServiceServicer_to_server(servicer, self._server)
            me = str(self.dht.peer_id)
            certificate = tls.NodeCertificate.generate(me) if self.cfg.tls else None
            if certificate is None:
                port = self._server.add_insecure_port(f"{self.cfg.host}:0")
            else:
                port = self._server.add_secure_port(f"{self.cfg.host}:0", certificate.server_credentials())
            await self._server.start()
            collab.membership = DHTMembership(
                self.dht,
                self.identity,
                collab.run_id,
                me,
                f"{self.cfg.host}:{port}",
                certificate.sha256 if certificate is not None else None,
            )
        assert collab.membership is not None
        try:
            await collab.membership.publish()  # so trainers starting together see each other at once
            collab.members = await collab.membership.members()
            if collab.live_mates():
                await collab.catch_up(min(collab.live_mates()))
        except SwarmError as e:
            log.warning(
                "could not take the other trainers' state (%s); starting at step %d", e, self.head.epoch
            )

    def shutdown(self) -> None:
        try:
            run_sync(self.swarm_map.close(), timeout=10)
            run_sync(self.pool.close(), timeout=10)
            if self._server is not None:
                run_sync(self._server.stop(grace=1), timeout=10)
        finally:
            self.head.shutdown()
