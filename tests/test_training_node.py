"""Training nodes (issue 5, first part): stages with trainable weights behind hivemind.Optimizer.

What is checked here: the pure stage decisions, deterministic initial weights, and 2 stages x
2 peers training a byte-level model from a config: the loss falls and every peer's optimizer
takes steps, and the two peers of each stage begin every epoch with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.dht import DHT
from hypothesis import given
from hypothesis import strategies as st

import swarm
from swarm import tls, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.dht import start_dht
from swarm.errors import ConfigError
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node.training import choose_stage, plan_stage_move, stage_blocks
from swarm.records import NodeIdentity, ServerRecord, ServerState
from swarm.training.data import DataConfig
from swarm.training.stages import read_config, run_id, stage_span
from swarm.training.trainer import Progress, Trainer, TrainerConfig
from tests.checkpoints import BYTE_CONFIG

HF_CONFIG = BYTE_CONFIG


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


def test_a_peer_moves_only_from_the_best_to_the_worst_served_stage_when_it_pays() -> None:
    # stage 0 has three peers of 10, stage 1 one of 10: a stage-0 peer raises the bottleneck 10 -> 20
    assert plan_stage_move([30.0, 10.0], [3, 1], mine=0, my_throughput=10.0, threshold=0.15) == 1
    assert plan_stage_move([30.0, 10.0], [3, 1], mine=1, my_throughput=10.0, threshold=0.15) is None
    # balanced (20 / 20): moving would make the other stage the bottleneck
    assert plan_stage_move([20.0, 20.0], [2, 2], mine=0, my_throughput=10.0, threshold=0.15) is None
    # a gain below the threshold is not worth the move (bottleneck 10 -> 11)
    assert plan_stage_move([12.0, 10.0, 11.0], [2, 1, 1], mine=0, my_throughput=1.0, threshold=0.15) is None
    # never leave a stage empty, but always fill an empty one
    assert plan_stage_move([10.0, 0.0], [1, 0], mine=0, my_throughput=10.0, threshold=0.15) is None
    assert plan_stage_move([20.0, 0.0], [2, 0], mine=0, my_throughput=10.0, threshold=0.15) == 1


@given(
    st.lists(st.lists(st.floats(1.0, 100.0), min_size=1, max_size=4), min_size=2, max_size=4),
    st.floats(0.0, 0.5),
)
def test_stage_moves_always_raise_the_bottleneck_so_they_end(
    stages: list[list[float]], threshold: float
) -> None:
    """Apply moves until none is planned: each raises the minimum stage total, so it terminates."""
    stages = [list(s) for s in stages]
    for _ in range(100):
        totals = [sum(s) for s in stages]
        moves = [
            (k, i, target)
            for k, s in enumerate(stages)
            for i, t in enumerate(s)
            if (target := plan_stage_move(totals, [len(x) for x in stages], k, t, threshold)) is not None
        ]
        if not moves:
            return
        k, i, target = moves[0]
        stages[target].append(stages[k].pop(i))
        assert min(sum(s) for s in stages) > min(totals)
    raise AssertionError("peers kept moving")


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
            metrics = ("--metrics-port", "0") if i == 1 else ()
            local.start_node(config_dir, None, *TRAIN, "--stage", str(stage), *metrics, name=f"train-{i}")
        yield local


def get_state(info: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor], dict[int, list[float]]]:
    """(epoch, weights by name, weight fingerprints by epoch) of a training node (its ready line)."""
    with tls.sync_channel(info["grpc_address"], info.get("tls_cert_sha256")) as channel:
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
    # The trainer spot-checked the stage peers against each other, and compared answers only when
    # both came from the same stage weights: a mate one step ahead is no liar.
    checker = trainer.checker
    assert checker.checks > checker.incomparable, (checker.checks, checker.incomparable)
    assert checker.disagreements == 0 and checker.convicted == []

    config = LlamaConfig.from_hf_dict(HF_CONFIG)
    states = [get_state(node.info) for node in nodes]
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

    # A training node serves its metrics too (--metrics-port): its steps and averaging traffic.
    url = f"http://127.0.0.1:{nodes[1].info['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = [line.split(" ") for line in text.splitlines() if line and not line.startswith("#")]
    values = {name: float(value) for name, value, *_ in samples}
    assert values["swarm_node_training_steps_total"] >= 3
    assert values['swarm_node_averaging_bytes_total{direction="sent"}'] > 0
    assert values['swarm_node_state{state="online"}'] == 1
    assert values["swarm_node_span_start"] == 2


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

            def stage_1_stepped() -> bool:  # the stages lag the trainer's own steps a little
                if outcome or trainer.progress.step < 3:
                    return bool(outcome)
                return get_state(nodes[1].info)[0] >= 2

            with progressed:  # train a few steps with all four peers
                assert progressed.wait_for(stage_1_stepped, timeout=180)
            assert not outcome, outcome
            local.stop(nodes[3], signal.SIGKILL)  # a stage-1 peer dies with micro-batches in flight

            replacement = local.start_node(config_dir, None, *TRAIN, "--stage", "auto", name="replacement")
            assert replacement.info["stage"] == 1  # the stage that lost a peer
            joined_at = replacement.info["epoch"]
            assert joined_at >= 1  # it loaded the stage's state, not fresh weights

            def took_part() -> bool:  # two steps with its mate since it joined
                epoch, _, _ = get_state(replacement.info)
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
        _, _, mate = get_state(nodes[1].info)
        _, _, new = get_state(replacement.info)
        shared = assert_in_step(mate, new, at_least=2)
        assert max(shared) >= joined_at + 2


def ready_info(local: LocalSwarm, node: NodeProcess) -> dict[str, object]:
    """The node's latest ready line (a node that moves to another stage writes it again)."""
    info: dict[str, object] = json.loads((local.workdir / f"{node.name}.ready.json").read_text())
    return info


