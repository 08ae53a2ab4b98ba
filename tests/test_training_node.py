"""Training nodes (issue 5, first part): stages with trainable weights behind hivemind.Optimizer.

What is checked here: the pure stage decisions, deterministic initial weights, and 2 stages x
2 peers training a byte-level model from a config: the loss falls and every peer's optimizer
takes steps, and the two peers of each stage begin every epoch with the same weights.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from hivemind.dht import DHT

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.dht import start_dht
from swarm.errors import ConfigError
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node.training import choose_stage, stage_blocks
from swarm.records import NodeIdentity, ServerRecord, ServerState
from swarm.training.data import VOCAB_SIZE, DataConfig
from swarm.training.stages import read_config, run_id, stage_span
from swarm.training.trainer import Progress, Trainer, TrainerConfig

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def record(
    peer: str, stage: int | None, throughput: float, state: ServerState = ServerState.ONLINE
) -> ServerRecord:
    return ServerRecord(
        state=state,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        model="m",
        start=0,
        end=2,
        throughput=throughput,
        trainable_stage=stage,
        software_version=swarm.__version__,
    )


def test_stage_spans_cover_the_model_in_order() -> None:
    assert [stage_span(10, 3, k) for k in range(3)] == [(0, 3), (3, 7), (7, 10)]
    assert [stage_span(4, 2, k) for k in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(ConfigError, match=r"--num-stages must be in 1\.\.4"):
        stage_span(4, 5, 0)
    with pytest.raises(ConfigError, match=r"--stage must be in 0\.\.1"):
        stage_span(4, 2, 2)


def test_auto_stage_is_the_least_served() -> None:
    assert choose_stage([], 3) == 0
    peers = [record("a", 0, 5.0), record("b", 1, 2.0), record("c", 2, 3.0)]
    assert choose_stage(peers, 3) == 1
    # offline peers and inference servers do not count
    assert choose_stage([*peers, record("d", 1, 9.0, ServerState.OFFLINE), record("e", None, 9.0)], 3) == 1
    assert choose_stage([record("a", 0, 1.0)], 2) == 1


def test_run_id_is_a_valid_hivemind_prefix() -> None:
    assert run_id("Llama-3.1-8B", 2) == "Llama-3_1-8B-stage2"
    assert "." not in run_id("org/model.v2", 0)


def test_initial_weights_depend_only_on_seed_and_block(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    config = read_config(str(tmp_path))
    first = stage_blocks(str(tmp_path), config, (0, 2), seed=7)
    again = stage_blocks(str(tmp_path), config, (1, 3), seed=7)  # another stage layout
    assert torch.equal(first[1].mlp.up_proj.weight, again[0].mlp.up_proj.weight)
    assert not torch.equal(first[0].mlp.up_proj.weight, first[1].mlp.up_proj.weight)
    assert torch.equal(first[0].input_layernorm.weight, torch.ones(64))
    assert abs(float(first[0].self_attn.q_proj.weight.std()) - 0.02) < 0.002
    with pytest.raises(ConfigError, match=r"config\.json"):
        read_config(str(tmp_path / "nowhere"))


# ---- a real swarm ---------------------------------------------------------------------------------

TRAIN = ("--train", "--num-stages", "2", "--target-batch-size", "32", "--lr", "3e-3", "--warmup-steps", "2")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "byte-llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return path


@pytest.fixture(scope="module")
def training_swarm(tmp_path_factory: pytest.TempPathFactory, config_dir: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        for i, stage in enumerate((0, 1, 0, 1)):
            local.start_node(config_dir, None, *TRAIN, "--stage", str(stage), name=f"train-{i}")
        yield local


def get_state(address: str) -> tuple[int, dict[str, torch.Tensor], dict[int, list[float]]]:
    """(epoch, weights by name, weight fingerprints by epoch) of a training node."""
    with grpc.insecure_channel(address) as channel:
        request = swarm_pb2.StateRequest(protocol_version=swarm.PROTOCOL_VERSION, model="byte-llama")
        chunks = list(swarm_pb2_grpc.BlockServiceStub(channel).GetState(request, timeout=60))
    weights = {t.name: wire.decode_tensor(t.tensor) for c in chunks for t in c.tensors}
    prints = {f.epoch: list(f.sum_of_squares) for f in chunks[-1].fingerprints}
    return chunks[-1].epoch, weights, prints


def assert_in_step(a: dict[int, list[float]], b: dict[int, list[float]], at_least: int) -> list[int]:
    """Two peers of a stage began every epoch they share with the same weights (to float rounding)."""
    shared = sorted(set(a) & set(b))
    assert len(shared) >= at_least, (sorted(a), sorted(b))
    for epoch in shared:
        assert a[epoch] == pytest.approx(b[epoch], rel=1e-5), f"weights differ at epoch {epoch}"
    return shared


def trainer_for(local: LocalSwarm, config_dir: Path, **overrides: object) -> tuple[Trainer, DHT]:
    identity = NodeIdentity.generate()
    dht = start_dht(initial_peers=local.initial_peers, identity=identity)
    settings: dict[str, object] = dict(
        model=str(config_dir),
        steps=16,
        micro_batch_size=8,
        in_flight=4,
        target_batch_size=32,
        lr=3e-3,
        warmup_steps=2,
        codec="none",
        data=DataConfig(seq_len=65, max_bytes=1 << 20),
    )
    settings.update(overrides)
    return Trainer(TrainerConfig(**settings), dht, identity), dht  # type: ignore[arg-type]


def test_two_stages_of_two_peers_train_in_step(training_swarm: LocalSwarm, config_dir: Path) -> None:
    nodes = [p for p in training_swarm.processes if p.name.startswith("train-")]
    assert [p.info["stage"] for p in nodes] == [0, 1, 0, 1]
    assert [p.info["span"] for p in nodes] == ["0:2", "2:4", "0:2", "2:4"]
    trainer, dht = trainer_for(training_swarm, config_dir)
    try:
        progress = trainer.train()
    finally:
        trainer.shutdown()
        dht.shutdown()
    losses = [loss for _, _, loss in progress.losses]
    loss = f"{losses[0]:.2f} -> {progress.recent_loss(5):.2f}"
    print(f"training: loss {loss} in {progress.step} steps, {progress.completed} micro-batches")
    assert progress.step >= 16
    assert progress.issued == progress.completed == len(losses)
    assert progress.recent_loss(5) < 0.85 * losses[0], losses

    config = LlamaConfig.from_hf_dict(HF_CONFIG)
    states = [get_state(node.info["grpc_address"]) for node in nodes]
    for (epoch, weights, _), span in zip(states, ((0, 2), (2, 4), (0, 2), (2, 4)), strict=True):
        assert epoch >= 3  # every peer's optimizer stepped with its stage
        names = {
            f"model.layers.{i}.{n}" for i in range(*span) for n, _ in LlamaBlock(config).named_parameters()
        }
        assert set(weights) == names
        assert all(torch.isfinite(t).all() for t in weights.values())
    for a, b in ((0, 2), (1, 3)):  # the two peers of each stage, after every step they both took
        shared = assert_in_step(states[a][2], states[b][2], at_least=4)
        assert max(shared) >= 3
        assert states[a][2][0] != pytest.approx(states[a][2][max(shared)], rel=1e-5)  # they did train


def test_a_killed_peer_loses_nothing_and_its_replacement_takes_part(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path
) -> None:
    with LocalSwarm(tmp_path_factory.mktemp("faults")) as local:
        local.start_dht()
        nodes = [
            local.start_node(config_dir, None, *TRAIN, "--stage", str(stage), name=f"peer-{i}")
            for i, stage in enumerate((0, 1, 0, 1))
        ]
        trainer, dht = trainer_for(local, config_dir, steps=10_000, max_seconds=240)
        progressed = threading.Condition()
        outcome: dict[str, object] = {}

        def on_progress(_: Progress) -> None:
            with progressed:
                progressed.notify_all()

        def train() -> None:
            try:
                outcome["progress"] = trainer.train(on_progress)
            except BaseException as e:  # reported by the assertions below
                outcome["error"] = e
            finally:
                with progressed:
                    progressed.notify_all()

        runner = threading.Thread(target=train, name="trainer")
        try:
            runner.start()
            with progressed:  # train a few steps with all four peers
                assert progressed.wait_for(lambda: trainer.progress.step >= 3 or bool(outcome), timeout=120)
            assert not outcome, outcome
            local.stop(nodes[3], signal.SIGKILL)  # a stage-1 peer dies with micro-batches in flight

            replacement = local.start_node(config_dir, None, *TRAIN, "--stage", "auto", name="replacement")
            assert replacement.info["stage"] == 1  # the stage that lost a peer
            joined_at = replacement.info["epoch"]
            assert joined_at >= 1  # it loaded the stage's state, not fresh weights

            def took_part() -> bool:  # two steps with its mate since it joined
                epoch, _, _ = get_state(replacement.info["grpc_address"])
                return epoch >= joined_at + 2 or bool(outcome)

            deadline = time.monotonic() + 120
            while not took_part() and time.monotonic() < deadline:
                with progressed:
                    progressed.wait(timeout=5.0)  # woken by the next micro-batch
        finally:
            trainer.stop()
            runner.join(timeout=120)
            trainer.shutdown()
            dht.shutdown()

        assert "error" not in outcome, outcome
        progress = outcome["progress"]
        assert isinstance(progress, Progress)
        print(f"faults: {progress.completed} micro-batches, {progress.resent} re-sent after the kill")
        assert progress.issued == progress.completed  # none lost, none counted twice
        assert progress.resent >= 1
        _, _, mate = get_state(nodes[1].info["grpc_address"])
        _, _, new = get_state(replacement.info["grpc_address"])
        shared = assert_in_step(mate, new, at_least=2)
        assert max(shared) >= joined_at + 2
