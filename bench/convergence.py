"""Does SWARM training learn what one process learns? The same model, data and schedule, five ways.

    python bench/convergence.py [--config demo|large|both] [--steps N] [--cases A,B] [--seeds 0,1,2]
                                [--lr 3e-3] [--warmup-steps 5] [--out FILE.json]

Every case trains the same byte-level Llama from the same initial weights (the client parts and
block i drawn from the seed, as the nodes and the trainer draw them) on the Python standard
library's sources with the same optimizer settings (AdamW, lr 3e-3, 5 warm-up steps, weight decay
0.01; `--lr`, `--warmup-steps`), micro-batches of 8 sequences of 128 bytes and 64 samples per
optimizer step, for the same number of steps, so the same number of samples:

  local         one process (swarm.training.local.train_locally): the reference;
  local_shards  one process on the two trainers' data order (each step takes half its
                micro-batches from shard 0 of 2, half from shard 1): their reference;
  local_reversed  one process as `local`, each step's micro-batches run in reverse order: the
                same gradients summed in another order, so only float rounding differs. It sizes
                the measure's own noise: how far rounding alone moves the loss at these settings;
  swarm         a local swarm of 2 stages x 2 peers (real `swarm-node join --train` processes, one
                torch thread each) and one trainer, 4 micro-batches in flight, activations and
                gradients in the trainer's default codec (bf16) on the wire;
  two trainers  the same swarm (fresh) with two trainers at once, each in its own process, on
                disjoint shards of the data (--shard 0 2 and 1 2); each step's micro-batches are
                split between them (4 each), and each waits at every step boundary as a lone
                trainer does, so every stage computes a step's micro-batches with that step's
                weights, as one process does;
  lossless      the same swarm as `swarm` (fresh) with the lossless codec ("none");
  two_trainers_lossless
                the same as `two trainers` with the lossless codec;
  int8          the same swarm as `swarm` (fresh) with the int8 codec (blocks of 64), the
                trainer's default until bf16 replaced it (bench/codec_parity.py: int8's effect on
                learning swings with the seed).

Averaging modes inside a stage (issue 15), each the same swarm as `swarm` (fresh), one trainer,
int8 on the wire (as they were measured):

  gradients int8  gradient averaging with its payloads in int8 with error feedback
                  (`--averaging-codec int8`); `swarm` is gradient averaging in float32;
  diloco H=4, diloco H=8
                  `--averaging diloco --outer-every H --averaging-codec int8` (outer lr 0.7,
                  momentum 0.9): each stage peer steps its own AdamW on its micro-batches, and
                  every H steps the peers average their parameter deltas (8 bits) and take an
                  outer Nesterov step. Any H runs with `--cases "diloco H=16"`.

For every swarm case the nodes' `swarm_node_averaging_bytes_total` (sent + received: averaging
rounds, not whole-state transfers at start-up) is read before the swarm stops and divided by the
samples the swarm trained: averaging bytes per sample per stage peer (mean over the 4 peers).
`--cases a,b` runs only those; the other cases of that config keep their stored results when
their steps match.

Seeds: the seed draws the initial weights and the data (which files fill the 16 MiB, their order,
the held-out tail), for every case of that seed alike. One seed's gaps swing with
rounding-induced changes of trajectory (at lr 1e-2 by up to 0.1: loss spikes that one run hits
and another does not, in one process as in the swarm; `local_reversed` measures it), so
`--seeds 0,1,2` runs every case on each seed and every figure printed is the mean over the seeds
(a `seeds:` line gives each seed's gaps). Seeds stored for a config with the same steps and
settings and not run again are kept and averaged in, like cases.

Every swarm case starts fresh nodes (fresh weights), and every trainer runs in a process of its
own (this script run with --trainer-worker), so no state is carried from one case to the next.
Compared: the mean loss of the last 20 micro-batches at equal samples (only micro-batches with
samples <= steps x 64; the two trainers' micro-batches are merged in the order they completed),
and the held-out loss of the final model (the first 256 held-out sequences): the swarm's is
exported from the swarm (swarm.training.export.export_model) and evaluated in this process.
Each swarm case is compared with one process on the same sequences: `local` for one trainer,
`local_shards` for two (the data order alone moves the last-20 mean by about 0.1 at 50 steps).

Configs: `demo` is the demo's model (swarm.demo.TRAIN_CONFIG: hidden 128, 4 blocks, 0.79 M
parameters), 50 steps; `large` has over 4x its parameters (hidden 256, intermediate 768, 4 blocks,
8 heads, 4 KV heads: 3.28 M), 40 steps, so that its four cases take about 10 minutes on 2 CPUs.

Writes bench/results/convergence.json (per config and seed every curve and that seed's summary, and
per config the mean summary; configs not run keep their earlier entry) and convergence.png (running
mean of 20 micro-batches against samples, each micro-batch's loss averaged over the seeds).
For each config the lines printed last are one naming it (with the held-out losses, the wall
times and the seeds) and

    seeds (gap last-20/held-out): seed 0: swarm G/H, ...; seed 1: ...   (with several seeds)
    parting: steps with the reference's loss (within 0.01) before the trajectories part: ... K of N
    averaging: gradients B B/sample (loss gap G); gradients int8 ...; diloco H=4 B B/sample (loss
        gap G, Rx fewer); ... per stage peer at N samples
    codecs: swarm bf16 S (gap G), int8 V (gap W), lossless U (gap X) at N samples
    convergence: local L, swarm S (gap G), two trainers T (gap H), lossless swarm U at N samples

(parting: a case's steps are compared with its reference's, step by step, each step's mean loss
over its micro-batches; with several seeds K is the mean;
gap = the case minus its one-process reference: local, or local_shards for two trainers; n/a for
a case neither run nor stored; "Rx fewer" = gradients' (float32) bytes per sample over the mode's),
the larger config's last.

Every process started here is stopped again (by PID), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from swarm.demo import TRAIN_CONFIG
from swarm.training.data import VOCAB_SIZE, DataConfig

LARGE_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
CONFIGS: dict[str, tuple[dict[str, Any], int]] = {  # name -> (model config, default steps)
    "demo": (dict(TRAIN_CONFIG), 50),
    "large": (LARGE_CONFIG, 40),
}
# Issue 11's settings (trainers and nodes alike), but for the learning rate: at lr 1e-2 these
# models hit loss spikes at random, in one process as in the swarm, and one process against itself
# with its sums in another order ends up to 0.1 apart (`--lr 1e-2`; docs/benchmarks.md). At 3e-3
# (the demo's) they learn as far in 50 steps without spikes, so the gaps measure the swarm.
MICRO_BATCH, IN_FLIGHT, TARGET_BATCH = 8, 4, 64
LR, WARMUP_STEPS = 3e-3, 5
# The seed draws the initial weights and the data (which files fill max_bytes, their order, the
# held-out tail). One seed's gaps swing by about +-0.05 with rounding-induced trajectory changes
# (bench/codec_parity.py), so --seeds runs every case on several and reports the mean gaps.
SEEDS = (0,)
DATA = DataConfig(seq_len=129, max_bytes=16 << 20)
NUM_STAGES, PEERS_PER_STAGE = 2, 2
WINDOW = 20  # micro-batches in the compared mean and in the plot's running mean
# Two runs "take the same step" while their step's mean loss differs by at most this much: far
# above float32 reordering (1e-5), far below what a lost or stale gradient does to a step.
SAME_TOL = 0.01
GAP_NOTE = 0.05  # a gap above this is called out in the output (nothing is tuned to close it)
PARITY_CASES = (
    *("local", "local_shards", "local_reversed", "swarm", "two_trainers", "lossless", "int8"),
    "two_trainers_lossless",
)
WIRE_CODEC = "bf16"  # the trainer's default (TrainerConfig.codec; checked in main)
# Averaging modes inside a stage (issue 15), each a fresh swarm with one trainer like `swarm` (which
# is `gradients` averaging in float32): gradients in 8 bits with error feedback, and DiLoCo with an
# outer step every H steps, its deltas in 8 bits with error feedback ("diloco H=4", ...).
DILOCO_H = (4, 8)
GRADIENTS_INT8 = "gradients int8"
DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM = 0.7, 0.9
LABELS = {
    "local": "one process",
    "local_shards": "one process, 2 shards' order",
    "local_reversed": "one process, reversed sums",
    "swarm": "swarm (bf16)",
    "two_trainers": "two trainers (bf16)",
    "lossless": "swarm (lossless)",
    "int8": "swarm (int8)",
    "two_trainers_lossless": "two trainers (lossless)",
    GRADIENTS_INT8: "gradients, int8 averaging",
}
# What each case is compared with: one process on the same sequences in the same steps. Two
# trainers read other sequences than one does (shards 0 and 1, half of each step from each), and
# the order of the data alone moves the last-20 mean by about 0.1 at this length (measured).
REFERENCE = {
    "local_reversed": "local",
    "swarm": "local",
    "two_trainers": "local_shards",
    "two_trainers_lossless": "local_shards",
    "lossless": "local",
    "int8": "local",
    GRADIENTS_INT8: "local",
}
AVERAGING_TARGET_RATIO, AVERAGING_TARGET_GAP = 20.0, 0.1  # issue 15: fewer bytes/sample, loss within


def diloco_case(h: int) -> str:
    return f"diloco H={h}"


def all_cases(diloco_h: tuple[int, ...] = DILOCO_H) -> tuple[str, ...]:
    return (*PARITY_CASES, GRADIENTS_INT8, *(diloco_case(h) for h in diloco_h))


def label(case: str) -> str:
    return LABELS.get(case, f"{case}, int8 deltas")


def reference(case: str) -> str | None:
    return REFERENCE.get(case, "local" if case.startswith("diloco") else None)


def wire_codec(case: str) -> str:
    """The training codec a swarm case sends: the trainer's default unless the case names another;
    the averaging modes keep int8, which their figures were measured with."""
    if case in ("lossless", "two_trainers_lossless"):
        return "none"
    if case in ("int8", GRADIENTS_INT8) or case.startswith("diloco H="):
        return "int8"
    return WIRE_CODEC


def averaging_flags(case: str) -> list[str]:
    """The training nodes' averaging flags of a swarm case."""
    if case == GRADIENTS_INT8:
        return ["--averaging", "gradients", "--averaging-codec", "int8"]
    if case.startswith("diloco H="):
        return [
            *("--averaging", "diloco", "--outer-every", case.split("=")[1], "--averaging-codec", "int8"),
            *("--outer-lr", str(DILOCO_OUTER_LR), "--outer-momentum", str(DILOCO_OUTER_MOMENTUM)),
        ]
    return ["--averaging", "gradients", "--averaging-codec", "none"]


