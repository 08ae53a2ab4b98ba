"""swarm.checkpoint: reads only the tensors asked for, names the file when something is wrong,
and writes checkpoints transformers loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file

import swarm.checkpoint as checkpoint
from swarm.checkpoint import (
    Checkpoint,
    load_blocks,
    load_client_parts,
    load_model,
    model_name,
    open_checkpoint,
    save_checkpoint,
)
from swarm.errors import CheckpointError, ConfigError
from swarm.models.llama import LlamaForCausalLM
from tests.checkpoints import LLAMA3, make_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "sharded", sharded=True, eos_token_id=[2, 3])


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "single", eos_token_id=[2, 3])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two blocks, one file: a template the error tests copy and damage."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", num_layers=2)


@pytest.fixture
def copy_of_small(small: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small, tmp_path / "copy"))


def token_ids(length: int = 10) -> torch.Tensor:
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf(ids).logits


class RecordingSafeOpen:
    """Stands in for safetensors.safe_open inside swarm.checkpoint; delegates to the real one."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.read: set[str] = set()  # tensors materialised with get_tensor
        self.peeked: set[str] = set()  # tensors whose shape was read from the header

    def __call__(self, filename: str, *args: Any, **kwargs: Any) -> Any:
        self.files.add(Path(filename).name)
        return _Handle(safetensors.safe_open(filename, *args, **kwargs), self)


class _Handle:
    def __init__(self, real: Any, recorder: RecordingSafeOpen) -> None:
        self.real, self.recorder = real, recorder

    def __enter__(self) -> _Handle:
        self.real.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.real.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self.real.keys())

    def get_slice(self, key: str) -> Any:
        self.recorder.peeked.add(key)
        return self.real.get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        self.recorder.read.add(key)
        return self.real.get_tensor(key)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> RecordingSafeOpen:
    recording = RecordingSafeOpen()
    monkeypatch.setattr(checkpoint, "safe_open", recording)
    return recording


# ----------------------------------------------------------------------------- opening and loading


def test_open_single_and_sharded(single: Path, sharded: Path) -> None:
    one, many = open_checkpoint(single), open_checkpoint(sharded)
    assert one.config == many.config  # same seed, same model
    assert one.config.eos_token_ids == (2, 3)
    assert set(one.weight_map) == set(many.weight_map)
    assert set(one.weight_map.values()) == {single / "model.safetensors"}
    assert len(set(many.weight_map.values())) > 8
    assert len(many.block_keys(4)) == 9  # 7 linear weights + 2 norms
    assert all(k.startswith("model.layers.4.") for k in many.block_keys(4))
    assert one.raw_config["model_type"] == "llama"


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", {"sharded": True}),
        ("llama", {"tie": True}),
        ("llama", {"rope_scaling": LLAMA3, "legacy_layout": True}),
        ("llama", {"head_dim": 32, "attention_bias": True, "sharded": True}),
        ("mistral", {"sliding_window": 4}),
        ("qwen2", {"sharded": True}),
    ],
    ids=["sharded", "tied", "llama3-legacy-layout", "head-dim-biases", "mistral-window", "qwen2"],
)
def test_load_model_matches_transformers(tmp_path: Path, family: str, options: dict[str, Any]) -> None:
    path = make_checkpoint(tmp_path / family, family, num_layers=4, **options)
    if options.get("legacy_layout"):
        assert "rope_parameters" not in json.loads((path / "config.json").read_text())
    ids = token_ids()
    model = load_model(open_checkpoint(path))
    with torch.no_grad():
        assert (model(ids) - hf_logits(path, ids)).abs().max().item() <= TOL


def test_load_blocks_reads_only_their_tensors(sharded: Path, recorder: RecordingSafeOpen) -> None:
    ckpt = open_checkpoint(sharded)  # reads every shard's header (names and shapes), no tensor
    assert recorder.read == set() and recorder.peeked == set()
    recorder.files.clear()
    blocks = load_blocks(ckpt, 4, 8)
    wanted = {k for i in range(4, 8) for k in ckpt.block_keys(i)}
    assert recorder.read == wanted
    assert recorder.peeked <= wanted
    assert recorder.files == {ckpt.weight_map[k].name for k in wanted}
    assert len(blocks) == 4


@pytest.mark.parametrize("tie", [False, True])
def test_client_parts_read_only_their_tensors(tmp_path: Path, recorder: RecordingSafeOpen, tie: bool) -> None:
    ckpt = open_checkpoint(make_checkpoint(tmp_path / "m", num_layers=2, tie=tie, sharded=True))
    parts = load_client_parts(ckpt)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tie else {"lm_head.weight"})
    assert recorder.read == expected
    assert (parts.lm_head.weight is parts.embed_tokens.weight) == tie


@torch.no_grad()
def test_spans_compose_to_the_whole_model(sharded: Path) -> None:
    ckpt = open_checkpoint(sharded)
    parts = load_client_parts(ckpt)
    hidden = parts.embed(token_ids())
    for block in load_blocks(ckpt, 0, 3) + load_blocks(ckpt, 3, 8):
        hidden = block(hidden)
    assert torch.equal(parts.logits(hidden), load_model(ckpt)(token_ids()))


def test_load_casts_and_leaves_nothing_on_meta(sharded: Path) -> None:
    ckpt = open_checkpoint(sharded)
    (block,) = load_blocks(ckpt, 7, 8, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in block.parameters())
    model = load_model(ckpt, dtype=torch.bfloat16)
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        caches = model.new_caches(2, 10)
        assert torch.isfinite(model(token_ids(), 0, caches)).all()


