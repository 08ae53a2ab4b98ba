"""Keeping the peers of a training collaboration identical: synchronous, bounded, leader-led averaging.

A collaboration is the peers that train the same weights: the nodes of one stage, or the trainers
of one model (their "head": embeddings, final norm, LM head). Each peer accumulates the gradients
of the requests it serves (gradient x samples, summed). The member with the smallest peer id
leads (pure `choose_leader`): mates Report their progress to it after every request; once the
collaboration holds `target_batch_size` samples, the leader Collects every live mate's sums,
averages them weighted by samples, steps, and sends the average to every contributor to Apply.
Every peer then runs the same AdamW step on the same numbers, so the weights stay bitwise equal
and an optimizer step sees exactly the gradients of the samples it closed: none lost, none twice.

Why not hivemind.Optimizer (which this replaced): at this scale (an epoch every second or two)
its matchmaking missed ("could not find a group") or half-finished rounds, peers stepped alone
on half a batch, fell behind and reloaded state, and the swarm learned 0.47 nats/byte worse than
one process. Here every call has a deadline: a mate that does not answer a Collect within
`round_timeout` is left out of that round (its gradients stay with it for the next), a leader that
does not answer for `leader_timeout` is passed over for the next smallest id, a peer that finds
itself behind downloads the leader's state (weights, moments, epoch) through the one retry
policy. Nothing waits forever, and nobody's compute waits for a round: gradients that arrive
during one count towards the next step.

Threads: `accumulate` runs on the caller's compute thread; every change of the weights runs
through `exclusive` (the compute thread too), the rest on the event loop.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from swarm.errors import ConfigError
from swarm.training.diloco import AVERAGING_CODECS, AVERAGING_MODES, OuterState
from swarm.training.stages import warmup_factor

log = logging.getLogger("swarm.training")
T = TypeVar("T")
Exclusive = Callable[[Callable[[], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class AveragingConfig:
    target_batch_size: int  # samples per optimizer step, over the whole collaboration
    lr: float
    weight_decay: float = 0.01
    warmup_steps: int = 10
    round_timeout: float = 5.0  # one Collect or Apply; a mate slower than this sits the round out
    leader_timeout: float = 3.0  # a leader silent this long is passed over
    suspect_seconds: float = 30.0  # ... for this long
    state_timeout: float = 60.0  # one state download
    report_period: float = 0.5  # a mate reports at least this often (and after every request)
    fresh_seconds: float = 3.0  # a mate's report older than this does not count towards a round
    mode: str = "gradients"  # or "diloco": inner AdamW per peer, outer Nesterov step every outer_every
    outer_every: int = 6  # diloco: steps between outer steps (25x fewer bytes at +0.08, benchmarks.md)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str = "none"  # averaging payloads: "none" (float32) or "int8" (blockwise, with error feedback)

    def __post_init__(self) -> None:
        for name in ("target_batch_size", "lr", "round_timeout", "leader_timeout", "state_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("suspect_seconds", "report_period", "fresh_seconds", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mode not in AVERAGING_MODES:
            raise ConfigError(f"averaging must be one of {AVERAGING_MODES}, got {self.mode!r}")
        if self.codec not in AVERAGING_CODECS:
            raise ConfigError(f"averaging codec must be one of {AVERAGING_CODECS}, got {self.codec!r}")
        if self.outer_every < 1 or self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ConfigError(
                f"outer_every must be >= 1, outer_lr > 0 and outer_momentum in [0, 1), got "
                f"{self.outer_every}, {self.outer_lr} and {self.outer_momentum}"
            )

    @property
    def diloco(self) -> bool:
        return self.mode == "diloco"


# ---- pure decisions ---------------------------------------------------------------------------


def choose_leader(
    me: str, members: Iterable[str], suspected: dict[str, float], follow: tuple[str, float] | None, now: float
) -> str:
    """Whom this peer follows: a leader it was told to follow (until that expires), else the smallest
    peer id among the members (and itself) that it does not suspect."""
    alive = {m for m in members if suspected.get(m, -math.inf) <= now} | {me}
    if follow is not None and follow[1] > now and follow[0] in alive:
        return follow[0]
    return min(alive)


def weighted_mean(contributions: list[tuple[list[torch.Tensor], int]]) -> list[torch.Tensor]:
    """Sum of (gradient x samples) sums over contributions, divided by their total samples."""
    total = sum(n for _, n in contributions)
    if total <= 0:
        raise ValueError("no samples to average")
    sums = [t.clone() for t in contributions[0][0]]
    for tensors, _ in contributions[1:]:
        for s, t in zip(sums, tensors, strict=True):
            s.add_(t)
    return [s.div_(total) for s in sums]


def weights_fingerprint(params: Iterable[torch.Tensor]) -> list[float]:
    """Each tensor's sum of squares, in float64: equal for equal weights, apart for diverged ones."""
    return [float(p.detach().double().square().sum()) for p in params]