@dataclass
class Case:
    name: str
    curve: list[tuple[float, int, float]]  # (seconds, samples, loss) per micro-batch, in order
    steps_at: list[int]  # optimizer steps taken when each micro-batch completed
    train_seconds: float  # training alone
    case_seconds: float  # with the swarm's start, the export and the evaluation
    held_out: float
    steps: int
    issued: int = 0
    completed: int = 0
    resent: int = 0
    export_epochs: dict[str, int] = field(default_factory=dict)
    per_trainer: list[dict[str, Any]] = field(default_factory=list)
    # Averaging traffic (rounds, not whole-state transfers) of the stage peers, sent + received,
    # each peer's over the samples the swarm trained; and their mean.
    averaging_bytes_per_sample: list[float] = field(default_factory=list)

    @property
    def bytes_per_sample(self) -> float:
        per_peer = self.averaging_bytes_per_sample
        return sum(per_peer) / len(per_peer) if per_peer else float("nan")

    def steps_by(self, samples: int) -> int:
        """Optimizer steps taken by the last micro-batch with at most `samples` samples."""
        return max(
            (k for (_, s, _), k in zip(self.curve, self.steps_at, strict=True) if s <= samples), default=0
        )

    def last(self, samples: int, n: int = WINDOW) -> float:
        """Mean loss of the last `n` micro-batches with at most `samples` samples."""
        tail = [loss for _, s, loss in self.curve if s <= samples][-n:]
        return sum(tail) / len(tail) if tail else float("nan")


