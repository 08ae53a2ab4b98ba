"""`swarm export`: a model trained on the swarm comes back as a transformers checkpoint.

One swarm for the module: 2 training stages of one peer each, trained for a few steps by a
Trainer (so the weights are no longer their initial ones). The export must compute what the
swarm computes, load in transformers, and be servable by an inference node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from swarm.cli import main
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.dht import DHT, start_dht
from swarm.errors import ConfigError, MissingBlocksError
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaBlock, LlamaConfig, init_weights
from swarm.records import NodeIdentity
from swarm.training.data import DataConfig
from swarm.training.export import ExportError, ExportResult, export_model, gather_blocks
from swarm.training.trainer import TRAINER_CHECKPOINT, Trainer, TrainerConfig, load_trainer_parts
from tests.checkpoints import BYTE_CONFIG

HF_CONFIG = BYTE_CONFIG
TRAIN = ("--train", "--num-stages", "2", "--target-batch-size", "16")
MODEL = "byte-llama"
TEXTS = [b"def main():\n    return 0\n", b"import os, sys\nprint(sys)\n"]


@dataclass(frozen=True)
class Trained:
    local: LocalSwarm
    config_dir: Path
    checkpoint_dir: Path  # the trainer's


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    config_dir = tmp_path_factory.mktemp("cfg") / MODEL
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(HF_CONFIG))
    checkpoint_dir = tmp_path_factory.mktemp("trainer")
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        for stage in (0, 1):
            local.start_node(config_dir, None, *TRAIN, "--stage", str(stage), name=f"train-{stage}")
        cfg = TrainerConfig(
            model=str(config_dir),
            steps=3,
            micro_batch_size=4,
            target_batch_size=16,
            codec="none",
            checkpoint_dir=checkpoint_dir,
            data=DataConfig(seq_len=33, max_bytes=1 << 20),
        )
        identity = NodeIdentity.generate()
        dht = start_dht(initial_peers=local.initial_peers, identity=identity)
        trainer = Trainer(cfg, dht, identity)
        try:
            # A stage of one peer steps inside the Backward that completes its target batch, so
            # by now each stage has stepped as often as the trainer (3 x 16 samples).
            assert trainer.train().step >= 3
        finally:
            trainer.shutdown()
            dht.shutdown()
        yield Trained(local, config_dir, checkpoint_dir)


@pytest.fixture(scope="module")
def dht(trained: Trained) -> Iterator[DHT]:
    dht = start_dht(initial_peers=trained.local.initial_peers, client_mode=True)
    yield dht
    dht.shutdown()


@pytest.fixture(scope="module")
def exported(trained: Trained, dht: DHT, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("export") / "byte-llama-export"
    return export_model(dht, str(trained.config_dir), trained.checkpoint_dir, out)


def byte_ids() -> torch.Tensor:
    n = min(len(t) for t in TEXTS)
    return torch.tensor([list(t[:n]) for t in TEXTS])


def hf_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids).logits
    return logits


def test_export_computes_what_the_swarm_computes(trained: Trained, exported: ExportResult) -> None:
    assert sorted(exported.epochs) == [0, 1] and sorted(exported.peers) == [0, 1]
    assert all(epoch >= 1 for epoch in exported.epochs.values()), exported.epochs  # trained, not init
    weights = load_file(str(exported.path / "model.safetensors"))
    block = LlamaBlock(LlamaConfig.from_hf_dict(HF_CONFIG))
    init_weights(block, 0 + 2 + 1)  # block 2 as the node drew it (seed 0): training moved it
    assert not torch.equal(weights["model.layers.2.mlp.up_proj.weight"], block.mlp.up_proj.weight)

    input_ids = byte_ids()
    config = LlamaConfig.from_hf_dict(HF_CONFIG)
    parts = load_trainer_parts(trained.checkpoint_dir / TRAINER_CHECKPOINT, config)
    client_dht = start_dht(initial_peers=trained.local.initial_peers, client_mode=True)
    swarm_model = DistributedModelForCausalLM(MODEL, config, parts, client_dht, ClientConfig())
    try:
        with torch.no_grad():
            through_swarm = swarm_model(input_ids)
    finally:
        swarm_model.shutdown()
    torch.testing.assert_close(hf_logits(exported.path, input_ids), through_swarm, atol=1e-4, rtol=1e-4)


def test_cli_writes_the_same_checkpoint(
    trained: Trained, exported: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-export"
    argv = [
        *("export", "--model", str(trained.config_dir), "--initial-peers", *trained.local.initial_peers),
        *("--checkpoint-dir", str(trained.checkpoint_dir), "--out", str(out)),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("export: 4 blocks from 2 stages (epochs s0:")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    # No one trains any more, so the swarm's weights are those the first export took.
    ours, first = (
        load_file(str(out / "model.safetensors")),
        load_file(str(exported.path / "model.safetensors")),
    )
    assert ours.keys() == first.keys()
    assert all(torch.equal(ours[k], first[k]) for k in ours)


def test_an_inference_node_serves_the_export(trained: Trained, exported: ExportResult) -> None:
    trained.local.start_node(
        exported.path,
        "0:4",
        *("--device", "cpu", "--dtype", "float32", "--throughput", "1000"),
        name="serve-export",
    )
    input_ids = byte_ids()
    client = DistributedModelForCausalLM.from_pretrained(exported.path, trained.local.initial_peers)
    with client, torch.no_grad():
        served = client(input_ids)
    torch.testing.assert_close(served, hf_logits(exported.path, input_ids), atol=1e-4, rtol=1e-4)


def test_export_says_what_is_missing(trained: Trained, dht: DHT, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no trainer checkpoint at .*nowhere/trainer\.pt"):
        export_model(dht, str(trained.config_dir), tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, nothing downloaded

    config = LlamaConfig.from_hf_dict(HF_CONFIG)
    with pytest.raises(MissingBlocksError, match=r"blocks 4:6 of model 'byte-llama'") as missing:
        run_sync(gather_blocks(dht, MODEL, replace(config, num_hidden_layers=6), timeout=10))
    assert missing.value.blocks == [4, 5]
    # Peers that answer with weights of another shape are refused, each stage saying why.
    with pytest.raises(ExportError, match=r"stage \d .*the config expects \[256, 64\]"):
        run_sync(gather_blocks(dht, MODEL, replace(config, intermediate_size=256), timeout=10))