def same_weights(a: list[float], b: list[float], rel: float = 1e-7) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True)
    )


# ---- the accumulator --------------------------------------------------------------------------


class Accumulator:
    """Thread-safe sums of (gradient x samples) towards the next step, in float32 on the CPU.

    `samples` weighs the mean; `counted` (what counts towards the target batch) leaves out the
    samples of micro-batches that came after their own step closed: they join the next step's
    gradient without moving its boundary, which stays where the trainers put it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: list[torch.Tensor] | None = None
        self.samples = 0
        self.counted = 0

    def add(self, grads: list[torch.Tensor], samples: int, *, counts: bool = True) -> int:
        """Add one request's gradients; the samples counted towards the target batch so far."""
        with self._lock:
            if self._sums is None:
                self._sums = [g.detach().to("cpu", torch.float32) * samples for g in grads]
            else:
                for s, g in zip(self._sums, grads, strict=True):
                    s.add_(g.detach().to("cpu", torch.float32), alpha=samples)
            self.samples += samples
            self.counted += samples if counts else 0
            return self.counted

    def take(self) -> tuple[list[torch.Tensor] | None, int]:
        with self._lock:
            sums, samples = self._sums, self.samples
            self._sums, self.samples, self.counted = None, 0, 0
            return sums, samples

    def put_back(self, sums: list[torch.Tensor] | None, samples: int) -> None:
        if sums is None:
            return
        with self._lock:
            if self._sums is None:
                self._sums = sums
            else:
                for s, t in zip(self._sums, sums, strict=True):
                    s.add_(t)
            self.samples += samples
            self.counted += samples


# ---- the optimizer state ----------------------------------------------------------------------