def parameters(model: dict[str, Any]) -> int:
    from swarm.models.llama import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        net = LlamaForCausalLM(LlamaConfig.from_hf_dict(model))
    return sum(p.numel() for p in net.parameters())


def trainer_settings(
    config_dir: Path, steps: int, seed: int, lr: float = LR, warmup_steps: int = WARMUP_STEPS
) -> dict[str, Any]:
    """TrainerConfig fields (JSON-able) shared by every case."""
    return {
        "model": str(config_dir),
        "steps": steps,
        "micro_batch_size": MICRO_BATCH,
        "in_flight": IN_FLIGHT,
        "target_batch_size": TARGET_BATCH,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "seed": seed,
    }


def trainer_config(settings: dict[str, Any]) -> Any:
    from swarm.training.trainer import TrainerConfig

    s = dict(settings)
    shard = tuple(s.pop("shard", (0, 1)))
    checkpoint_dir = s.pop("checkpoint_dir", None)
    return TrainerConfig(
        **s,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        data=replace(DATA, shard=(int(shard[0]), int(shard[1]))),
    )


# ---- a trainer in a process of its own --------------------------------------------------------------


def trainer_worker(spec_path: Path) -> int:
    """--trainer-worker SPEC.json: run one Trainer; write its micro-batches to spec["out"]."""
    from swarm.dht import start_dht
    from swarm.records import NodeIdentity
    from swarm.training.trainer import Trainer

    spec = json.loads(spec_path.read_text())
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the nodes need the cores
    cfg = trainer_config(spec["trainer"])
    identity = NodeIdentity.generate()
    dht = start_dht(initial_peers=spec["initial_peers"], identity=identity)
    trainer = Trainer(cfg, dht, identity)
    steps: list[int] = []  # the collaboration's step when each micro-batch completed
    try:
        progress = trainer.train(lambda p: steps.append(p.step))
    finally:
        trainer.shutdown()
        dht.shutdown()
    wall = time.time() - time.monotonic()  # monotonic -> wall clock, to merge the trainers' curves
    result = {
        "started": progress.started + wall,
        "seconds": time.monotonic() - progress.started,
        "losses": progress.losses,
        "steps": steps,
        "step": progress.step,
        "issued": progress.issued,
        "completed": progress.completed,
        "resent": progress.resent,
        "samples": progress.samples,
    }
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