@pytest.mark.parametrize(("start", "end"), [(6, 9), (5, 5), (-1, 2), (3, 2)])
def test_load_blocks_rejects_bad_ranges(sharded: Path, start: int, end: int) -> None:
    with pytest.raises(ConfigError, match=f"{start}:{end} is invalid for a model with 8 blocks"):
        load_blocks(open_checkpoint(sharded), start, end)


def test_model_name(single: Path) -> None:
    assert model_name(single) == "single"
    assert model_name(str(single) + "/") == "single"
    assert model_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


# ----------------------------------------------------------------------------- broken checkpoints


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_missing_config(copy_of_small: Path) -> None:
    (copy_of_small / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        open_checkpoint(copy_of_small)


def test_unreadable_config(copy_of_small: Path) -> None:
    (copy_of_small / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not readable JSON"):
        open_checkpoint(copy_of_small)


def test_unsupported_model_type_names_the_file(copy_of_small: Path) -> None:
    config = json.loads((copy_of_small / "config.json").read_text())
    (copy_of_small / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt2'"):
        open_checkpoint(copy_of_small)


def test_index_pointing_to_missing_shard(sharded: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(sharded, tmp_path / "copy"))
    shard = open_checkpoint(path).weight_map["model.layers.3.mlp.up_proj.weight"]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {re.escape(shard.name)}, which is missing"):
        open_checkpoint(path)


def test_index_listing_an_absent_tensor(sharded: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(sharded, tmp_path / "copy"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    index["weight_map"]["model.layers.0.extra.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)} lacks 1 tensor.*extra\.weight"):
        open_checkpoint(path)


@pytest.mark.parametrize("keep", [4, 100, 3000])
def test_truncated_safetensors(copy_of_small: Path, keep: int) -> None:
    weights = copy_of_small / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        open_checkpoint(copy_of_small)


def test_bin_only_checkpoint_asks_for_safetensors(copy_of_small: Path) -> None:
    (copy_of_small / "model.safetensors").unlink()
    (copy_of_small / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*needs safetensors"):
        open_checkpoint(copy_of_small)


def test_tensor_missing_from_file(copy_of_small: Path) -> None:
    weights = copy_of_small / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    ckpt = open_checkpoint(copy_of_small)
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        load_blocks(ckpt, 0, 1)
    load_blocks(ckpt, 1, 2)  # the other block is intact


def test_tensor_with_wrong_shape(copy_of_small: Path) -> None:
    weights = copy_of_small / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, weights, metadata={"format": "pt"})
    expected = (
        r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[16, 64\], the config expects \[32, 64\]"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_blocks(open_checkpoint(copy_of_small), 1, 2)


# ----------------------------------------------------------------------------- the Hub (simulated)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"'someone/some-model' is not a local directory.*offline"):
        open_checkpoint("someone/some-model")


def test_hub_downloads_only_needed_shards(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "snapshots" / ("a" * 40)
    fetched: list[tuple[str, str | None]] = []

    def snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        snapshot.mkdir(parents=True)
        for name in allow_patterns:
            if (sharded / name).exists():
                shutil.copy(sharded / name, snapshot / name)
        return str(snapshot)

    def hf_hub_download(repo_id: str, filename: str, revision: str | None) -> str:
        fetched.append((filename, revision))
        return str(shutil.copy(sharded / filename, snapshot / filename))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    ckpt = open_checkpoint("someone/sharded")
    assert (ckpt.repo_id, ckpt.revision) == ("someone/sharded", "a" * 40)
    assert fetched == []  # metadata only
    load_blocks(ckpt, 6, 8)
    needed = {ckpt.weight_map[k].name for i in (6, 7) for k in ckpt.block_keys(i)}
    assert {name for name, _ in fetched} == needed
    assert {revision for _, revision in fetched} == {"a" * 40}


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    ("family", "options", "max_shard_bytes"),
    [
        ("llama", {"rope_scaling": LLAMA3}, 60_000),
        ("llama", {"tie": True, "eos_token_id": 5}, None),
        ("mistral", {"sliding_window": 4}, None),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, None),
    ],
    ids=["llama3-sharded", "tied", "mistral-window", "qwen2-window"],
)
def test_saved_checkpoint_loads_in_transformers(
    tmp_path: Path, family: str, options: dict[str, Any], max_shard_bytes: int | None
) -> None:
    original = open_checkpoint(make_checkpoint(tmp_path / "original", family, num_layers=3, **options))
    model = load_model(original)
    out = tmp_path / "saved"
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (max_shard_bytes is not None)
    saved = open_checkpoint(out)
    assert saved.config == original.config
    ids = token_ids(12)
    with torch.no_grad():
        assert (model(ids) - hf_logits(out, ids)).abs().max().item() <= TOL


def test_save_replaces_earlier_weights(tmp_path: Path) -> None:
    model = load_model(open_checkpoint(make_checkpoint(tmp_path / "m", num_layers=2)))
    save_checkpoint(model, tmp_path / "out", max_shard_bytes=30_000)
    save_checkpoint(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    assert isinstance(open_checkpoint(tmp_path / "out"), Checkpoint)


def test_save_from_scratch_without_transformers_helpers(tmp_path: Path) -> None:
    """The demo path: a model built here (not loaded) round-trips."""
    config = open_checkpoint(make_checkpoint(tmp_path / "m", num_layers=2)).config
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    save_checkpoint(model, tmp_path / "out")
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(load_model(open_checkpoint(tmp_path / "out"))(ids), model(ids))
