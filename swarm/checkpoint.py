"""Load only the tensors a process needs from a transformers-format checkpoint, and write one.

A checkpoint is a directory with config.json (+ generation_config.json) and either one
model.safetensors or shards listed in model.safetensors.index.json. A node serving blocks 4:8
opens the shards holding those blocks and reads just their tensors (`safe_open` + `get_tensor`
per key), so its memory and disk reads scale with its span, not with the model. From the
Hugging Face Hub, only the metadata is downloaded up front and each shard when first needed.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from swarm.errors import CheckpointError, ConfigError
from swarm.models.llama import (
    HF_CLIENT_KEYS,
    ClientParts,
    LlamaBlock,
    LlamaConfig,
    LlamaForCausalLM,
    hf_block_prefix,
)

CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: LlamaConfig
    raw_config: dict[str, Any]
    weight_map: dict[str, Path]  # tensor name -> file (a hub shard may not be downloaded yet)
    repo_id: str | None = None  # set when the checkpoint comes from the Hub: shards are fetched lazily
    revision: str | None = None  # the commit the metadata came from, so every shard matches it

    def block_keys(self, index: int) -> list[str]:
        prefix = hf_block_prefix(index)
        return sorted(k for k in self.weight_map if k.startswith(prefix))


def model_name(name_or_path: str | Path) -> str:
    """The name a model goes by in the swarm: a Hub id as given, a local directory's name."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not _HUB_ID.match(str(name_or_path)):
        return path.resolve().name
    return str(name_or_path)


def open_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Checkpoint:
    """Read config and tensor index of a local directory or a Hub repo; no tensor data is read."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; a checkpoint is a directory with {CONFIG} and safetensors"
            )
        return _open_local(path)
    if not _HUB_ID.match(str(name_or_path)):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    return _open_hub(str(name_or_path), revision)


def _open_local(root: Path, repo_id: str | None = None, revision: str | None = None) -> Checkpoint:
    raw = _read_json(root / CONFIG)
    generation = _read_json(root / GENERATION_CONFIG) if (root / GENERATION_CONFIG).exists() else None
    try:
        config = LlamaConfig.from_hf_dict(raw, generation)
    except ConfigError as e:
        raise ConfigError(f"{root / CONFIG}: {e}") from e
    if (root / INDEX_FILE).exists():
        weight_map = _read_index(root, check_shards=repo_id is None)
    elif (root / SINGLE_FILE).exists():
        weight_map = dict.fromkeys(_tensor_names(root / SINGLE_FILE), root / SINGLE_FILE)
    else:
        found = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (
            f"; found only {found}: Swarm needs safetensors (re-save with safe_serialization)"
            if found
            else ""
        )
        raise CheckpointError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    return Checkpoint(root, config, raw, weight_map, repo_id, revision)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _read_index(root: Path, check_shards: bool) -> dict[str, Path]:
    index = _read_json(root / INDEX_FILE)
    entries = index.get("weight_map")
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise CheckpointError(f"{root / INDEX_FILE} has no 'weight_map' of tensor name -> shard file")
    weight_map = {name: root / shard for name, shard in entries.items()}
    if check_shards:  # a Hub shard is checked when it is downloaded
        by_file: dict[Path, set[str]] = defaultdict(set)
        for name, file in weight_map.items():
            by_file[file].add(name)
        for file, names in by_file.items():
            if not file.exists():
                raise CheckpointError(f"{root / INDEX_FILE} lists shard {file.name}, which is missing")
            _check_contains(file, names, _tensor_names(file))
    return weight_map


def _tensor_names(file: Path) -> set[str]:
    """Names in a safetensors header; also catches truncated or corrupt files (header only is read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def _check_contains(file: Path, wanted: set[str], present: set[str]) -> None:
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} tensor(s) the index lists, e.g. {missing[:3]}")


def _open_hub(repo_id: str, revision: str | None) -> Checkpoint:
    # Imported here: only Hub users pay for it, and tests can patch these names.
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[CONFIG, GENERATION_CONFIG, INDEX_FILE, SINGLE_FILE],
            )
        )
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); pass a local checkpoint directory or check network access / HF_TOKEN"
        ) from e
    if not (snapshot / CONFIG).exists():
        raise CheckpointError(f"Hub repo {repo_id!r} has no {CONFIG}")
    # The snapshot directory is named after the commit: pin later shard downloads to it.
    return _open_local(snapshot, repo_id=repo_id, revision=snapshot.name)


def _local_file(ckpt: Checkpoint, file: Path) -> Path:
    """The file on disk, downloading a Hub shard the first time it is needed."""
    if file.exists() or ckpt.repo_id is None:
        return file
    from huggingface_hub import hf_hub_download

    try:
        got = Path(hf_hub_download(ckpt.repo_id, file.name, revision=ckpt.revision))
    except Exception as e:
        raise CheckpointError(
            f"could not download {file.name} of {ckpt.repo_id!r}: {type(e).__name__}: {e}"
        ) from e
    _check_contains(got, {k for k, f in ckpt.weight_map.items() if f == file}, _tensor_names(got))
    return got