def test_a_peer_moves_to_the_stage_that_lost_its_peers_and_a_stage_resumes_from_its_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path
) -> None:
    saved = tmp_path_factory.mktemp("stage-checkpoints")
    with LocalSwarm(tmp_path_factory.mktemp("moves")) as local:
        local.start_dht()
        fixed = ("--checkpoint-dir", str(saved), "--checkpoint-every", "2")
        p0 = local.start_node(
            config_dir, None, *TRAIN, "--stage", "0", "--throughput", "10", *fixed, name="p0"
        )
        p1 = local.start_node(config_dir, None, *TRAIN, "--stage", "1", "--throughput", "1", name="p1")
        auto = (*TRAIN, "--throughput", "10", "--rebalance-period", "1")
        a = local.start_node(config_dir, None, *auto, name="a")
        b = local.start_node(config_dir, None, *auto, name="b")
        # auto peers join the least-served stage: a -> stage 1 (1 < 10), then b -> stage 0 (10 < 11)
        assert (a.info["stage"], b.info["stage"]) == (1, 0)

        trainer, dht = trainer_for(local, config_dir, steps=8)
        try:
            trainer.train()
        finally:
            trainer.shutdown()
            dht.shutdown()

        # stage 1 falls to 1 token/s against stage 0's 20: b's move lifts the bottleneck to 10
        local.stop(a, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while ready_info(local, b)["stage"] != 1:
            assert b.proc.poll() is None, b.log_tail()
            assert time.monotonic() < deadline, b.log_tail()
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.proc.wait(timeout=0.2)  # the poll interval
        moved = ready_info(local, b)
        assert moved["span"] == "2:4"
        epoch_p1, weights_p1, _ = get_state(p1.info)
        epoch_b, weights_b, _ = get_state(moved)
        assert epoch_b == epoch_p1 >= 1  # it loaded the stage's state before serving
        assert all(torch.equal(weights_b[name], weights_p1[name]) for name in weights_p1)

        # stage 0's last peer stops (saving its state); a new one resumes from that checkpoint
        epoch_p0, weights_p0, _ = get_state(p0.info)
        assert local.stop(p0) == 0
        assert (saved / f"{run_id('byte-llama', 0)}.pt").is_file()
        again = local.start_node(config_dir, None, *TRAIN, "--stage", "0", *fixed, name="p0-again")
        assert again.info["epoch"] == epoch_p0 >= 1
        _, weights_again, _ = get_state(again.info)
        assert all(torch.equal(weights_again[name], weights_p0[name]) for name in weights_p0)
