"""Training nodes (issue 5, first part): stages with trainable weights behind hivemind.Optimizer.

What is checked here: the pure stage decisions, deterministic initial weights, and 2 stages x
2 peers training a byte-level model from a config: the loss falls and every peer's optimizer
takes steps. Keeping the peers of a stage identical after each step is not reached yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.config import ClientConfig
from swarm.client.model import DistributedModelForCausalLM
from swarm.dht import start_dht
from swarm.errors import ConfigError
from swarm.localswarm import LocalSwarm
from swarm.models.llama import ClientParts, LlamaBlock, LlamaConfig, init_weights
from swarm.node.training import choose_stage, stage_blocks
from swarm.records import ServerRecord, ServerState
from swarm.training.data import VOCAB_SIZE, ByteDataset, DataConfig
from swarm.training.stages import read_config, run_id, stage_span

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


def get_state(address: str) -> tuple[int, dict[str, torch.Tensor]]:
    with grpc.insecure_channel(address) as channel:
        request = swarm_pb2.StateRequest(protocol_version=swarm.PROTOCOL_VERSION, model="byte-llama")
        chunks = list(swarm_pb2_grpc.BlockServiceStub(channel).GetState(request, timeout=60))
    return chunks[-1].epoch, {t.name: wire.decode_tensor(t.tensor) for c in chunks for t in c.tensors}


def test_two_stages_of_two_peers_train_a_byte_model(training_swarm: LocalSwarm) -> None:
    nodes = [p for p in training_swarm.processes if p.name.startswith("train-")]
    assert [p.info["stage"] for p in nodes] == [0, 1, 0, 1]
    assert [p.info["span"] for p in nodes] == ["0:2", "2:4", "0:2", "2:4"]
    config = LlamaConfig.from_hf_dict(HF_CONFIG)
    parts = ClientParts(config)
    init_weights(parts, seed=0)
    dht = start_dht(initial_peers=training_swarm.initial_peers, client_mode=True)
    model = DistributedModelForCausalLM("byte-llama", config, parts, dht, ClientConfig())
    try:
        data = ByteDataset(DataConfig(seq_len=64, max_bytes=1 << 20))
        optimizer = torch.optim.AdamW(parts.parameters(), lr=3e-3)
        losses = []
        for step in range(40):
            batch = data.batch(step, 8)
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        model.shutdown()
    print(f"training: loss {losses[0]:.2f} -> {sum(losses[-5:]) / 5:.2f} (mean of the last 5) in 40 steps")
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses

    for node, span in zip(nodes, ((0, 2), (2, 4), (0, 2), (2, 4)), strict=True):
        epoch, state = get_state(node.info["grpc_address"])
        assert epoch >= 1, node.name  # its optimizer stepped with the stage's collaboration
        names = {
            f"model.layers.{i}.{n}" for i in range(*span) for n, _ in LlamaBlock(config).named_parameters()
        }
        assert set(state) == names
        assert all(torch.isfinite(t).all() for t in state.values())