# ----------------------------------------------------------------------------- loading


def _read_tensors(
    ckpt: Checkpoint, wanted: dict[str, str], shapes: dict[str, torch.Size], dtype: torch.dtype, device: Any
) -> dict[str, Tensor]:
    """Read exactly the tensors named by `wanted` (our name -> checkpoint name), shape-checked."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for ours, theirs in wanted.items():
        if theirs not in ckpt.weight_map:
            raise CheckpointError(f"checkpoint {ckpt.root} has no tensor {theirs!r}")
        by_file[ckpt.weight_map[theirs]].append(ours)
    out: dict[str, Tensor] = {}
    for file, names in by_file.items():
        path = _local_file(ckpt, file)
        try:
            with safe_open(str(path), framework="pt") as f:
                for ours in names:
                    found = tuple(f.get_slice(wanted[ours]).get_shape())  # header only: check before reading
                    if found != tuple(shapes[ours]):
                        raise CheckpointError(
                            f"{path}: tensor {wanted[ours]!r} has shape {list(found)}, "
                            f"the config expects {list(shapes[ours])}"
                        )
                    out[ours] = f.get_tensor(wanted[ours]).to(device=device, dtype=dtype)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} could not be read: {type(e).__name__}: {e}") from e
    return out


def _fill(
    module: nn.Module, ckpt: Checkpoint, names: dict[str, str], dtype: torch.dtype, device: Any
) -> None:
    """Load a module built on "meta" in place: its parameters become the checkpoint's tensors."""
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    tensors = _read_tensors(ckpt, names, shapes, dtype, device)
    for ours in shapes.keys() - tensors.keys():  # only a tied lm_head is not read
        tensors[ours] = tensors[ours.replace("lm_head.weight", "embed_tokens.weight")]
    module.load_state_dict(tensors, strict=True, assign=True)
    for sub in module.modules():
        if isinstance(sub, ClientParts):
            sub.tie_weights()  # assign=True replaced the shared Parameter with two


def _client_names(config: LlamaConfig, prefix: str = "") -> dict[str, str]:
    keys = dict(HF_CLIENT_KEYS)
    if config.tie_word_embeddings:
        del keys["lm_head.weight"]  # tied: the embedding doubles as the head; the file may lack it
    return {prefix + ours: theirs for ours, theirs in keys.items()}


def _check_range(ckpt: Checkpoint, start: int, end: int) -> None:
    n = ckpt.config.num_hidden_layers
    if not 0 <= start < end <= n:
        raise ConfigError(
            f"block range {start}:{end} is invalid for a model with {n} blocks (need 0 <= start < end <= {n})"
        )


def load_blocks(
    ckpt: Checkpoint, start: int, end: int, *, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> list[LlamaBlock]:
    """Blocks [start, end), reading only their tensors."""
    _check_range(ckpt, start, end)
    blocks = []
    for index in range(start, end):
        with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
            block = LlamaBlock(ckpt.config)
        names = {k: hf_block_prefix(index) + k for k in block.state_dict()}
        _fill(block, ckpt, names, dtype, device)
        blocks.append(block)
    return blocks


def load_client_parts(
    ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> ClientParts:
    """Embeddings, final norm and LM head (shared with the embeddings when tied)."""
    with torch.device("meta"):
        parts = ClientParts(ckpt.config)
    _fill(parts, ckpt, _client_names(ckpt.config), dtype, device)
    return parts


def load_model(
    ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> LlamaForCausalLM:
    """The whole model in this process."""
    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
    names = _client_names(ckpt.config, prefix="parts.")
    for i, block in enumerate(model.blocks):
        names.update({f"blocks.{i}.{k}": hf_block_prefix(i) + k for k in block.state_dict()})
    _fill(model, ckpt, names, dtype, device)
    return model


# ----------------------------------------------------------------------------- saving


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, Tensor]:
    """The model's tensors under transformers' names (a tied lm_head is left out, as transformers does)."""
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "parts":
            if rest == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            out[HF_CLIENT_KEYS[rest]] = tensor
        else:  # "blocks.{i}.{rest}"
            index, _, rest = rest.partition(".")
            out[hf_block_prefix(int(index)) + rest] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_checkpoint(model: LlamaForCausalLM, path: Path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json, generation_config.json and safetensors weights that
    transformers.AutoModelForCausalLM.from_pretrained loads. Earlier weight files in `path` are removed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a stale shard or index would be mixed with the new weights
    config = model.config
    dtype = str(model.parts.norm.weight.dtype).removeprefix("torch.")
    (path / CONFIG).write_text(json.dumps({**config.to_hf_dict(), "dtype": dtype}, indent=2) + "\n")
    eos = list(config.eos_token_ids)
    # No EOS is written as null: transformers' generate fails on an empty list.
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
    }
    (path / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")

    tensors = hf_state_dict(model)
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _shard(tensors: dict[str, Tensor], max_bytes: int | None) -> list[list[str]]:
    """Split names, in order, into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        if max_bytes is not None and shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards
