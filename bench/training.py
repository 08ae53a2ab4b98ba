"""Benchmark SWARM training: random wiring vs a fixed pipeline with a slow peer, and under failures.

    python bench/training.py [--phase-seconds 30] [--reps 2] [--kill-every 10] [--out FILE.json]

One local swarm, in one run: real `swarm-node join --train` processes on 127.0.0.1 serving a
byte-level Llama (4 blocks, hidden 256, intermediate 688, 8 heads, 4 KV heads, vocab 256, float32
on the CPU, random weights from the config) cut into 2 stages of 2 blocks, 2 peers per stage, each
node on one torch thread. One trainer in this process (swarm.training.trainer.Trainer: embeddings
and LM head here, blocks on the swarm) streams micro-batches of 8 sequences x 128 bytes, 8 in
flight, int8 activations and gradients on the wire. Every phase is one Trainer run of
`--phase-seconds`: it stops issuing then and the micro-batches in flight finish, so samples/s =
samples completed / wall time of the whole run, the drain included. Each run must complete every
micro-batch it issued (the Trainer checks; so does this script). A first `--warmup-seconds` run
(random wiring) is not counted: it lets the nodes open their start gate and measure throughput.

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

Optimizer steps: by default `--target-batch-size` is never reached in the benchmark, so the runs
measure the pipelines (forward, backward, gradients accumulated on every peer) and no hivemind
averaging round falls into them. Give a smaller one (e.g. 256) to include the stages' averaging;
with wiring="fixed" the stage peer off the route then gets no gradients, and rounds were seen to
wait out --averaging-timeout (10 s) for it, stalling the stage (see max_gap_s per run).

Every process started here is stopped again (by PID, LocalSwarm), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from swarm.client.loop import run_sync
from swarm.coordinator.routing import SwarmMap, throughput_weighted_route
from swarm.coordinator.swarm_map import fetch_swarm_map
from swarm.dht import DHT, start_dht
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.records import NodeIdentity
from swarm.training.data import VOCAB_SIZE, DataConfig
from swarm.training.trainer import Progress, Trainer, TrainerConfig

MODEL = "bench-byte-llama"
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


@dataclass
class Phase:
    scenario: str  # warmup | heterogeneity | failures
    label: str  # random | fixed-slow | fixed-fast | steady | kills
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
    config_dir: Path
    dht: DHT
    identity: NodeIdentity
    nodes: list[NodeProcess] = field(default_factory=list)  # training nodes started here, in order
    began: float = field(default_factory=time.monotonic)

    # ---- nodes ----------------------------------------------------------------------------------

    def start_node(self, stage: int | Literal["auto"], name: str, *extra: str) -> NodeProcess:
        args = self.args
        train = [
            *("--train", "--num-stages", str(NUM_STAGES), "--stage", str(stage)),
            *("--target-batch-size", str(args.target_batch_size), "--lr", str(LR)),
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

    def training_map(self) -> SwarmMap:
        snapshot = run_sync(fetch_swarm_map(self.dht, MODEL, NUM_BLOCKS))
        return replace(snapshot, servers=tuple(s for s in snapshot.servers if s.trainable_stage is not None))

    # ---- one trainer run ------------------------------------------------------------------------

    def trainer(self, wiring: Wiring, seconds: float, seed: int) -> Trainer:
        args = self.args
        cfg = TrainerConfig(
            model=str(self.config_dir),
            steps=1_000_000,  # max_seconds ends the run
            micro_batch_size=args.micro_batch_size,
            in_flight=args.in_flight,
            target_batch_size=args.target_batch_size,
            lr=LR,
            warmup_steps=WARMUP_STEPS,
            seed=seed,
            codec=args.codec,
            wiring=wiring,
            max_seconds=seconds,
            data=DataConfig(seq_len=args.seq_len + 1, max_bytes=8 << 20),
        )
        # Built here, on the main thread (hivemind installs signal handlers). One DHT peer and
        # identity for every run: the head optimizer's progress record is then replaced, not joined
        # by a stale one from an earlier run that a new trainer would try to catch up with.
        return Trainer(cfg, self.dht, self.identity)

    def run(
        self,
        scenario: str,
        label: str,
        rep: int,
        wiring: Wiring,
        seconds: float,
        seed: int = 0,
        during: Callable[[Future[tuple[Progress, float]], float], list[dict[str, Any]]] | None = None,
    ) -> Phase:
        """One Trainer run; `during(future, started)` runs beside it on this thread (the kills)."""
        trainer = self.trainer(wiring, seconds, seed)
        kills: list[dict[str, Any]] = []

        def train() -> tuple[Progress, float]:
            progress = trainer.train()
            return progress, time.monotonic()

        try:
            epoch = trainer.optimizer.epoch
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
            head_steps = trainer.optimizer.epoch - epoch
        finally:
            trainer.shutdown()
        if progress.issued != progress.completed:
            raise AssertionError(f"{label}: issued {progress.issued} but completed {progress.completed}")
        wall = finished - started
        stamps = [t for t, _, _ in progress.losses]
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
            timeline=[(round(t, 2), n) for t, n, _ in progress.losses],
        )


# ---- (a) heterogeneity ----------------------------------------------------------------------------


def fixed_draw(swarm_map: SwarmMap, seed: int) -> list[str]:
    """Peer ids of the route a Trainer with wiring="fixed" and this seed draws first."""
    return [hop.peer_id for hop in throughput_weighted_route(swarm_map, rng=random.Random(seed))]


def fixed_seed(swarm_map: SwarmMap, through: str) -> int:
    """The first seed whose fixed route goes through peer `through`, also with any announced
    throughput halved or doubled."""
    if len(swarm_map.online()) != 2 * NUM_STAGES:
        raise RuntimeError(f"expected {2 * NUM_STAGES} training peers, the map has {swarm_map.online()}")
    servers = swarm_map.servers
    variants = [
        replace(
            swarm_map,
            servers=tuple(
                s.model_copy(update={"throughput": s.throughput * f})
                for s, f in zip(servers, factors, strict=True)
            ),
        )
        for factors in itertools.product((0.5, 1.0, 2.0), repeat=len(servers))
    ]
    for seed in range(1, 10_000):
        if all(through in fixed_draw(v, seed) for v in variants):
            return seed
    raise RuntimeError(f"no seed below 10000 routes through {through} robustly")


def fixed_run(bench: Bench, label: str, rep: int, through: NodeProcess) -> Phase:
    peer = bench.info(through)["peer_id"]
    seed = fixed_seed(bench.training_map(), peer)
    route = fixed_draw(bench.training_map(), seed)
    phase = bench.run("heterogeneity", label, rep, "fixed", bench.args.phase_seconds, seed)
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
        phases.append(report(fixed_run(bench, "fixed-slow", rep, slow)))
    phases.append(report(fixed_run(bench, "fixed-fast", 0, fast)))
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


# ---- output -------------------------------------------------------------------------------------------

HEADER = (
    f"{'at':>5} {'scenario':13} {'phase':10} {'rep':>3} {'seconds':>7} {'samples':>7} {'samples/s':>9} "
    f"{'max gap':>7} {'load':>5} {'issued':>6} {'re-sent':>7} {'steps':>5} {'loss':>11}  route"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="length of each measured run")
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="uncounted first run")
    parser.add_argument("--reps", type=int, default=2, help="alternating random / fixed-slow runs")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--kill-seconds", type=float, default=40.0, help="length of the run with kills")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--in-flight", type=int, default=8, help="micro-batches in the swarm at once")
    parser.add_argument(
        "--target-batch-size",
        type=int,
        default=NO_STEP,
        help="samples per optimizer step, nodes and trainer (default: never reached, no averaging)",
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


def bench(args: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    config_dir = workdir / MODEL
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(HF_CONFIG))
    steps = "none (target never reached)" if args.target_batch_size >= NO_STEP else args.target_batch_size
    print(
        f"model: byte-level Llama (4 blocks, hidden 256, vocab 256, float32), {NUM_STAGES} stages x 2 peers; "
        f"micro-batches {args.micro_batch_size} x {args.seq_len} bytes, {args.in_flight} in flight, "
        f"{args.codec} on the wire; {args.phase_seconds:g} s per run; optimizer steps: {steps}; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, nodes on {args.node_threads} thread(s)\n",
        flush=True,
    )
    with LocalSwarm(workdir / "swarm", env={"OMP_NUM_THREADS": str(args.node_threads)}) as local:
        local.start_dht()
        identity = NodeIdentity.generate()
        dht = start_dht(initial_peers=local.initial_peers, identity=identity)
        try:
            b = Bench(args, local, config_dir, dht, identity)
            print(HEADER)
            print("-" * len(HEADER), flush=True)
            phases = heterogeneity(b)
            more, rebalance = failures(b)
            phases += more
        finally:
            dht.shutdown()

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
    elapsed = time.monotonic() - started

    print()
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
    print(
        f"training: swarm {swarm_rate:.2f} samples/s, fixed {fixed_rate:.2f} samples/s (ratio {ratio:.2f}) "
        f"with one stage-1 peer at 1/{SLOWDOWN:g} speed; with a kill every {args.kill_every:g} s: "
        f"{killed.samples_per_s:.2f} samples/s of {steady.samples_per_s:.2f} (ratio {kill_ratio:.2f}), "
        f"{killed.resent} micro-batches re-sent"
    )
    print(f"benchmark took {elapsed:.0f} s")

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
            "seconds": elapsed,
        },
        "targets": {"random_over_fixed_slow": RATIO_TARGET, "met": ratio >= RATIO_TARGET},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if plot(phases, args.out.with_suffix(".png")):
        print(f"plot: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