class Workers:
    """Trainer processes (this script with --trainer-worker), each in a session of its own, stopped
    by PID (with whatever of their process group is left) however the case ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, spec: dict[str, Any]) -> Path:
        spec_path, out, log_path = (
            self.workdir / f"{name}{ext}" for ext in (".spec.json", ".out.json", ".log")
        )
        spec_path.write_text(json.dumps({**spec, "out": str(out)}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--trainer-worker", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs.append((proc, log_path))
        return out

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc, log_path in self.procs:
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"trainer {log_path.stem} did not finish in {timeout:.0f} s") from None
            if code != 0:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"trainer {log_path.stem} exited with code {code}:\n{tail}")

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its DHT daemon, if it outlived it


# ---- the cases -------------------------------------------------------------------------------------


def local_case(
    settings: dict[str, Any], name: str = "local", trainers: int = 1, reverse_sums: bool = False
) -> Case:
    from swarm.training.local import train_locally

    began = time.monotonic()
    cfg = trainer_config(settings)
    run = train_locally(cfg, trainers=trainers, evaluate_every=settings["steps"], reverse_sums=reverse_sums)
    return Case(
        name=name,
        curve=list(run.losses),
        steps_at=[(i + 1) // (TARGET_BATCH // MICRO_BATCH) for i in range(len(run.losses))],
        train_seconds=run.seconds,
        case_seconds=time.monotonic() - began,
        held_out=run.held_out[-1][1],
        steps=settings["steps"],
        issued=len(run.losses),
        completed=len(run.losses),
    )


def node_metrics(port: int) -> dict[str, float]:
    """A node's Prometheus series, by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def averaging_bytes(port: int) -> float:
    m = node_metrics(port)
    return sum(
        m.get(f'swarm_node_averaging_bytes_total{{direction="{d}"}}', 0.0) for d in ("sent", "received")
    )


def swarm_case(
    name: str, workdir: Path, config_dir: Path, settings: dict[str, Any], trainers: int, codec: str
) -> Case:
    """A fresh local swarm of NUM_STAGES x PEERS_PER_STAGE training nodes, `trainers` trainers (each
    in its own process, on shard k of `trainers`), then the model exported and evaluated here."""
    from swarm.checkpoint import load_blocks, load_client_parts, open_checkpoint
    from swarm.dht import start_dht
    from swarm.localswarm import LocalSwarm
    from swarm.training.export import export_model

    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    node_flags = [
        *("--train", "--num-stages", str(NUM_STAGES), "--target-batch-size", str(TARGET_BATCH)),
        *("--lr", str(settings["lr"]), "--warmup-steps", str(settings["warmup_steps"])),
        *("--seed", str(settings["seed"])),
        *("--device", "cpu", "--dtype", "float32", "--metrics-port", "0"),
        *averaging_flags(name),
    ]
    export_dir = workdir / "export"
    with LocalSwarm(workdir / "swarm", env={"OMP_NUM_THREADS": "1"}) as local:
        local.start_dht()
        nodes = [
            local.start_node(config_dir, None, *node_flags, "--stage", str(i % NUM_STAGES), name=f"train-{i}")
            for i in range(NUM_STAGES * PEERS_PER_STAGE)
        ]
        workers = Workers(workdir)
        try:
            outs = [
                workers.start(
                    f"trainer-{k}",
                    {
                        "initial_peers": local.initial_peers,
                        "trainer": {
                            **settings,
                            "codec": codec,
                            "shard": (k, trainers),
                            "checkpoint_dir": str(workdir / f"trainer-{k}"),
                        },
                    },
                )
                for k in range(trainers)
            ]
            workers.wait(timeout=max(600.0, 30.0 * settings["steps"]))
        finally:
            workers.close()
        results = [json.loads(out.read_text()) for out in outs]
        trained = sum(r["completed"] for r in results) * MICRO_BATCH
        per_peer = [averaging_bytes(node.info["metrics_port"]) / trained for node in nodes]
        dht = start_dht(initial_peers=local.initial_peers, client_mode=True)
        try:
            # The client parts of trainer 0 (the trainers average theirs at every step).
            exported = export_model(dht, str(config_dir), workdir / "trainer-0", export_dir)
        finally:
            dht.shutdown()
    ckpt = open_checkpoint(export_dir)
    parts = load_client_parts(ckpt)
    blocks = load_blocks(ckpt, 0, ckpt.config.num_hidden_layers)
    held_out = evaluate(parts, blocks, settings["seed"])

    # Every micro-batch of every trainer, in the order they completed, samples counted together.
    done = sorted(
        (r["started"] + t, loss, step)
        for r in results
        for (t, _, loss), step in zip(r["losses"], r["steps"], strict=True)
    )
    first = min(r["started"] for r in results)
    curve = [(t - first, (i + 1) * MICRO_BATCH, loss) for i, (t, loss, _) in enumerate(done)]
    return Case(
        name=name,
        curve=curve,
        steps_at=[step for _, _, step in done],
        train_seconds=max(r["started"] + r["seconds"] for r in results) - first,
        case_seconds=time.monotonic() - began,
        held_out=held_out,
        steps=min(r["step"] for r in results),
        issued=sum(r["issued"] for r in results),
        completed=sum(r["completed"] for r in results),
        resent=sum(r["resent"] for r in results),
        export_epochs={str(k): v for k, v in exported.epochs.items()},
        per_trainer=[
            {k: r[k] for k in ("step", "issued", "completed", "resent", "samples", "seconds")}
            for r in results
        ],
        averaging_bytes_per_sample=per_peer,
    )


