"""Benchmark SWARM training: random wiring vs a fixed pipeline with a slow peer, under failures, and
whether slow or idle stage-mates stall the averaging rounds.

    python bench/training.py [--only pipelines|stalls] [--phase-seconds 30] [--reps 2]
                             [--kill-every 10] [--stall-steps N] [--out FILE.json]

One local swarm, in one run: real `swarm-node join --train` processes on 127.0.0.1 serving a
byte-level Llama (4 blocks, hidden 256, intermediate 688, 8 heads, 4 KV heads, vocab 256, float32
on the CPU, random weights from the config) cut into 2 stages of 2 blocks, 2 peers per stage, each
node on one torch thread. One trainer in this process (swarm.training.trainer.Trainer: embeddings
and LM head here, blocks on the swarm) streams micro-batches of 8 sequences x 128 bytes, 8 in
flight, int8 activations and gradients on the wire. Every phase is one Trainer run: it stops
issuing after `--phase-seconds` (in (c): after a fixed number of optimizer steps) and the
micro-batches in flight finish, so samples/s = samples completed / wall time of the whole run, the
drain included. Each run must complete every micro-batch it issued (the Trainer checks; so does this
script). A first run of each part is not counted: it warms the nodes and the trainer up. The
default runs everything; `--only pipelines` runs (a) and (b), `--only stalls` runs (c); the
results file is read, the parts that ran are replaced in it, and it is written back.

(a) heterogeneity: one of the two stage-1 peers runs with `--slowdown 4` (every batch it computes
    takes 4x as long: a 1/4-speed device, which its measured throughput in the DHT shows).
      random      SWARM: every micro-batch draws its own route (TrainerConfig(wiring="random")),
                  in proportion to throughput / (1 + this trainer's micro-batches in flight there);
      fixed-slow  the baseline: every micro-batch through the same peers (wiring="fixed"), the slow
                  stage-1 peer among them;
    alternating `--reps` times; the ratio of their means is the headline (target >= 1.5). Then once
      fixed-fast  a fixed pipeline through the fast stage-1 peer: the best a fixed pipeline can do,
    so that the expected speed of a pipeline fixed at random (each stage-1 peer with probability
    1/2) is reported as well.
    Choosing the fixed route: the Trainer offers no way to name it. It draws it once, with
    throughput_weighted_route over the swarm map (servers sorted by peer id, nothing in flight yet)
    and random.Random(TrainerConfig.seed): a pure function of the map and the seed. So just before
    each fixed run this script reads the same map and takes the first seed whose draw goes through
    the slow peer (or the fast one) even with every announced throughput halved or doubled (nodes
    re-announce their measured figure every 30 s); the map is read again after the run and the
    draw checked once more (route_checked). fixed-slow slower than fixed-fast confirms it again.
    The nodes of (a) are started with a fixed --stage, so none of them moves during (a).

(b) failures: the slow peer leaves (SIGTERM: it announces itself offline) and a normal peer joins
    with `--stage auto`, which puts it on stage 1, now the least served (rebalancing). Then, random
    wiring in both:
      steady      no failures;
      kills       every `--kill-every` s one peer is SIGKILLed (stage 1 first, then the stages
                  alternate, the oldest peer of a stage with two) and a replacement is started at
                  once with `--stage auto` (peers that do not answer a health check do not count,
                  so it joins the stage that lost a peer); starts run in the background, so the
                  kills keep their pace.
    Inside the measured time, on the same CPUs: the replacements' start (Python, torch, the DHT
    daemon, measuring throughput, loading the stage's state from its mate), the re-sent
    micro-batches (hops whose peer died, re-run on the other peer of the stage).

    Optimizer steps in (a) and (b): by default `--target-batch-size` is never reached, so these
    runs measure the pipelines (forward, backward, gradients accumulated on every peer) and no
    averaging round falls into them. (c) measures the rounds.

(c) averaging stalls: fresh nodes of a model of its own (same architecture, another name, so no
    record of (a) or (b) is in the way) with `--target-batch-size` = `--stall-target-batch-size`
    (64: a step every 8 micro-batches), the trainer likewise and synchronous (TrainerConfig's
    default when it is the only trainer): it tags each micro-batch with its step
    (RequestHeader.min_epoch), so every step drains the pipeline and a node computes the next
    step's micro-batches only once its stage has stepped. A stage's round (its leader, the smallest
    peer id, Collects every live mate's gradients, steps, sends each the average to Apply) then
    lies on the critical path of every step: a mate that made rounds wait would show at once.
    Stage 0 keeps two normal peers; stage 1 has a normal peer (the one measured) and
      pair        a second normal peer (random wiring);
      slow mate   a second peer with `--slowdown 4` (random wiring: it gets a small share);
      alone       no second peer (it was stopped with SIGTERM);
      idle mate   a second normal peer that gets no traffic: wiring="fixed" through the normal
                  peer (chosen as in (a); one stage-0 peer is then idle as well).
    Each rep runs the four in that order and the next rep in the reverse order (ABBA), so slow
    mate and idle mate always run next to alone. In even reps the second peer leads stage 1 (its
    peer id is the smaller), in odd reps the normal peer does. Peer ids are random, so the roles
    are chosen rather than forced: of two normal peers either can be "the normal peer" (the one
    measured, which stays for alone), and a slow peer is started while two normal peers run,
    the one on the wanted side of its peer id staying (StageOne). Before each run this script
    waits until both peers of stage 1 follow the expected leader at the same epoch (settled).
    Every run is a whole number of optimizer steps, `--stall-steps` (default: as many as the
    warm-up's pace fits in `--phase-seconds`), the same for every run, capped at 4x
    `--phase-seconds`: a run stopped by time would end mid-step, and the next trainer (which
    resumes from trainer.pt: step, data position, head weights) would start with its head's
    partial step lost while the stages keep theirs, so the stages would step ahead of the
    trainer's min_epoch tags and the rounds would fall off the critical path. The run's record
    says whether the stages and the trainer began at the same step (aligned).
    Stage 1's epoch is sampled every 0.2 s from the normal peer by an AveragingService Report of no
    samples from a sender that is no member of the stage: the node answers on its event loop with
    its leader and epoch, and files the report where no round counts it (rounds count members only).
    (GetState would copy the stage's weights on the compute thread, queued behind the
    micro-batches.) Per run: stage-1 steps/s = steps / (the run's wall time, or until stage 1's last
    step if that came later), samples/s, the largest gap between consecutive steps of stage 1 (to
    0.2 s), and the lag of stage 1's k-th step behind the completion of the trainer's k-th step's
    last micro-batch (median/max): a slow round shows in the lag, slow compute (a straggler
    micro-batch on the slow peer, which every synchronous step waits for) does not. The claim under
    test: a slow or idle peer never stalls its stage-mates by more than one round per step, so slow
    mate / alone and idle mate / alone should be close to 1 (or above); the last line printed gives
    the four steps/s and these two ratios.

(d) slow link (`--only slowlink`, not in the default run; needs root, `ip` and `tc`): a network
    namespace joined to the root one by a veth pair shaped on both ends with tc's tbf to
    `--slow-rate` (10mbit; this kernel has no netem). Per averaging mode a fresh swarm of a model
    of its own: stage 0 two peers and stage 1 one peer on the root side (listening on the veth's
    address), one stage-1 mate inside the namespace, all with `--averaging gradients` (float32),
    or all with `--averaging diloco --outer-every --slow-outer-every --averaging-codec int8`; a
    step every `--stall-target-batch-size` samples, one synchronous trainer (as in (c)) for
    `--phase-seconds`. Modes alternate over `--reps` (ABBA); samples/s of each and their ratio
    go to `slow_link` in the results file, and the last line reads
        slow link: one stage-1 mate behind RATE (tc tbf), samples/s gradients G, diloco H=8 int8 D (Rx), ...

After the swarm is stopped the node logs (under --workdir, a temporary directory by default) are
scanned for ERROR, CRITICAL and Traceback lines: a normal run has none.
Every process started here is stopped again (by PID, LocalSwarm), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import grpc
import torch

import swarm
from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.loop import run_sync
from swarm.coordinator.routing import SwarmMap, throughput_weighted_route
from swarm.coordinator.swarm_map import fetch_swarm_map
from swarm.dht import DHT, start_dht
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.records import NodeIdentity
from swarm.training.data import VOCAB_SIZE, DataConfig
from swarm.training.stages import run_id
from swarm.training.trainer import Progress, Trainer, TrainerConfig

MODEL = "bench-byte-llama"
STALL_MODEL = "bench-byte-llama-stalls"  # (c): a model of its own, fresh records and collaborations
SLOW_MODEL = "bench-byte-llama-slowlink"  # (d): one per run (each run starts a fresh swarm)
HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
NUM_BLOCKS = 4
NUM_STAGES = 2
SLOWDOWN = 4.0
RATIO_TARGET = 1.5  # random / fixed-slow
LR, WARMUP_STEPS = 1e-3, 5
NO_STEP = 1_000_000  # a target batch size no run reaches
Wiring = Literal["random", "fixed"]
During = Callable[[Future[tuple[Progress, float]], float], list[dict[str, Any]]]


@dataclass
class Phase:
    scenario: str  # warmup | heterogeneity | failures | stalls-warmup | stalls
    label: str  # random | fixed-slow | fixed-fast | steady | kills | pair | slow mate | alone | idle mate
    rep: int
    wiring: str
    seed: int
    at_s: float  # when the run began, in seconds since the benchmark began
    seconds: float  # wall time of Trainer.train, the drain of the last micro-batches included
    samples: int
    samples_per_s: float
    issued: int
    completed: int
    resent: int  # completed micro-batches that needed another peer for some hop
    head_steps: int  # optimizer steps of the trainer's head during the run
    loss_first: float
    loss_last: float  # mean of the last 10 micro-batches
    max_gap_s: float  # longest wait for the next completed micro-batch (a stall shows here)
    loadavg: float  # 1-minute load average at the end: ~5 from this benchmark alone; more is foreign work
    route: list[str] = field(default_factory=list)  # fixed wiring: the nodes of the route drawn
    route_checked: bool | None = None  # fixed wiring: the map after the run draws the same route
    kills: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, samples) per micro-batch


@dataclass
class Bench:
    args: argparse.Namespace
    local: LocalSwarm
    config_dir: Path  # <dir>/<model name>/config.json: the nodes' and the trainer's --model
    dht: DHT
    identity: NodeIdentity
    target_batch_size: int  # samples per optimizer step, nodes and trainer
    trainer_dir: Path | None = None  # the trainer's checkpoint_dir: each run resumes the previous one
    head_epoch: int = 0  # the trainer head's optimizer steps so far (where the next run resumes)
    nodes: list[NodeProcess] = field(default_factory=list)  # training nodes started here, in order
    began: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return self.config_dir.name

    # ---- nodes ----------------------------------------------------------------------------------

    def start_node(self, stage: int | Literal["auto"], name: str, *extra: str) -> NodeProcess:
        train = [
            *("--train", "--num-stages", str(NUM_STAGES), "--stage", str(stage)),
            *("--target-batch-size", str(self.target_batch_size), "--lr", str(LR)),
            *("--warmup-steps", str(WARMUP_STEPS), "--device", "cpu"),
        ]
        node = self.local.start_node(self.config_dir, None, *train, *extra, name=name)
        self.nodes.append(node)
        return node

    def info(self, node: NodeProcess) -> dict[str, Any]:
        """The node's latest ready facts: a --stage auto node that moves restarts (same PID) and
        writes its ready file again, with its new stage and peer id."""
        ready = self.local.workdir / f"{node.name}.ready.json"
        try:
            info: dict[str, Any] = json.loads(ready.read_text())
        except (OSError, ValueError):
            return node.info
        return info

    def live(self, stage: int) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc.poll() is None and self.info(n)["stage"] == stage]

    def name_of(self, peer_id: str) -> str:
        return next((n.name for n in self.nodes if self.info(n)["peer_id"] == peer_id), peer_id[-8:])

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                self.local.stop(node, signal.SIGTERM)

    def training_map(self) -> SwarmMap:
        snapshot = run_sync(fetch_swarm_map(self.dht, self.model, NUM_BLOCKS))
        return replace(snapshot, servers=tuple(s for s in snapshot.servers if s.trainable_stage is not None))

    # ---- one trainer run ------------------------------------------------------------------------

    def trainer(self, wiring: Wiring, seconds: float, seed: int, steps: int | None) -> Trainer:
        args = self.args
        cfg = TrainerConfig(
            model=str(self.config_dir),
            steps=NO_STEP if steps is None else self.head_epoch + steps,  # else max_seconds ends the run
            micro_batch_size=args.micro_batch_size,
            in_flight=args.in_flight,
            target_batch_size=self.target_batch_size,
            lr=LR,
            warmup_steps=WARMUP_STEPS,
            seed=seed,
            codec=args.codec,
            wiring=wiring,
            max_seconds=seconds,
            checkpoint_dir=self.trainer_dir,
            data=DataConfig(seq_len=args.seq_len + 1, max_bytes=8 << 20),
        )
        # Built here, on the main thread. One DHT peer and identity for every run: the head
        # collaboration's membership entry of an earlier run is then this trainer's own, not a
        # stale mate that a new trainer would try to catch up with.
        return Trainer(cfg, self.dht, self.identity)

    def run(
        self,
        scenario: str,
        label: str,
        rep: int,
        wiring: Wiring,
        seconds: float,
        seed: int = 0,
        during: During | None = None,
        steps: int | None = None,
    ) -> Phase:
        """One Trainer run of `seconds`, or of `steps` optimizer steps (then `seconds` is a cap);
        `during(future, started)` runs beside it on this thread (the kills, the step sampling)."""
        trainer = self.trainer(wiring, seconds, seed, steps)
        kills: list[dict[str, Any]] = []

        def train() -> tuple[Progress, float]:
            progress = trainer.train()
            return progress, time.monotonic()

        try:
            epoch = trainer.head.epoch
            started = time.monotonic()
            with ThreadPoolExecutor(1, thread_name_prefix="bench-train") as pool:
                future = pool.submit(train)
                try:
                    if during is not None:
                        kills = during(future, started)
                except BaseException:
                    trainer.stop()
                    raise
                progress, finished = future.result()
            self.head_epoch = trainer.head.epoch
            head_steps = trainer.head.epoch - epoch
        finally:
            trainer.shutdown()
        if progress.issued != progress.completed:
            raise AssertionError(f"{label}: issued {progress.issued} but completed {progress.completed}")
        wall = finished - started
        shift = progress.started - started  # the trainer's clock starts once it has joined its head
        stamps = [t + shift for t, _, _ in progress.losses]
        losses = [loss for _, _, loss in progress.losses]
        return Phase(
            scenario=scenario,
            label=label,
            rep=rep,
            wiring=wiring,
            seed=seed,
            at_s=started - self.began,
            seconds=wall,
            samples=progress.samples,
            samples_per_s=progress.samples / wall,
            issued=progress.issued,
            completed=progress.completed,
            resent=progress.resent,
            head_steps=head_steps,
            loss_first=losses[0] if losses else float("nan"),
            loss_last=statistics.fmean(losses[-10:]) if losses else float("nan"),
            max_gap_s=max(b - a for a, b in itertools.pairwise([0.0, *stamps])) if stamps else wall,
            loadavg=os.getloadavg()[0],
            kills=kills,
            timeline=[(round(t, 2), n) for t, (_, n, _) in zip(stamps, progress.losses, strict=True)],
        )


# ---- (d) a stage-mate on a slow link: gradient averaging vs DiLoCo ----------------------------------


class HostSwarm(LocalSwarm):
    """A LocalSwarm whose DHT peer listens on a given address (the veth's) instead of 127.0.0.1."""

    def start_dht_on(self, host: str) -> NodeProcess:
        node = self._start("dht", ["dht", "--host", host, "--port", "0"])
        self.initial_peers = list(node.info["maddrs"])
        return node


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def slow_link_unavailable() -> str:
    """Why (d) cannot run here, or "" if it can."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"`{missing[0]}` not found" if missing else ""


@contextlib.contextmanager
def slow_namespace(rate: str) -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to the root one by a veth pair, both ends shaped by tc's tbf to
    `rate` (netem is missing from this kernel; tbf works). Yields (namespace, root-side address,
    namespace-side address); removes both on exit."""
    tag = f"swt{os.getpid()}"
    ns, outer, inner = tag, f"{tag}a", f"{tag}b"
    subnet = f"10.214.{os.getpid() % 250}"
    root_addr, ns_addr = f"{subnet}.1", f"{subnet}.2"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        _run("ip", "addr", "add", f"{root_addr}/30", "dev", outer)
        _run("ip", "link", "set", outer, "up")
        inside = ("ip", "netns", "exec", ns)
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{ns_addr}/30", "dev", inner)
        _run(*inside, "ip", "link", "set", inner, "up")
        tbf = ("root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        _run("tc", "qdisc", "add", "dev", outer, *tbf)
        _run(*inside, "tc", "qdisc", "add", "dev", inner, *tbf)
        yield ns, root_addr, ns_addr
    finally:
        _run("ip", "link", "del", outer, check=False)  # deletes both ends of the pair
        _run("ip", "netns", "del", ns, check=False)


def slow_link_flags(mode: str, outer_every: int) -> list[str]:
    if mode == "diloco":
        return ["--averaging", "diloco", "--outer-every", str(outer_every), "--averaging-codec", "int8"]
    return ["--averaging", "gradients", "--averaging-codec", "none"]


def slow_link_run(
    args: argparse.Namespace, workdir: Path, mode: str, rep: int, net: tuple[str, str, str]
) -> Phase:
    """A fresh swarm (a model name of its own): stage 0 two peers, stage 1 a peer and a mate in the
    slow namespace, every node averaging with `mode`; one synchronous trainer run of --phase-seconds."""
    ns, root_addr, ns_addr = net
    env = {"OMP_NUM_THREADS": str(args.node_threads)}
    config_dir = model_dir(workdir, f"{SLOW_MODEL}-{mode}-{rep}")
    root = HostSwarm(workdir / f"{mode}-{rep}-root", env=env)
    with (
        root,
        LocalSwarm(
            workdir / f"{mode}-{rep}-ns", env=env, command_prefix=("ip", "netns", "exec", ns)
        ) as inside,
    ):
        root.start_dht_on(root_addr)
        inside.initial_peers = root.initial_peers
        identity = NodeIdentity.generate()
        dht = start_dht(initial_peers=root.initial_peers, host=root_addr, identity=identity)
        try:
            b = Bench(args, root, config_dir, dht, identity, args.stall_target_batch_size)
            flags = [*slow_link_flags(mode, args.slow_outer_every), "--averaging-timeout", "10"]
            for i, stage in enumerate((0, 0, 1)):
                b.start_node(stage, f"{mode}-{rep}-{i}", *flags, "--host", root_addr)
            train = [
                *("--train", "--num-stages", str(NUM_STAGES), "--stage", "1"),
                *("--target-batch-size", str(args.stall_target_batch_size), "--lr", str(LR)),
                *("--warmup-steps", str(WARMUP_STEPS), "--device", "cpu"),
            ]
            b.nodes.append(
                inside.start_node(config_dir, None, *train, *flags, "--host", ns_addr, name="slow-mate")
            )
            phase = b.run("slow-link", mode, rep, "random", args.phase_seconds)
        finally:
            dht.shutdown()
    return phase


def slow_link(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    """(d): samples/s of the swarm with a stage-1 mate behind --slow-rate, gradients vs diloco, in turn."""
    if reason := slow_link_unavailable():
        return {"ran": False, "reason": reason}, f"slow link: not run ({reason})"
    phases: list[Phase] = []
    with slow_namespace(args.slow_rate) as net:
        for rep in range(args.reps):
            for mode in ("gradients", "diloco") if rep % 2 == 0 else ("diloco", "gradients"):
                phases.append(report(slow_link_run(args, workdir, mode, rep, net)))
    rates = {
        m: statistics.fmean(p.samples_per_s for p in phases if p.label == m) for m in ("gradients", "diloco")
    }
    ratio = rates["diloco"] / rates["gradients"]
    results = {
        "ran": True,
        "rate": args.slow_rate,
        "outer_every": args.slow_outer_every,
        "target_batch_size": args.stall_target_batch_size,
        "samples_per_s": rates,
        "ratio": ratio,
        "runs": [asdict(p) for p in phases],
    }
    headline = (
        f"slow link: one stage-1 mate behind {args.slow_rate} (tc tbf), samples/s gradients "
        f"{rates['gradients']:.1f}, diloco H={args.slow_outer_every} int8 {rates['diloco']:.1f} "
        f"({ratio:.2f}x), {args.reps} run(s) each"
    )
    return results, headline


# ---- (a) heterogeneity ----------------------------------------------------------------------------


def fixed_draw(swarm_map: SwarmMap, seed: int) -> list[str]:
    """Peer ids of the route a Trainer with wiring="fixed" and this seed draws first."""
    return [hop.peer_id for hop in throughput_weighted_route(swarm_map, rng=random.Random(seed))]


def fixed_seed(swarm_map: SwarmMap, through: str) -> int:
    """The first seed whose fixed route goes through peer `through`, also with any announced
    throughput halved or doubled."""
    online = replace(swarm_map, servers=tuple(swarm_map.online()))  # the only ones a route draws from
    if len(online.servers) != 2 * NUM_STAGES:
        raise RuntimeError(f"expected {2 * NUM_STAGES} training peers, the map has {online.servers}")
    variants = [
        replace(
            online,
            servers=tuple(
                s.model_copy(update={"throughput": s.throughput * f})
                for s, f in zip(online.servers, factors, strict=True)
            ),
        )
        for factors in itertools.product((0.5, 1.0, 2.0), repeat=len(online.servers))
    ]
    for seed in range(1, 10_000):
        if all(through in fixed_draw(v, seed) for v in variants):
            return seed
    raise RuntimeError(f"no seed below 10000 routes through {through} robustly")


def fixed_run(bench: Bench, scenario: str, label: str, rep: int, through: NodeProcess, **run: Any) -> Phase:
    """A wiring="fixed" run whose route goes through `through` (see the module docstring)."""
    peer = bench.info(through)["peer_id"]
    seed = fixed_seed(bench.training_map(), peer)
    route = fixed_draw(bench.training_map(), seed)
    phase = bench.run(scenario, label, rep, "fixed", seed=seed, **run)
    phase.route = [bench.name_of(p) for p in route]
    phase.route_checked = peer in route and fixed_draw(bench.training_map(), seed) == route
    return phase


def heterogeneity(bench: Bench) -> list[Phase]:
    args = bench.args
    bench.start_node(0, "s0-a")
    fast = bench.start_node(1, "s1-fast")
    bench.start_node(0, "s0-b")
    slow = bench.start_node(1, "s1-slow", "--slowdown", f"{SLOWDOWN:g}")
    phases = [report(bench.run("warmup", "random", 0, "random", args.warmup_seconds))]
    for rep in range(args.reps):
        phases.append(report(bench.run("heterogeneity", "random", rep, "random", args.phase_seconds)))
        phases.append(
            report(fixed_run(bench, "heterogeneity", "fixed-slow", rep, slow, seconds=args.phase_seconds))
        )
    phases.append(
        report(fixed_run(bench, "heterogeneity", "fixed-fast", 0, fast, seconds=args.phase_seconds))
    )
    return phases


# ---- (b) failures -----------------------------------------------------------------------------------


def failures(bench: Bench) -> tuple[list[Phase], dict[str, Any]]:
    args = bench.args
    slow = next(n for n in bench.nodes if n.name == "s1-slow")
    bench.local.stop(slow, signal.SIGTERM)
    began = time.monotonic()
    joined = bench.start_node("auto", "s1-new")
    rebalance = {
        "left": slow.name,
        "joined": joined.name,
        "joined_stage": joined.info["stage"],
        "start_s": time.monotonic() - began,
    }
    print(
        f"rebalance: {slow.name} left; {joined.name} joined with --stage auto -> stage "
        f"{joined.info['stage']} ({rebalance['start_s']:.1f} s to start)",
        flush=True,
    )
    phases = [report(bench.run("failures", "steady", 0, "random", args.phase_seconds))]
    with Killer(bench, args.kill_every, args.kill_seconds) as killer:
        phases.append(report(bench.run("failures", "kills", 0, "random", args.kill_seconds, during=killer)))
    return phases, rebalance


class Killer:
    """Beside a run: every `every` s SIGKILL one peer (of a stage that has two) and start a
    replacement with --stage auto in the background."""

    def __init__(self, bench: Bench, every: float, seconds: float) -> None:
        self.bench, self.every, self.seconds = bench, every, seconds
        self.starts = ThreadPoolExecutor(4, thread_name_prefix="bench-replacement")
        self.count = 0

    def __enter__(self) -> Killer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.starts.shutdown(wait=True)

    def __call__(self, future: Future[tuple[Progress, float]], started: float) -> list[dict[str, Any]]:
        kills: list[dict[str, Any]] = []
        pending: list[Future[tuple[NodeProcess, float]]] = []
        order = itertools.cycle(range(NUM_STAGES - 1, -1, -1))  # stage 1 first, then alternate
        for k in itertools.count(1):
            due = started + k * self.every
            if due > started + self.seconds - 1:  # the run stops issuing then
                break
            if wait([future], timeout=max(0.0, due - time.monotonic())).done:
                break
            first = next(order)
            stages = [first, *(s for s in range(NUM_STAGES) if s != first)]
            victim = next((live[0] for s in stages if len(live := self.bench.live(s)) >= 2), None)
            if victim is None:
                at = time.monotonic() - started
                kills.append({"at_s": at, "skipped": "no stage has two live peers"})
                print(f"  no kill at {at:5.1f} s: no stage has two live peers yet", flush=True)
                continue
            stage = self.bench.info(victim)["stage"]
            killed_at = time.monotonic()
            self.bench.local.stop(victim, signal.SIGKILL)
            self.count += 1
            name = f"replacement-{self.count}"
            pending.append(self.starts.submit(self._replace, name, killed_at))
            kills.append(
                {"at_s": killed_at - started, "victim": victim.name, "stage": stage, "replacement": name}
            )
            print(
                f"  kill at {killed_at - started:5.1f} s: {victim.name} (stage {stage}); starting {name}",
                flush=True,
            )
        for kill, start in zip([k for k in kills if "victim" in k], pending, strict=True):
            node, after = start.result()
            kill["replacement_stage"] = node.info["stage"]
            kill["replacement_ready_after_s"] = after
            print(
                f"  {node.name} joined stage {node.info['stage']}, ready {after:.1f} s after the kill",
                flush=True,
            )
        return kills

    def _replace(self, name: str, killed_at: float) -> tuple[NodeProcess, float]:
        node = self.bench.start_node("auto", name)
        return node, time.monotonic() - killed_at


# ---- (c) averaging stalls -------------------------------------------------------------------------

STALL_ORDER = ("pair", "idle mate", "alone", "slow mate")  # even reps; odd reps run it backwards
MATE_KIND: dict[str, str | None] = {
    "pair": "normal",
    "idle mate": "normal",
    "alone": None,
    "slow mate": "slow",
}
STALL_WARMUP_STEPS = 4  # the uncounted first run of (c), a pair
SAMPLE_EVERY = 0.2  # seconds between looks at stage 1's epoch
PROBE_SENDER = "bench-probe"  # no member of any collaboration
SETTLE_SECONDS = 20.0  # for the stage's peers to agree on leader and epoch, before and after a run


class EpochProbe:
    """(leader, epoch) of a training node's stage collaboration, by an AveragingService Report of
    no samples at epoch 0 from PROBE_SENDER: the node answers on its event loop; a leader files
    the report, which no round counts (rounds count members only), a follower just answers."""

    def __init__(self, info: dict[str, Any], collaboration: str) -> None:
        self.channel = tls.sync_channel(info["grpc_address"], info.get("tls_cert_sha256"))
        self.stub = swarm_pb2_grpc.AveragingServiceStub(self.channel)
        header = swarm_pb2.AveragingHeader(
            protocol_version=swarm.PROTOCOL_VERSION, run_id=collaboration, sender=PROBE_SENDER, epoch=0
        )
        self.request = swarm_pb2.ReportRequest(header=header, samples=0)

    def __call__(self) -> tuple[str, int] | None:
        try:
            reply = self.stub.Report(self.request, timeout=2.0)
        except grpc.RpcError:
            return None
        return reply.leader, int(reply.epoch)

    def close(self) -> None:
        self.channel.close()


class StepWatch:
    """Beside a run: stage 1's epoch every SAMPLE_EVERY s; after the run until it reaches `until`
    (its last round may close after the trainer's last micro-batch), for at most `settle` s."""

    def __init__(self, probe: EpochProbe, epoch: int, until: int, settle: float = SETTLE_SECONDS) -> None:
        self.probe, self.epoch, self.until, self.settle = probe, epoch, until, settle
        self.changes: list[tuple[float, int]] = []  # (seconds into the run, epoch) when it moved
        self.leaders: list[str] = []  # peer ids of the leaders it followed, in order

    def __call__(self, future: Future[tuple[Progress, float]], started: float) -> list[dict[str, Any]]:
        finished: float | None = None
        while finished is None or (self.epoch < self.until and time.monotonic() - finished < self.settle):
            if finished is not None:
                time.sleep(SAMPLE_EVERY)
            elif wait([future], timeout=SAMPLE_EVERY).done:
                finished = time.monotonic()
            answer = self.probe()
            if answer is not None and answer[0] not in self.leaders[-1:]:
                self.leaders.append(answer[0])
            if answer is not None and answer[1] != self.epoch:
                self.epoch = answer[1]
                self.changes.append((round(time.monotonic() - started, 2), self.epoch))
        return []


@dataclass
class StageSteps:
    """Stage 1's optimizer steps during one run of (c), as its normal peer reported them."""

    mate: str | None  # the second stage-1 peer
    leader: str  # the peer meant to lead stage 1 (the one with the smaller peer id)
    leaders: list[str]  # whom the normal peer followed during the run, in order: [leader]
    settled: bool  # before the run both stage-1 peers followed that leader, at one epoch
    aligned: bool  # the run began with stage 1 at the trainer's step
    epoch_before: int
    head_epoch_before: int  # the trainer's step as the run began (aligned: equal to epoch_before)
    epoch_after: int
    mate_epoch_after: int | None  # equal to epoch_after: the mate kept in step
    stage_steps: int
    stage_seconds: float  # the run's wall time, or until stage 1's last step if that came later
    steps_per_s: float
    first_step_s: float  # from the start of the run to stage 1's first step
    max_step_gap_s: float  # the longest time between two consecutive steps of stage 1 (to 0.2 s)
    # Stage 1's k-th step of the run after the trainer's k-th step's last micro-batch completed
    # (negative: before it; its backward passes stage 1 before stage 0 and the head): a round that
    # waits for a mate shows here, slow compute does not.
    max_step_lag_s: float
    median_step_lag_s: float
    capped: bool  # the run hit its time cap before its steps
    steps: list[tuple[float, int]]  # (seconds into the run, epoch) whenever stage 1's epoch moved


class StageOne:
    """Stage 1 of (c): the normal peer (the one measured) and the second peer, arranged per run.

    A peer id is random and the smaller one leads, so roles are chosen, not forced: normal peers
    are interchangeable, and which of two is "the normal peer" is picked to give the wanted role;
    a slow second peer is started while two normal peers run, and the one that stays is one on
    the wanted side of its peer id (the slow peer is started again if neither is, 1 in 3)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.collaboration = run_id(bench.model, 1)
        self.normals: list[NodeProcess] = []  # running normal stage-1 peers
        self.slow: NodeProcess | None = None
        self.normal: NodeProcess | None = None  # the measured one, among self.normals
        self.mate: NodeProcess | None = None  # the second peer: a normal one or self.slow
        self.probes: dict[str, EpochProbe] = {}
        self.starts = 0

    def peer(self, node: NodeProcess) -> str:
        return str(self.bench.info(node)["peer_id"])

    def probe(self, node: NodeProcess) -> EpochProbe:
        return self.probes[node.name]

    def leader(self) -> NodeProcess:
        assert self.normal is not None
        if self.mate is None:
            return self.normal
        return min(self.normal, self.mate, key=self.peer)

    def _start(self, kind: str) -> NodeProcess:
        self.starts += 1
        extra = ("--slowdown", f"{SLOWDOWN:g}") if kind == "slow" else ()
        node = self.bench.start_node(1, f"stalls-s1-{kind}-{self.starts}", *extra)
        self.probes[node.name] = EpochProbe(self.bench.info(node), self.collaboration)
        if kind == "slow":
            self.slow = node
        else:
            self.normals.append(node)
        return node

    def _stop(self, node: NodeProcess) -> None:
        self.bench.local.stop(node, signal.SIGTERM)
        self.probes.pop(node.name).close()
        if node is self.slow:
            self.slow = None
        else:
            self.normals.remove(node)

    def arrange(self, kind: str | None, leads: bool) -> None:
        """Stage 1 as a run needs it: the normal peer and a second peer of `kind` (None: none)
        that leads stage 1 (`leads`) or follows the normal peer."""
        mate: NodeProcess | None
        if kind == "slow":
            normal, mate = self._with_slow(leads)
        else:
            normal, mate = self._with_normals(kind is not None, leads)
        self.normal, self.mate = normal, mate
        role = "" if mate is None else f", {mate.name} {'leads' if leads else 'follows'}"
        print(f"  stage 1: {normal.name}{role}", flush=True)

    def _with_slow(self, leads: bool) -> tuple[NodeProcess, NodeProcess]:
        def fits(slow: NodeProcess, normal: NodeProcess) -> bool:
            return (self.peer(slow) < self.peer(normal)) == leads

        now, normal = self.slow, self.normal
        if now is not None and self.mate is now and normal is not None and fits(now, normal):
            return normal, now  # as it is
        if now is not None:
            self._stop(now)
        for _ in range(8):
            while len(self.normals) < 2:
                self._start("normal")
            slow = self._start("slow")
            stays = next((n for n in self.normals if fits(slow, n)), None)
            if stays is not None:
                for other in [n for n in self.normals if n is not stays]:
                    self._stop(other)
                return stays, slow
            self._stop(slow)
        raise RuntimeError("8 slow stage-1 peers in a row had the smallest or the largest peer id")

    def _with_normals(self, two: bool, leads: bool) -> tuple[NodeProcess, NodeProcess | None]:
        if self.slow is not None:
            self._stop(self.slow)
        while len(self.normals) < (2 if two else 1):
            self._start("normal")
        by_id = sorted(self.normals, key=self.peer)
        if two:  # the second peer leads: it has the smaller peer id
            return (by_id[1], by_id[0]) if leads else (by_id[0], by_id[1])
        keep = self.normal if self.normal in by_id else by_id[0]
        assert keep is not None
        for other in [n for n in by_id if n is not keep]:
            self._stop(other)
        return keep, None

    def settle(self) -> bool:
        """Wait until the stage-1 peers follow the expected leader at one epoch; False if they did
        not within SETTLE_SECONDS."""
        expected = self.peer(self.leader())
        peers = [n for n in (self.normal, self.mate) if n is not None]
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            answers = [self.probe(n)() for n in peers]
            if all(a is not None and a[0] == expected for a in answers) and len(set(answers)) == 1:
                return True
            time.sleep(SAMPLE_EVERY)
        return False

    def epoch(self, node: NodeProcess) -> int | None:
        answer = self.probe(node)()
        return None if answer is None else answer[1]

    def close(self) -> None:
        for probe in self.probes.values():
            probe.close()


StallRun = tuple[Phase, StageSteps]


def step_lags(
    timeline: list[tuple[float, int]], changes: list[tuple[float, int]], epoch: int, target: int
) -> list[float]:
    """For each step k of a synchronous run: when stage 1 reached epoch + k minus when the
    trainer had completed k * target samples (both in seconds into the run)."""
    lags: list[float] = []
    for k in itertools.count(1):
        done = next((t for t, n in timeline if n >= k * target), None)
        stepped = next((t for t, e in changes if e >= epoch + k), None)
        if done is None or stepped is None:
            return lags
        lags.append(round(stepped - done, 2))
    return lags


def stall_run(bench: Bench, one: StageOne, scenario: str, label: str, rep: int, steps: int) -> StallRun:
    """One run of `steps` optimizer steps, stage 1 as arranged for `label`."""
    normal = one.normal
    assert normal is not None, "arrange() first"
    settled = one.settle()
    epoch = one.epoch(normal)
    if epoch is None:
        raise RuntimeError(f"{normal.name} does not answer a Report")
    watch = StepWatch(one.probe(normal), epoch, epoch + steps)
    run: dict[str, Any] = {"seconds": 4 * bench.args.phase_seconds, "steps": steps, "during": watch}
    head_epoch = bench.head_epoch
    if label == "idle mate":
        phase = fixed_run(bench, scenario, label, rep, normal, **run)
    else:
        phase = bench.run(scenario, label, rep, "random", **run)
    one.settle()  # the stage's last Apply: the mate's epoch below is then final
    changes = watch.changes
    last = changes[-1][0] if changes else 0.0
    seconds = max(phase.seconds, last)
    stage_steps = watch.epoch - epoch
    lags = step_lags(phase.timeline, changes, epoch, bench.target_batch_size)
    stall = StageSteps(
        mate=one.mate.name if one.mate is not None else None,
        leader=one.leader().name,
        leaders=[bench.name_of(p) for p in watch.leaders],
        settled=settled,
        aligned=epoch == head_epoch,
        epoch_before=epoch,
        head_epoch_before=head_epoch,
        epoch_after=watch.epoch,
        mate_epoch_after=one.epoch(one.mate) if one.mate is not None else None,
        stage_steps=stage_steps,
        stage_seconds=seconds,
        steps_per_s=stage_steps / seconds,
        first_step_s=changes[0][0] if changes else seconds,
        max_step_gap_s=max((b[0] - a[0] for a, b in itertools.pairwise(changes)), default=seconds),
        max_step_lag_s=max(lags, default=float("nan")),
        median_step_lag_s=statistics.median(lags) if lags else float("nan"),
        capped=phase.head_steps < steps,
        steps=changes,
    )
    stalls_report(phase, stall)
    return phase, stall


def stalls(bench: Bench) -> tuple[list[StallRun], int]:
    """(c): the runs, and the optimizer steps each one ran."""
    args = bench.args
    if bench.trainer_dir is not None:
        shutil.rmtree(bench.trainer_dir, ignore_errors=True)  # a fresh trainer, as fresh as the nodes
    bench.start_node(0, "stalls-s0-a")
    bench.start_node(0, "stalls-s0-b")
    one = StageOne(bench)
    try:
        print(STALL_HEADER)
        print("-" * len(STALL_HEADER), flush=True)
        one.arrange("normal", leads=True)
        warm = stall_run(bench, one, "stalls-warmup", "pair", 0, STALL_WARMUP_STEPS)
        steps = args.stall_steps
        if steps is None:  # as many as the warm-up's pace (first to last step) fits in a phase
            times = [t for t, _ in warm[1].steps]
            late = len(times) >= 2 and times[-1] > times[0]
            pace = (len(times) - 1) / (times[-1] - times[0]) if late else warm[1].steps_per_s
            steps = max(STALL_WARMUP_STEPS, round(args.phase_seconds * pace))
        print(f"  {steps} optimizer steps a run", flush=True)
        runs = [warm]
        for rep in range(args.reps):
            for label in STALL_ORDER if rep % 2 == 0 else reversed(STALL_ORDER):
                one.arrange(MATE_KIND[label], leads=rep % 2 == 0)
                runs.append(stall_run(bench, one, "stalls", label, rep, steps))
    finally:
        one.close()
    return runs, steps


# ---- output -------------------------------------------------------------------------------------------

HEADER = (
    f"{'at':>5} {'scenario':13} {'phase':10} {'rep':>3} {'seconds':>7} {'samples':>7} {'samples/s':>9} "
    f"{'max gap':>7} {'load':>5} {'issued':>6} {'re-sent':>7} {'steps':>5} {'loss':>11}  route"
)
STALL_HEADER = (
    f"{'at':>5} {'scenario':13} {'phase':10} {'rep':>3} {'leader':17} {'seconds':>7} {'samples/s':>9} "
    f"{'steps':>5} {'steps/s':>7} {'1st step':>8} {'max gap':>7} {'lag':>9} {'load':>5}  notes"
)


def report(p: Phase) -> Phase:
    checked = {None: "", True: "", False: " (NOT confirmed after the run)"}[p.route_checked]
    print(
        f"{p.at_s:>5.0f} {p.scenario:13} {p.label:10} {p.rep:>3} {p.seconds:>7.1f} {p.samples:>7} "
        f"{p.samples_per_s:>9.2f} {p.max_gap_s:>7.1f} {p.loadavg:>5.1f} {p.issued:>6} {p.resent:>7} "
        f"{p.head_steps:>5} {p.loss_first:>5.2f}>{p.loss_last:<5.2f}  {' -> '.join(p.route)}{checked}",
        flush=True,
    )
    return p


def stalls_report(p: Phase, s: StageSteps) -> None:
    notes = [f"route {' -> '.join(p.route)}"] if p.route else []
    notes += [] if p.route_checked in (None, True) else ["route NOT confirmed after the run"]
    notes += [] if s.settled else ["NOT settled before the run"]
    notes += (
        []
        if s.aligned
        else [f"NOT aligned: stage 1 at {s.epoch_before}, the trainer at {s.head_epoch_before}"]
    )
    notes += [] if s.leaders == [s.leader] else [f"followed {' then '.join(s.leaders)}"]
    notes += [] if s.mate_epoch_after in (None, s.epoch_after) else [f"mate at epoch {s.mate_epoch_after}"]
    notes += ["CAPPED"] if s.capped else []
    print(
        f"{p.at_s:>5.0f} {p.scenario:13} {p.label:10} {p.rep:>3} {s.leader:17} {s.stage_seconds:>7.1f} "
        f"{p.samples_per_s:>9.2f} {s.stage_steps:>5} {s.steps_per_s:>7.3f} {s.first_step_s:>8.1f} "
        f"{s.max_step_gap_s:>7.1f} {s.median_step_lag_s:>4.1f}/{s.max_step_lag_s:<4.1f} {p.loadavg:>5.1f}  "
        f"{'; '.join(notes)}",
        flush=True,
    )


def mean_rate(phases: list[Phase], scenario: str, label: str) -> float:
    return statistics.fmean(p.samples_per_s for p in phases if p.scenario == scenario and p.label == label)


def plot(phases: list[Phase], path: Path) -> bool:
    """Samples completed over time, one line per run; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scenario in zip(axes, ("heterogeneity", "failures"), strict=True):
        for p in phases:
            if p.scenario == scenario and p.timeline:
                ts, ns = zip(*[(0.0, 0), *p.timeline], strict=True)
                ax.plot(ts, ns, label=f"{p.label} #{p.rep}: {p.samples_per_s:.1f}/s")
                for kill in (k for k in p.kills if "victim" in k):
                    ax.axvline(kill["at_s"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(scenario)
        ax.set_xlabel("seconds into the run")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("samples completed")
    fig.suptitle("SWARM training on a local swarm (2 stages x 2 peers, 2 CPUs)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def pipelines_results(
    args: argparse.Namespace, phases: list[Phase], rebalance: dict[str, Any], seconds: float
) -> tuple[dict[str, Any], str]:
    """Print the summary of (a) and (b); their part of the results file, and the headline."""
    swarm_rate = mean_rate(phases, "heterogeneity", "random")
    fixed_rate = mean_rate(phases, "heterogeneity", "fixed-slow")
    fast_rate = mean_rate(phases, "heterogeneity", "fixed-fast")
    expected_fixed = (fixed_rate + fast_rate) / 2
    ratio = swarm_rate / fixed_rate
    randoms = [p for p in phases if p.scenario == "heterogeneity" and p.label == "random"]
    fixeds = [p for p in phases if p.label == "fixed-slow"]
    pairs = [r.samples_per_s / f.samples_per_s for r, f in zip(randoms, fixeds, strict=True)]
    routes_confirmed = fast_rate > fixed_rate and all(p.route_checked for p in phases if p.wiring == "fixed")
    steady = next(p for p in phases if p.label == "steady")
    killed = next(p for p in phases if p.label == "kills")
    kills = [k for k in killed.kills if "victim" in k]
    kill_ratio = killed.samples_per_s / steady.samples_per_s
    print(
        f"(a) random {swarm_rate:.2f} samples/s vs fixed through the slow peer {fixed_rate:.2f}: "
        f"ratio {ratio:.2f} (per rep {', '.join(f'{r:.2f}' for r in pairs)}; target >= {RATIO_TARGET}); "
        f"fixed through the fast peer {fast_rate:.2f}, a pipeline fixed at random {expected_fixed:.2f} "
        f"expected (ratio {swarm_rate / expected_fixed:.2f})"
        + ("" if routes_confirmed else "  [fixed routes NOT confirmed]")
    )
    print(
        f"(b) {len(kills)} kills in {killed.seconds:.0f} s: {killed.samples_per_s:.2f} samples/s "
        f"vs {steady.samples_per_s:.2f} without (ratio {kill_ratio:.2f}); {killed.resent} of "
        f"{killed.completed} micro-batches re-sent; replacements joined the victim's stage: "
        f"{sum(k.get('replacement_stage') == k['stage'] for k in kills)} of {len(kills)}; "
        f"issued == completed in every run"
    )
    headline = (
        f"training: swarm {swarm_rate:.2f} samples/s, fixed {fixed_rate:.2f} samples/s (ratio {ratio:.2f}) "
        f"with one stage-1 peer at 1/{SLOWDOWN:g} speed; with a kill every {args.kill_every:g} s: "
        f"{killed.samples_per_s:.2f} samples/s of {steady.samples_per_s:.2f} (ratio {kill_ratio:.2f}), "
        f"{killed.resent} micro-batches re-sent"
    )
    results = {
        "setup": {
            "model": {k: v for k, v in HF_CONFIG.items() if k != "model_type"},
            "stages": NUM_STAGES,
            "peers_per_stage": 2,
            "slowdown": SLOWDOWN,
            "micro_batch_size": args.micro_batch_size,
            "seq_len": args.seq_len,
            "in_flight": args.in_flight,
            "target_batch_size": args.target_batch_size,
            "optimizer_steps_in_runs": args.target_batch_size < NO_STEP,
            "codec": args.codec,
            "phase_seconds": args.phase_seconds,
            "warmup_seconds": args.warmup_seconds,
            "reps": args.reps,
            "kill_every": args.kill_every,
            "kill_seconds": args.kill_seconds,
            "node_threads": args.node_threads,
        },
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "phases": [asdict(p) for p in phases],
        "rebalance": rebalance,
        "summary": {
            "random_samples_per_s": swarm_rate,
            "fixed_slow_samples_per_s": fixed_rate,
            "fixed_fast_samples_per_s": fast_rate,
            "fixed_at_random_expected_samples_per_s": expected_fixed,
            "random_over_fixed_slow": ratio,
            "random_over_fixed_slow_per_rep": pairs,
            "random_over_fixed_at_random": swarm_rate / expected_fixed,
            "fixed_routes_confirmed": routes_confirmed,
            "steady_samples_per_s": steady.samples_per_s,
            "kills_samples_per_s": killed.samples_per_s,
            "kills_over_steady": kill_ratio,
            "kills": len(kills),
            "resent": killed.resent,
            "seconds": seconds,
        },
        "targets": {"random_over_fixed_slow": RATIO_TARGET, "met": ratio >= RATIO_TARGET},
    }
    return results, headline


def stalls_results(
    args: argparse.Namespace, runs: list[StallRun], steps: int, seconds: float, logs: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Print the summary of (c); its entry in the results file, and its headline."""
    measured = [(p, s) for p, s in runs if p.scenario == "stalls"]

    def of(label: str) -> list[StageSteps]:
        return [s for p, s in measured if p.label == label]

    rate = {label: statistics.fmean(s.steps_per_s for s in of(label)) for label in STALL_ORDER}
    samples = {
        label: statistics.fmean(p.samples_per_s for p, _ in measured if p.label == label)
        for label in STALL_ORDER
    }
    gap = {label: max(s.max_step_gap_s for s in of(label)) for label in STALL_ORDER}
    lag = {label: max(s.max_step_lag_s for s in of(label)) for label in STALL_ORDER}
    per_rep = {  # within a rep, by who led stage 1 then
        f"{label} / alone": [
            x.steps_per_s / a.steps_per_s for x, a in zip(of(label), of("alone"), strict=True)
        ]
        for label in ("slow mate", "idle mate")
    }
    slow, idle = rate["slow mate"] / rate["alone"], rate["idle mate"] / rate["alone"]
    clean = all(s.settled and s.aligned and not s.capped and len(s.leaders) == 1 for _, s in measured)
    reps = {name: ", ".join(f"{r:.2f}" for r in ratios) for name, ratios in per_rep.items()}
    print(
        f"(c) stage 1, {steps} steps a run, steps/s (samples/s, largest gap between steps, largest lag "
        "behind the trainer's step): "
        + ", ".join(
            f"{lb} {rate[lb]:.3f} ({samples[lb]:.1f}, {gap[lb]:.1f} s, {lag[lb]:.1f} s)" for lb in STALL_ORDER
        )
        + f"; slow mate / alone {slow:.2f} (per rep {reps['slow mate / alone']}),"
        f" idle mate / alone {idle:.2f} (per rep {reps['idle mate / alone']});"
        " reps alternate who leads stage 1: the second peer, then the normal one"
        + ("" if clean else "  [some run NOT settled, aligned or uncapped: see its notes]")
    )
    headline = (
        f"training stalls: pair {rate['pair']:.3f} steps/s, slow mate {rate['slow mate']:.3f}, "
        f"alone {rate['alone']:.3f}, idle mate {rate['idle mate']:.3f} (stage 1, {steps} steps a run); "
        f"slow mate / alone {slow:.2f}, idle mate / alone {idle:.2f}"
    )
    results = {
        "setup": {
            "model": {k: v for k, v in HF_CONFIG.items() if k != "model_type"},
            "stages": NUM_STAGES,
            "slowdown": SLOWDOWN,
            "micro_batch_size": args.micro_batch_size,
            "seq_len": args.seq_len,
            "in_flight": args.in_flight,
            "target_batch_size": args.stall_target_batch_size,
            "synchronous": True,
            "steps_per_run": steps,
            "steps_chosen": "given" if args.stall_steps is not None else "warm-up pace x phase_seconds",
            "phase_seconds": args.phase_seconds,
            "reps": args.reps,
            "order": list(STALL_ORDER),
            "sample_every_s": SAMPLE_EVERY,
            "codec": args.codec,
            "node_threads": args.node_threads,
        },
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "phases": [{**asdict(p), **asdict(s)} for p, s in runs],
        "summary": {
            "steps_per_s": rate,
            "samples_per_s": samples,
            "max_step_gap_s": gap,
            "max_step_lag_s": lag,
            "slow_mate_over_alone": slow,
            "idle_mate_over_alone": idle,
            "per_rep": per_rep,
            "all_runs_clean": clean,
            "seconds": seconds,
        },
        "node_logs": logs,
    }
    return results, headline


PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


def scan_logs(logs: Path, prefix: str = "") -> dict[str, Any]:
    """ERROR, CRITICAL and Traceback lines (and the number of WARNING lines) of the node logs."""
    problems: list[str] = []
    warnings = 0
    for path in sorted(logs.glob(f"{prefix}*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if PROBLEM.search(line):
                problems.append(f"{path.name}: {line.strip()}")
            warnings += "WARNING" in line
    return {"problems": problems, "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=("pipelines", "stalls", "slowlink"),
        default=None,
        help="(a)+(b), (c), or (d); default: (a)-(c)",
    )
    parser.add_argument("--slow-rate", default="10mbit", help="(d): the slow mate's link (tc tbf rate)")
    parser.add_argument("--slow-outer-every", type=int, default=8, help="(d): diloco's --outer-every")
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="length of each measured run")
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="uncounted first run of (a)")
    parser.add_argument("--reps", type=int, default=2, help="alternations of (a)'s and (c)'s runs")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--kill-seconds", type=float, default=40.0, help="length of the run with kills")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--in-flight", type=int, default=8, help="micro-batches in the swarm at once")
    parser.add_argument(
        "--target-batch-size",
        type=int,
        default=NO_STEP,
        help="(a), (b): samples per optimizer step, nodes and trainer (default: never reached)",
    )
    parser.add_argument(
        "--stall-target-batch-size", type=int, default=64, help="(c): samples per optimizer step"
    )
    parser.add_argument(
        "--stall-steps",
        type=int,
        default=None,
        help="(c): optimizer steps per run (default: what the warm-up's pace fits in --phase-seconds)",
    )
    parser.add_argument("--codec", default="int8", help="activations and gradients on the wire")
    parser.add_argument("--node-threads", type=int, default=1, help="torch threads per node")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="config and node logs (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/training.json"), help="JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the trainer's head is small; the nodes get the cores

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="swarm-bench-training-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    try:
        return bench(args, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def model_dir(workdir: Path, name: str) -> Path:
    config_dir = workdir / name
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(HF_CONFIG))
    return config_dir


def bench(args: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    if args.only == "slowlink":
        print(
            f"(d) slow link: byte-level Llama (4 blocks, hidden 256, float32), {NUM_STAGES} stages x 2 "
            f"peers, one stage-1 peer behind {args.slow_rate}; a step every "
            f"{args.stall_target_batch_size} samples, synchronous trainer; {args.phase_seconds:g} s per "
            f"run; torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n",
            flush=True,
        )
        print(HEADER)
        print("-" * len(HEADER), flush=True)
        results, headline = slow_link(args, workdir / "slowlink")
        scans = [scan_logs(d) for d in sorted((workdir / "slowlink").glob("*-*")) if d.is_dir()]
        problems = [p for found in scans for p in found["problems"]]
        warnings = sum(found["warnings"] for found in scans)
        print(f"node logs: {len(problems)} ERROR/CRITICAL/Traceback lines, {warnings} WARNING lines")
        print("".join(f"  {line}\n" for line in problems[:20]), end="")
        stored: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
        stored["slow_link"] = {
            **results,
            "seconds": time.monotonic() - started,
            "log_problems": problems[:20],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stored, indent=2) + "\n")
        print(headline)
        return 0
    pipelines, stalls_too = args.only in (None, "pipelines"), args.only in (None, "stalls")
    steps = "none (target never reached)" if args.target_batch_size >= NO_STEP else args.target_batch_size
    print(
        f"model: byte-level Llama (4 blocks, hidden 256, vocab 256, float32), {NUM_STAGES} stages x 2 peers; "
        f"micro-batches {args.micro_batch_size} x {args.seq_len} bytes, {args.in_flight} in flight, "
        f"{args.codec} on the wire; {args.phase_seconds:g} s per run; optimizer steps in (a), (b): {steps}, "
        f"in (c): every {args.stall_target_batch_size} samples; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, nodes on {args.node_threads} thread(s)\n",
        flush=True,
    )
    phases: list[Phase] = []
    rebalance: dict[str, Any] = {}
    runs: list[StallRun] = []
    stall_steps = 0
    pipelines_seconds = stalls_seconds = 0.0
    logs = workdir / "swarm"
    with LocalSwarm(logs, env={"OMP_NUM_THREADS": str(args.node_threads)}) as local:
        local.start_dht()
        identity = NodeIdentity.generate()
        dht = start_dht(initial_peers=local.initial_peers, identity=identity)
        try:
            if pipelines:
                b = Bench(args, local, model_dir(workdir, MODEL), dht, identity, args.target_batch_size)
                b.began = started
                print(HEADER)
                print("-" * len(HEADER), flush=True)
                phases = heterogeneity(b)
                more, rebalance = failures(b)
                phases += more
                b.stop_all()  # (c) gets the CPUs to itself
                pipelines_seconds = time.monotonic() - started
                print()
            if stalls_too:
                began = time.monotonic()
                c = Bench(
                    args,
                    local,
                    model_dir(workdir, STALL_MODEL),
                    dht,
                    identity,
                    args.stall_target_batch_size,
                    trainer_dir=workdir / "stalls-trainer",
                )
                c.began = started
                runs, stall_steps = stalls(c)
                stalls_seconds = time.monotonic() - began
        finally:
            dht.shutdown()
    elapsed = time.monotonic() - started

    print()
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    headlines = []
    if pipelines:
        results, headline = pipelines_results(args, phases, rebalance, pipelines_seconds)
        out.update(results)
        headlines.append(headline)
    if stalls_too:
        results, headline = stalls_results(
            args, runs, stall_steps, stalls_seconds, scan_logs(logs, "stalls-")
        )
        out["stalls"] = results
        headlines.append(headline)
    found = scan_logs(logs)
    print(
        f"node logs ({logs}): {len(found['problems'])} ERROR/CRITICAL/Traceback lines, "
        f"{found['warnings']} WARNING lines" + "".join(f"\n  {line}" for line in found["problems"][:20])
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if pipelines and plot(phases, args.out.with_suffix(".png")):
        print(f"plot: {args.out.with_suffix('.png')}")
    print(f"benchmark took {elapsed:.0f} s")
    for headline in headlines:  # the stalls' last
        print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
