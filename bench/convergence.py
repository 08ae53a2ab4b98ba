"""Does SWARM training learn what one process learns? The same model, data and schedule, five ways.

    python bench/convergence.py [--config demo|large|both] [--steps N] [--cases A,B] [--out FILE.json]

Every case trains the same byte-level Llama from the same initial weights (the client parts and
block i drawn from the seed, as the nodes and the trainer draw them) on the Python standard
library's sources with the same optimizer settings (AdamW, lr 1e-2, 5 warm-up steps, weight decay
0.01), micro-batches of 8 sequences of 128 bytes and 64 samples per optimizer step, for the same
number of steps, so the same number of samples:

  local         one process (swarm.training.local.train_locally): the reference;
  local_shards  one process on the two trainers' data order (each step takes half its
                micro-batches from shard 0 of 2, half from shard 1): their reference;
  swarm         a local swarm of 2 stages x 2 peers (real `swarm-node join --train` processes, one
                torch thread each) and one trainer, 4 micro-batches in flight, activations and
                gradients in the trainer's default codec (bf16) on the wire;
  two trainers  the same swarm (fresh) with two trainers at once, each in its own process, on
                disjoint shards of the data (--shard 0 2 and 1 2); each step's micro-batches are
                split between them (4 each), and each waits at every step boundary as a lone
                trainer does, so every stage computes a step's micro-batches with that step's
                weights, as one process does;
  lossless      the same swarm as `swarm` (fresh) with the lossless codec ("none");
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

Writes bench/results/convergence.json (every curve and the summary per config; configs not run
keep their earlier entry) and convergence.png (running mean of 20 micro-batches against samples).
For each config the last two lines printed are one naming it (with the held-out losses and wall
times) and

    averaging: gradients B B/sample (loss gap G); gradients int8 ...; diloco H=4 B B/sample (loss
        gap G, Rx fewer); ... per stage peer at N samples
    codecs: swarm bf16 S (gap G), int8 V (gap W), lossless U (gap X) at N samples
    convergence: local L, swarm S (gap G), two trainers T (gap H), lossless swarm U at N samples

(gap = the case minus its one-process reference: local, or local_shards for two trainers; n/a for
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
# What the demo trained with when issue 11's parity figures were taken (trainers and nodes alike);
# the demo has since moved to batches of 16 at lr 3e-3, bf16 on the wire (docs/benchmarks.md).
MICRO_BATCH, IN_FLIGHT, TARGET_BATCH = 8, 4, 64
LR, WARMUP_STEPS, SEED = 1e-2, 5, 0
DATA = DataConfig(seq_len=129, max_bytes=16 << 20, seed=SEED)
NUM_STAGES, PEERS_PER_STAGE = 2, 2
WINDOW = 20  # micro-batches in the compared mean and in the plot's running mean
GAP_NOTE = 0.05  # a gap above this is called out in the output (nothing is tuned to close it)
PARITY_CASES = ("local", "local_shards", "swarm", "two_trainers", "lossless", "int8")
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
    "swarm": "swarm (bf16)",
    "two_trainers": "two trainers (bf16)",
    "lossless": "swarm (lossless)",
    "int8": "swarm (int8)",
    GRADIENTS_INT8: "gradients, int8 averaging",
}
# What each case is compared with: one process on the same sequences in the same steps. Two
# trainers read other sequences than one does (shards 0 and 1, half of each step from each), and
# the order of the data alone moves the last-20 mean by about 0.1 at this length (measured).
REFERENCE = {
    "swarm": "local",
    "two_trainers": "local_shards",
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
    if case == "lossless":
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


def trainer_settings(config_dir: Path, steps: int) -> dict[str, Any]:
    """TrainerConfig fields (JSON-able) shared by every case."""
    return {
        "model": str(config_dir),
        "steps": steps,
        "micro_batch_size": MICRO_BATCH,
        "in_flight": IN_FLIGHT,
        "target_batch_size": TARGET_BATCH,
        "lr": LR,
        "warmup_steps": WARMUP_STEPS,
        "seed": SEED,
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


def local_case(settings: dict[str, Any], name: str = "local", trainers: int = 1) -> Case:
    from swarm.training.local import train_locally

    began = time.monotonic()
    run = train_locally(trainer_config(settings), trainers=trainers, evaluate_every=settings["steps"])
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
        *("--lr", str(LR), "--warmup-steps", str(WARMUP_STEPS), "--seed", str(SEED)),
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
    held_out = evaluate(parts, blocks)

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


_VALIDATION: dict[str, Any] = {}


def evaluate(parts: Any, blocks: Any) -> float:
    """held_out_loss on the validation sequences every trainer holds out (the same in every case)."""
    from swarm.training.data import ByteDataset
    from swarm.training.local import held_out_loss

    if "data" not in _VALIDATION:
        _VALIDATION["data"] = ByteDataset(DATA)
    return held_out_loss(parts, blocks, _VALIDATION["data"])


def run_case(case: str, name: str, settings: dict[str, Any], workdir: Path, config_dir: Path) -> Case:
    if case == "local":
        return local_case(settings)
    if case == "local_shards":
        return local_case(settings, case, trainers=2)
    trainers = 2 if case == "two_trainers" else 1
    codec = wire_codec(case)
    folder = workdir / name / re.sub(r"[^A-Za-z0-9_]", "", case.replace(" ", "_"))
    return swarm_case(case, folder, config_dir, settings, trainers, codec)


def stored_cases(earlier: dict[str, Any] | None, steps: int) -> dict[str, Case]:
    """The cases of an earlier run of this config with the same steps (kept when not run again)."""
    if not earlier or earlier.get("steps") != steps:
        return {}
    names = {f.name for f in fields(Case)}
    out = {}
    for case, d in earlier.get("cases", {}).items():
        kept = {k: v for k, v in d.items() if k in names}
        kept["curve"] = [tuple(point) for point in kept["curve"]]
        out[case] = Case(**kept)
    return out


def run_config(
    name: str, steps: int, workdir: Path, run: tuple[str, ...], earlier: dict[str, Any] | None = None
) -> dict[str, Any]:
    model, _ = CONFIGS[name]
    params = parameters(model)
    config_dir = workdir / name / f"byte-llama-{name}"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(model, indent=2))
    settings = trainer_settings(config_dir, steps)
    samples = steps * TARGET_BATCH
    print(
        f"{name}: byte-level Llama, hidden {model['hidden_size']}, "
        f"intermediate {model['intermediate_size']}, "
        f"{model['num_hidden_layers']} blocks, {params / 1e6:.2f} M parameters; {steps} steps of "
        f"{TARGET_BATCH} samples ({samples}), micro-batches of {MICRO_BATCH} x {DATA.seq_len - 1} bytes",
        flush=True,
    )
    cases = stored_cases(earlier, steps)
    for case in run:
        result = run_case(case, name, settings, workdir, config_dir)
        cases[case] = result
        extra = ""
        if result.per_trainer:
            extra = f", stage epochs {result.export_epochs}, {result.resent} re-sent"
            extra += f", averaging {result.bytes_per_sample:.0f} B/sample per stage peer"
            if len(result.per_trainer) > 1:
                extra += ", samples per trainer " + "/".join(str(t["samples"]) for t in result.per_trainer)
        print(
            f"  {label(case):27} last-{WINDOW} {result.last(samples):.3f}  held-out {result.held_out:.3f}  "
            f"{len(result.curve)} micro-batches, {result.steps} steps ({result.steps_by(samples)} by "
            f"{samples} samples), train {result.train_seconds:.0f} s "
            f"(case {result.case_seconds:.0f} s){extra}",
            flush=True,
        )
    order = [c for c in all_cases(tuple(int(c.split("=")[1]) for c in cases if c.startswith("diloco H=")))]
    cases = {c: cases[c] for c in sorted(cases, key=lambda c: order.index(c) if c in order else len(order))}
    last = {case: c.last(samples) for case, c in cases.items()}
    compared = {case: ref for case in cases if (ref := reference(case)) is not None and ref in cases}
    summary = {
        "samples": samples,
        "params": params,
        **{f"last{WINDOW}_{case}": last[case] for case in cases},
        **{f"gap_{case}": last[case] - last[ref] for case, ref in compared.items()},
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
    return {
        "model": {k: v for k, v in model.items() if k != "model_type"},
        "params": params,
        "steps": steps,
        "settings": {
            "micro_batch_size": MICRO_BATCH,
            "in_flight": IN_FLIGHT,
            "target_batch_size": TARGET_BATCH,
            "lr": LR,
            "warmup_steps": WARMUP_STEPS,
            "weight_decay": 0.01,
            "seed": SEED,
            "seq_len": DATA.seq_len - 1,
            "max_bytes": DATA.max_bytes,
            "stages": NUM_STAGES,
            "peers_per_stage": PEERS_PER_STAGE,
            "diloco_outer_lr": DILOCO_OUTER_LR,
            "diloco_outer_momentum": DILOCO_OUTER_MOMENTUM,
        },
        "cases": {
            case: {**asdict(c), "curve": [(round(t, 2), n, round(v, 4)) for t, n, v in c.curve]}
            for case, c in cases.items()
        },
        "summary": summary,
    }


# ---- output -------------------------------------------------------------------------------------------


def running_mean(values: list[float], n: int = WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    """Loss against samples (running mean of WINDOW), all cases, one subplot per config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in CONFIGS if n in results]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results[name]
        for case in r["cases"]:
            curve = r["cases"][case]["curve"]
            samples = [s for _, s, _ in curve]
            smooth = running_mean([loss for _, _, loss in curve])
            gap = f", gap {r['summary'][f'gap_{case}']:+.3f}" if f"gap_{case}" in r["summary"] else ""
            text = f"{label(case)}: {r['summary'][f'last{WINDOW}_{case}']:.3f}{gap}"
            style = ":" if case == "local_shards" else "--" if case.startswith("diloco") else "-"
            ax.plot(samples, smooth, label=text, linewidth=1.2, linestyle=style)
        ax.axvline(r["summary"]["samples"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{name}: {r['params'] / 1e6:.2f} M parameters, {r['steps']} steps")
        ax.set_xlabel("samples")
        ax.set_ylabel(f"loss, running mean of {WINDOW} micro-batches (nats/byte)")
        ax.legend(fontsize=8)
        tail = [v for c in r["cases"].values() for _, s, v in c["curve"] if s > r["summary"]["samples"] / 3]
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
    cases = list(r["cases"])
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
    lines = [
        f"{name} ({r['params'] / 1e6:.2f} M parameters, {r['steps']} steps): held-out {held}; "
        f"held-out gaps {gaps}; two trainers' last-{WINDOW} reference (one process, their data order) "
        f"{_num(s, f'last{WINDOW}_local_shards')}; training wall time {wall}{note}",
    ]
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
        "--out", type=Path, default=Path("bench/results/convergence.json"), help="JSON results"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated cases to run (default: all); the others keep their stored results when "
        f"the steps match; names: {', '.join(all_cases())} (any H)",
    )
    parser.add_argument("--trainer-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer_worker is not None:
        return trainer_worker(args.trainer_worker)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
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

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="swarm-bench-convergence-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    began = time.monotonic()
    try:
        results: dict[str, Any] = {}
        for name in names:
            started = time.monotonic()
            results[name] = run_config(name, args.steps or CONFIGS[name][1], workdir, run, stored.get(name))
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
