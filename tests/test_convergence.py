"""SWARM training learns what one process learns (the short form of bench/convergence.py).

A local swarm of 2 stages x 2 training peers and one trainer (bf16 on the wire, 4 micro-batches in
flight) trains the tiny byte-level Llama for 12 steps of 32 samples; swarm.training.local trains
the same model from the same initial weights on the same data order with the same optimizer
settings in this process. At equal samples the swarm's loss must be within TOLERANCE of the
one-process run's, and it must have fallen by far more than that (so the tolerance tells a swarm
that learns clearly worse from one that does not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.dht import start_dht
from swarm.localswarm import LocalSwarm
from swarm.records import NodeIdentity
from swarm.training.data import DataConfig
from swarm.training.local import LocalRun, train_locally
from swarm.training.trainer import Progress, Trainer, TrainerConfig
from tests.checkpoints import BYTE_CONFIG

STEPS, MICRO_BATCH, TARGET_BATCH, LR, WARMUP_STEPS = 12, 8, 32, 1e-2, 2
SAMPLES = STEPS * TARGET_BATCH
WINDOW = 10  # micro-batches in the compared mean
TOLERANCE = 0.1  # nats per byte
TRAIN = (
    *("--train", "--num-stages", "2", "--target-batch-size", str(TARGET_BATCH)),
    *("--lr", str(LR), "--warmup-steps", str(WARMUP_STEPS), "--seed", "0"),
    *("--device", "cpu", "--dtype", "float32"),
)


@dataclass(frozen=True)
class Runs:
    swarm: Progress
    local: LocalRun


def tail_mean(losses: list[tuple[float, int, float]], samples: int = SAMPLES, n: int = WINDOW) -> float:
    """Mean loss of the last `n` micro-batches with at most `samples` samples."""
    tail = [loss for _, s, loss in losses if s <= samples][-n:]
    assert len(tail) == n, f"only {len(tail)} micro-batches up to {samples} samples"
    return sum(tail) / n


def first_step(losses: list[tuple[float, int, float]]) -> float:
    """Mean loss of the first optimizer step's micro-batches (all computed with the initial weights)."""
    first = [loss for _, s, loss in losses if s <= TARGET_BATCH]
    assert len(first) == TARGET_BATCH // MICRO_BATCH
    return sum(first) / len(first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    config_dir = tmp_path_factory.mktemp("cfg") / "byte-llama"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(BYTE_CONFIG))
    cfg = TrainerConfig(
        model=str(config_dir),
        steps=STEPS,
        micro_batch_size=MICRO_BATCH,
        in_flight=4,
        target_batch_size=TARGET_BATCH,
        lr=LR,
        warmup_steps=WARMUP_STEPS,
        seed=0,
        data=DataConfig(seq_len=65, max_bytes=1 << 20, seed=0),
    )
    assert cfg.codec == "bf16"  # what a user's trainer sends
    local = train_locally(cfg)
    with LocalSwarm(Path(tmp_path_factory.mktemp("swarm"))) as swarm:
        swarm.start_dht()
        for i, stage in enumerate((0, 1, 0, 1)):
            swarm.start_node(config_dir, None, *TRAIN, "--stage", str(stage), name=f"train-{i}")
        identity = NodeIdentity.generate()
        dht = start_dht(initial_peers=swarm.initial_peers, identity=identity)
        trainer = Trainer(cfg, dht, identity)
        try:
            progress = trainer.train()
        finally:
            trainer.shutdown()
            dht.shutdown()
    yield Runs(progress, local)


def test_the_swarm_takes_the_same_steps_on_the_same_samples(runs: Runs) -> None:
    assert runs.swarm.step == STEPS
    assert runs.swarm.issued == runs.swarm.completed == len(runs.swarm.losses)
    assert [s for _, s, _ in runs.swarm.losses] == [s for _, s, _ in runs.local.losses]
    assert runs.local.losses[-1][1] == SAMPLES


def test_the_swarm_learns_as_one_process_does(runs: Runs) -> None:
    swarm, local = tail_mean(runs.swarm.losses), tail_mean(runs.local.losses)
    print(f"convergence: local {local:.3f}, swarm {swarm:.3f} (gap {swarm - local:.3f}) at {SAMPLES} samples")
    # Both start from the same weights on the same micro-batches of the first step (the swarm's
    # complete in any order), and both learned: the fall is many times the tolerance, so a swarm
    # that learns clearly worse lands outside it.
    first = first_step(runs.swarm.losses)
    assert first == pytest.approx(first_step(runs.local.losses), abs=0.02)
    assert local < first - 5 * TOLERANCE, (first, local)
    assert swarm < first - 5 * TOLERANCE, (first, swarm)
    assert abs(swarm - local) <= TOLERANCE, f"swarm {swarm:.3f} vs one process {local:.3f}"