_VALIDATION: dict[int, Any] = {}  # seed -> its dataset


def evaluate(parts: Any, blocks: Any, seed: int) -> float:
    """held_out_loss on the validation sequences every trainer of this seed holds out (the same in
    every case of the seed)."""
    from swarm.training.data import ByteDataset
    from swarm.training.local import held_out_loss

    if seed not in _VALIDATION:
        _VALIDATION[seed] = ByteDataset(replace(DATA, seed=seed))
    return held_out_loss(parts, blocks, _VALIDATION[seed])


def run_case(case: str, name: str, settings: dict[str, Any], workdir: Path, config_dir: Path) -> Case:
    if case == "local":
        return local_case(settings)
    if case == "local_shards":
        return local_case(settings, case, trainers=2)
    if case == "local_reversed":
        return local_case(settings, case, reverse_sums=True)
    trainers = 2 if case.startswith("two_trainers") else 1
    codec = wire_codec(case)
    folder = workdir / name / re.sub(r"[^A-Za-z0-9_]", "", case.replace(" ", "_"))
    return swarm_case(case, folder, config_dir, settings, trainers, codec)


def stored_seeds(
    earlier: dict[str, Any] | None, steps: int, lr: float = LR, warmup_steps: int = WARMUP_STEPS
) -> dict[int, dict[str, Case]]:
    """The cases of an earlier run of this config with the same steps and schedule, per seed (kept
    when not run again). An entry from before --seeds holds seed 0's cases at its top level."""
    if not earlier or earlier.get("steps") != steps:
        return {}
    stored = earlier.get("settings", {})
    if stored.get("lr") != lr or stored.get("warmup_steps") != warmup_steps:
        return {}
    by_seed = earlier.get("seeds") or {"0": {"cases": earlier.get("cases", {})}}
    names = {f.name for f in fields(Case)}
    out: dict[int, dict[str, Case]] = {}
    for seed, entry in by_seed.items():
        cases = out.setdefault(int(seed), {})
        for case, d in entry.get("cases", {}).items():
            kept = {k: v for k, v in d.items() if k in names}
            kept["curve"] = [tuple(point) for point in kept["curve"]]
            cases[case] = Case(**kept)
    return out


def ordered(cases: dict[str, Any]) -> list[str]:
    """Case names in the order of all_cases (any diloco H by H), unknown names last."""
    order = list(all_cases(tuple(sorted(int(c.split("=")[1]) for c in cases if c.startswith("diloco H=")))))
    return sorted(cases, key=lambda c: order.index(c) if c in order else len(order))


def same_steps(case: Case, ref: Case, tol: float = SAME_TOL) -> int:
    """How many optimizer steps from the start `case` took with the same mean loss as `ref` (within
    `tol`): where the two trajectories part. Every trainer waits at each step boundary, so every
    TARGET_BATCH // MICRO_BATCH micro-batches in completion order are one step's (in any order)."""
    per_step = TARGET_BATCH // MICRO_BATCH
    a, b = [loss for _, _, loss in case.curve], [loss for _, _, loss in ref.curve]
    steps = min(len(a), len(b)) // per_step
    for k in range(steps):
        window = slice(k * per_step, (k + 1) * per_step)
        if abs(sum(a[window]) - sum(b[window])) / per_step > tol:
            return k
    return steps


def summarize(cases: dict[str, Case], samples: int, params: int) -> dict[str, Any]:
    """One seed's figures: last-WINDOW means, gaps to the references, held-out losses and gaps,
    and how many steps each case followed its reference's trajectory."""
    last = {case: c.last(samples) for case, c in cases.items()}
    compared = {case: ref for case in cases if (ref := reference(case)) is not None and ref in cases}
    return {
        "samples": samples,
        "params": params,
        **{f"last{WINDOW}_{case}": last[case] for case in cases},
        **{f"gap_{case}": last[case] - last[ref] for case, ref in compared.items()},
        **{f"same_steps_{case}": same_steps(cases[case], cases[ref]) for case, ref in compared.items()},
        **{f"held_out_{case}": cases[case].held_out for case in cases},
        **{
            f"held_out_gap_{case}": cases[case].held_out - cases[ref].held_out
            for case, ref in compared.items()
        },
        **{f"train_seconds_{case}": cases[case].train_seconds for case in cases},
        **{f"steps_by_samples_{case}": cases[case].steps_by(samples) for case in cases},
        **{
            f"averaging_bytes_per_sample_{case}": c.bytes_per_sample
            for case, c in cases.items()
            if c.averaging_bytes_per_sample
        },
    }