class LocalState:
    """The weights this peer trains, their AdamW and the epoch (optimizer steps so far)."""

    HISTORY = 256  # epochs of fingerprints kept

    def __init__(self, params: list[torch.nn.Parameter], cfg: AveragingConfig) -> None:
        self.params, self.cfg = params, cfg
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.outer = OuterState(params, cfg.outer_lr, cfg.outer_momentum) if cfg.diloco else None
        self.epoch = 0
        # Inner steps taken since the weights were last the stage's common ones (diloco: each peer
        # steps on its own gradients between outer steps; averaged gradients keep peers equal).
        self.inner_steps = 0
        self.fingerprints: OrderedDict[int, list[float]] = OrderedDict()
        self.note_epoch()

    def shared_epoch(self) -> int | None:
        """The epoch whose common stage weights this peer holds now, or None when its weights are
        its own (diloco, between outer steps): what a spot check of stage peers must compare."""
        return self.epoch if self.outer is None or self.inner_steps == 0 else None

    def step(self, grads: list[torch.Tensor] | None) -> list[float]:
        """One AdamW step on `grads` (the collaboration's averaged gradient, or with diloco this
        peer's own; None: no samples, only the epoch moves on); call exclusively."""
        if grads is not None:
            self.inner_step(grads)
        if self.outer is None:
            self.inner_steps = 0  # an averaged step: the stage's weights again
        self.epoch += 1
        return self.note_epoch()

    def inner_step(self, grads: list[torch.Tensor]) -> None:
        """The AdamW step alone, the epoch unchanged; call exclusively."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * warmup_factor(self.cfg.warmup_steps, self.epoch)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.to(p.device, p.dtype)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.inner_steps += 1

    def outer_step(self, mean_delta: list[torch.Tensor]) -> list[float]:
        """diloco: the outer Nesterov step on the stage's mean delta, which closes the epoch; call
        exclusively (after this peer's own inner step of the epoch)."""
        assert self.outer is not None, "outer_step needs --averaging diloco"
        self.outer.step(mean_delta)
        self.inner_steps = 0
        self.epoch += 1
        return self.note_epoch()

    def note_epoch(self) -> list[float]:
        fingerprint = weights_fingerprint(self.params)
        self.fingerprints[self.epoch] = fingerprint
        while len(self.fingerprints) > self.HISTORY:
            self.fingerprints.popitem(last=False)
        return fingerprint

    def tensors(self) -> dict[str, torch.Tensor]:
        """Copies of everything a peer needs to take over: "param.I", "exp_avg.I", ... (with diloco
        the weights are the anchor, plus "anchor.I" and "outer_velocity.I"); call exclusively."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            weights = p.detach() if self.outer is None else self.outer.anchor[i]
            out[f"param.{i}"] = weights.to("cpu", copy=True)
            state = self.optimizer.state.get(p, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in state:
                    out[f"{name}.{i}"] = torch.as_tensor(state[name]).detach().to("cpu", copy=True)
        if self.outer is not None:
            out.update(self.outer.tensors())
        return out

    def load_tensors(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take over the state `tensors()` produced elsewhere; call exclusively."""
        missing = [f"param.{i}" for i in range(len(self.params)) if f"param.{i}" not in tensors]
        if missing:
            raise ConfigError(f"the downloaded state lacks {len(missing)} parameters ({missing[:3]}...)")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                src = tensors[f"param.{i}"]
                if src.shape != p.shape:
                    raise ConfigError(f"parameter {i}: downloaded {list(src.shape)}, here {list(p.shape)}")
                p.copy_(src.to(p.device, p.dtype))
                if f"exp_avg.{i}" in tensors:
                    self.optimizer.state[p] = {
                        "step": tensors[f"step.{i}"].to(torch.float32).reshape(()),
                        "exp_avg": tensors[f"exp_avg.{i}"].to(p.device, p.dtype),
                        "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device, p.dtype),
                    }
                else:
                    self.optimizer.state.pop(p, None)
        self.inner_steps = 0
        if self.outer is not None:  # the stage's last outer state: its anchor becomes our weights
            if "anchor.0" in tensors:
                self.outer.load_tensors(tensors)
            else:  # from a peer that averages gradients: start the outer state here
                self.outer = OuterState(self.params, self.cfg.outer_lr, self.cfg.outer_momentum)
        self.epoch = epoch
        self.note_epoch()

    def state_dict(self) -> dict[str, Any]:
        out = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict()}
        if self.outer is not None:
            out["outer"] = self.outer.tensors()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.outer is not None and "outer" in state:
            with torch.no_grad():  # the weights stay as saved: inner progress since the anchor is kept
                for i, a in enumerate(self.outer.anchor):
                    a.copy_(state["outer"][f"anchor.{i}"])
                    self.outer.velocity[i].copy_(state["outer"][f"outer_velocity.{i}"])
        elif self.outer is not None:
            self.outer = OuterState(self.params, self.cfg.outer_lr, self.cfg.outer_momentum)
        self.epoch = int(state["epoch"])
        self.inner_steps = 0 if self.outer is None else 1  # saved weights may hold inner progress
        self.note_epoch()