def mean_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Every figure's mean over the seeds that have it; "seeds" names them per case."""
    keys = {k for s in per_seed.values() for k in s}
    out: dict[str, Any] = {}
    for k in sorted(keys):
        values = [s[k] for s in per_seed.values() if k in s]
        out[k] = sum(values) / len(values)
    out["samples"] = next(iter(per_seed.values()))["samples"]
    out["params"] = next(iter(per_seed.values()))["params"]
    cases = ordered({k.removeprefix(f"last{WINDOW}_"): 0 for k in keys if k.startswith(f"last{WINDOW}_")})
    out["seeds"] = {
        case: sorted(seed for seed, s in per_seed.items() if f"last{WINDOW}_{case}" in s) for case in cases
    }
    return out


def with_seeds(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored config entry in this version's shape: one from before --seeds holds seed 0's cases and
    summary at its top level."""
    if "seeds" in entry or "cases" not in entry:
        return entry
    out = {k: v for k, v in entry.items() if k != "cases"}
    out["seeds"] = {"0": {"cases": entry["cases"], "summary": entry["summary"]}}
    out["summary"] = {**entry["summary"], "seeds": {case: [0] for case in entry["cases"]}}
    return out


def run_config(
    name: str,
    steps: int,
    workdir: Path,
    run: tuple[str, ...],
    seeds: tuple[int, ...] = SEEDS,
    earlier: dict[str, Any] | None = None,
    lr: float = LR,
    warmup_steps: int = WARMUP_STEPS,
) -> dict[str, Any]:
    model, _ = CONFIGS[name]
    params = parameters(model)
    config_dir = workdir / name / f"byte-llama-{name}"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(model, indent=2))
    samples = steps * TARGET_BATCH
    print(
        f"{name}: byte-level Llama, hidden {model['hidden_size']}, "
        f"intermediate {model['intermediate_size']}, "
        f"{model['num_hidden_layers']} blocks, {params / 1e6:.2f} M parameters; {steps} steps of "
        f"{TARGET_BATCH} samples ({samples}), micro-batches of {MICRO_BATCH} x {DATA.seq_len - 1} bytes, "
        f"lr {lr:g} ({warmup_steps} warm-up steps); "
        f"seeds {', '.join(map(str, seeds))}",
        flush=True,
    )
    by_seed = stored_seeds(earlier, steps, lr, warmup_steps)
    for seed in seeds:
        settings = trainer_settings(config_dir, steps, seed, lr, warmup_steps)
        cases = by_seed.setdefault(seed, {})
        for case in run:
            result = run_case(case, name, settings, workdir / f"seed{seed}", config_dir)
            cases[case] = result
            extra = ""
            if result.per_trainer:
                extra = f", stage epochs {result.export_epochs}, {result.resent} re-sent"
                extra += f", averaging {result.bytes_per_sample:.0f} B/sample per stage peer"
                if len(result.per_trainer) > 1:
                    extra += ", samples per trainer " + "/".join(
                        str(t["samples"]) for t in result.per_trainer
                    )
            print(
                f"  seed {seed} {label(case):27} last-{WINDOW} {result.last(samples):.3f}  "
                f"held-out {result.held_out:.3f}  {len(result.curve)} micro-batches, {result.steps} steps "
                f"({result.steps_by(samples)} by {samples} samples), train {result.train_seconds:.0f} s "
                f"(case {result.case_seconds:.0f} s){extra}",
                flush=True,
            )
    by_seed = {
        seed: {c: cases[c] for c in ordered(cases)} for seed, cases in sorted(by_seed.items()) if cases
    }
    summaries = {seed: summarize(cases, samples, params) for seed, cases in by_seed.items()}
    return {
        "model": {k: v for k, v in model.items() if k != "model_type"},
        "params": params,
        "steps": steps,
        "settings": {
            "micro_batch_size": MICRO_BATCH,
            "in_flight": IN_FLIGHT,
            "target_batch_size": TARGET_BATCH,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "weight_decay": 0.01,
            "seq_len": DATA.seq_len - 1,
            "max_bytes": DATA.max_bytes,
            "stages": NUM_STAGES,
            "peers_per_stage": PEERS_PER_STAGE,
            "diloco_outer_lr": DILOCO_OUTER_LR,
            "diloco_outer_momentum": DILOCO_OUTER_MOMENTUM,
        },
        # The mean over the seeds (each case over the seeds it ran on: summary["seeds"]).
        "summary": mean_summary(summaries),
        "seeds": {
            str(seed): {
                "cases": {
                    case: {**asdict(c), "curve": [(round(t, 2), n, round(v, 4)) for t, n, v in c.curve]}
                    for case, c in cases.items()
                },
                "summary": summaries[seed],
            }
            for seed, cases in by_seed.items()
        },
    }


# ---- output -------------------------------------------------------------------------------------------


def running_mean(values: list[float], n: int = WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def mean_curves(r: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """Per case: samples and the loss of each micro-batch, averaged over the seeds the case ran on
    (every seed's curve has a point per micro-batch; cut to the shortest)."""
    out = {}
    for case, seeds in r["summary"]["seeds"].items():
        curves = [r["seeds"][str(seed)]["cases"][case]["curve"] for seed in seeds]
        n = min(len(c) for c in curves)
        samples = [s for _, s, _ in curves[0][:n]]
        out[case] = (samples, [sum(c[i][2] for c in curves) / len(curves) for i in range(n)])
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    """Loss against samples (running mean of WINDOW), all cases, one subplot per config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in CONFIGS if n in results and "seeds" in results[n]]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results[name]
        curves = mean_curves(r)
        for case, (samples, losses) in curves.items():
            smooth = running_mean(losses)
            gap = f", gap {r['summary'][f'gap_{case}']:+.3f}" if f"gap_{case}" in r["summary"] else ""
            text = f"{label(case)}: {r['summary'][f'last{WINDOW}_{case}']:.3f}{gap}"
            style = ":" if case == "local_shards" else "--" if case.startswith("diloco") else "-"
            ax.plot(samples, smooth, label=text, linewidth=1.2, linestyle=style)
        ax.axvline(r["summary"]["samples"], color="grey", linestyle=":", linewidth=1)
        seeds = sorted({seed for ss in r["summary"]["seeds"].values() for seed in ss})
        ax.set_title(
            f"{name}: {r['params'] / 1e6:.2f} M parameters, {r['steps']} steps, "
            + (f"mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
        )
        ax.set_xlabel("samples")
        ax.set_ylabel(f"loss, running mean of {WINDOW} micro-batches (nats/byte)")
        ax.legend(fontsize=8)
        tail = [
            v
            for xs, ys in curves.values()
            for s, v in zip(xs, ys, strict=True)
            if s > r["summary"]["samples"] / 3
        ]
        if tail:
            ax.set_ylim(min(tail) - 0.1, max(tail) + 0.1)
    fig.suptitle("SWARM training vs one process: same model, data order, optimizer and samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compact_json(value: Any) -> str:
    """Indented JSON with every innermost list (a curve's point, a list of numbers) on one line."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m[1]) + "]", text)


def _num(s: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    return format(s[key], fmt) if key in s else "n/a"


def averaging_line(s: dict[str, Any]) -> str | None:
    """`averaging: ...`: per averaging mode, averaging bytes per sample per stage peer and the loss
    gap to one process at equal samples; DiLoCo's against float32 gradient averaging (`swarm`)."""
    modes = [c for c in ("swarm", GRADIENTS_INT8) if f"averaging_bytes_per_sample_{c}" in s]
    modes += sorted(
        (
            k.removeprefix("averaging_bytes_per_sample_")
            for k in s
            if k.startswith("averaging_bytes_per_sample_diloco")
        ),
        key=lambda c: int(c.split("=")[1]),
    )
    if not modes:
        return None
    base = s.get("averaging_bytes_per_sample_swarm")
    parts = []
    for c in modes:
        bps = s[f"averaging_bytes_per_sample_{c}"]
        name = "gradients" if c == "swarm" else c
        fewer = f", {base / bps:.0f}x fewer" if base and c != "swarm" and bps > 0 else ""
        parts.append(f"{name} {bps:.0f} B/sample (loss gap {_num(s, f'gap_{c}', '+.3f')}{fewer})")
    return f"averaging: {'; '.join(parts)} per stage peer at {s['samples']} samples"


def summary_lines(name: str, r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    cases = list(s["seeds"])
    held = ", ".join(f"{label(c)} {s[f'held_out_{c}']:.3f}" for c in cases)
    wall = ", ".join(f"{c} {s[f'train_seconds_{c}']:.0f} s" for c in cases)
    compared = [c for c in cases if f"gap_{c}" in s]
    over = [
        label(c) for c in compared if abs(s[f"gap_{c}"]) > GAP_NOTE or abs(s[f"held_out_gap_{c}"]) > GAP_NOTE
    ]
    note = f"; gap above {GAP_NOTE} for: {', '.join(over)}" if over else ""
    gaps = ", ".join(
        f"{label(c)} {s[f'held_out_gap_{c}']:+.3f} (vs {label(reference(c) or '')})" for c in compared
    )
    all_seeds = sorted({seed for ss in s["seeds"].values() for seed in ss})
    fewer = [f"{label(c)} {', '.join(map(str, ss))}" for c, ss in s["seeds"].items() if ss != all_seeds]
    means = (
        f"mean of seeds {', '.join(map(str, all_seeds))}" if len(all_seeds) > 1 else f"seed {all_seeds[0]}"
    )
    if fewer:
        means += f" (only seeds: {'; '.join(fewer)})"
    lines = [
        f"{name} ({r['params'] / 1e6:.2f} M parameters, {r['steps']} steps, {means}): held-out {held}; "
        f"held-out gaps {gaps}; two trainers' last-{WINDOW} reference (one process, their data order) "
        f"{_num(s, f'last{WINDOW}_local_shards')}; training wall time {wall}{note}",
    ]
    if len(all_seeds) > 1:
        per_seed = []
        for seed in all_seeds:
            one = r["seeds"][str(seed)]["summary"]
            gaps = ", ".join(
                f"{c} {one[f'gap_{c}']:+.3f}/{one[f'held_out_gap_{c}']:+.3f}"
                for c in compared
                if f"gap_{c}" in one
            )
            per_seed.append(f"seed {seed}: {gaps}")
        lines.append(f"seeds (gap last-{WINDOW}/held-out): {'; '.join(per_seed)}")
    parting = [c for c in compared if f"same_steps_{c}" in s and not c.startswith("diloco")]
    if parting:
        lines.append(
            f"parting: steps with the reference's loss (within {SAME_TOL}) before the trajectories part: "
            + ", ".join(f"{label(c)} {s[f'same_steps_{c}']:.0f}" for c in parting)
            + f" of {r['steps']}"
        )
    averaging = averaging_line(s)
    if averaging:
        lines.append(averaging)
    if any(f"gap_{c}" in s for c in ("swarm", "int8", "lossless")):
        codecs = ", ".join(
            f"{name} {_num(s, f'last{WINDOW}_{c}')} (gap {_num(s, f'gap_{c}', '+.3f')})"
            for c, name in (("swarm", f"swarm {WIRE_CODEC}"), ("int8", "int8"), ("lossless", "lossless"))
        )
        lines.append(f"codecs: {codecs} at {s['samples']} samples")
    lines.append(
        f"convergence: local {_num(s, f'last{WINDOW}_local')}, swarm {_num(s, f'last{WINDOW}_swarm')} "
        f"(gap {_num(s, 'gap_swarm')}), two trainers {_num(s, f'last{WINDOW}_two_trainers')} "
        f"(gap {_num(s, 'gap_two_trainers')}), lossless swarm {_num(s, f'last{WINDOW}_lossless')} "
        f"at {s['samples']} samples"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=("demo", "large", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per config)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="configs, node logs, exports (default: a temp dir)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default: bench/results/convergence.json, or convergence_lrX_wN.json "
        "for another --lr or --warmup-steps)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated cases to run (default: all); the others keep their stored results when "
        f"the steps match; names: {', '.join(all_cases())} (any H)",
    )
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help="comma-separated seeds to run the cases on (default: %(default)s); seeds stored for a "
        "config with the same steps and not run again are kept, and every figure is the mean over "
        "the seeds a case has",
    )
    parser.add_argument("--lr", type=float, default=LR, help="AdamW learning rate (default: %(default)g)")
    parser.add_argument(
        "--warmup-steps", type=int, default=WARMUP_STEPS, help="linear warm-up steps (default: %(default)s)"
    )
    parser.add_argument("--trainer-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer_worker is not None:
        return trainer_worker(args.trainer_worker)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.lr > 0 or args.warmup_steps < 1:
        parser.error(f"--lr must be > 0 and --warmup-steps >= 1, got {args.lr} and {args.warmup_steps}")
    if args.out is None:  # results at other settings never replace the default's
        default = args.lr == LR and args.warmup_steps == WARMUP_STEPS
        tail = "" if default else f"_lr{args.lr:g}_w{args.warmup_steps}"
        args.out = Path(f"bench/results/convergence{tail}.json")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seeds takes one or more integers >= 0, got {args.seeds!r}")
    logging.basicConfig(level=logging.WARNING)
    from swarm.training.trainer import TrainerConfig

    default_codec = {f.name: f.default for f in fields(TrainerConfig)}["codec"]
    if default_codec != WIRE_CODEC:
        parser.error(f"the trainer's default codec is {default_codec!r}; set WIRE_CODEC to it")
    torch.set_num_threads(1)  # the reference as the trainers compute; the nodes need the cores
    names = list(CONFIGS) if args.config == "both" else [args.config]
    run = all_cases() if args.cases is None else tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in run if c not in all_cases() and not re.fullmatch(r"diloco H=[1-9][0-9]*", c)]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(all_cases())} (diloco H=any H)")
    stored: dict[str, Any] = {}
    if args.out.is_file():  # configs and cases not run this time keep their earlier results
        try:
            stored = json.loads(args.out.read_text()).get("configs", {})
        except (OSError, ValueError):
            stored = {}
        stored = {name: with_seeds(entry) for name, entry in stored.items()}

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="swarm-bench-convergence-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    began = time.monotonic()
    try:
        results: dict[str, Any] = {}
        for name in names:
            started = time.monotonic()
            steps = args.steps or CONFIGS[name][1]
            results[name] = run_config(
                name, steps, workdir, run, seeds, stored.get(name), args.lr, args.warmup_steps
            )
            results[name]["seconds"] = time.monotonic() - started
    except KeyboardInterrupt:
        print("\nconvergence: interrupted; every process started here was stopped", flush=True)
        return 130
    finally:
        if tmp is not None:
            tmp.cleanup()

    stored.update(results)
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "configs": {n: stored[n] for n in CONFIGS if n in stored},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(compact_json(out) + "\n")
    configs: dict[str, Any] = out["configs"]
    plotted = plot(configs, args.out.with_suffix(".png"))
    print(
        f"results: {args.out}"
        + (f", plot: {args.out.with_suffix('.png')}" if plotted else "")
        + f"; took {time.monotonic() - began:.0f} s",
        flush=True,
    )
    for name in names:
        for line in summary_lines(name, results[name]):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
