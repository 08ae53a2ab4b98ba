"""How a model is cut into training stages, and what each collaboration is called.

Shared by the nodes (which train a stage) and the trainer (which owns the client parts, its
own "stage"): pure functions, so every peer agrees without talking.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from swarm import checkpoint
from swarm.errors import ConfigError
from swarm.models.llama import LlamaConfig

HEAD = "head"  # the trainers' collaboration over embeddings, final norm and LM head


def stage_span(num_blocks: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Blocks [start, end) of `stage` when `num_blocks` are cut into `num_stages` near-equal stages."""
    if not 1 <= num_stages <= num_blocks:
        raise ConfigError(f"--num-stages must be in 1..{num_blocks} (the model's blocks), got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ConfigError(f"--stage must be in 0..{num_stages - 1}, got {stage}")
    bounds = [round(i * num_blocks / num_stages) for i in range(num_stages + 1)]
    return bounds[stage], bounds[stage + 1]


def run_id(model: str, stage: int | str) -> str:
    """A collaboration's hivemind run id: "<model>-stage<K>" for stage K, "<model>-head" for the
    trainers; the model name reduced to [A-Za-z0-9_-] (hivemind uses the run id as a DHT key
    prefix, which must not contain '.')."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", model)
    return f"{name}-{stage}" if stage == HEAD else f"{name}-stage{stage}"


def read_config(model: str) -> LlamaConfig:
    """The model's config: a config.json file, or a directory holding one (weights optional)."""
    path = Path(model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--model needs a config.json or a checkpoint directory, got {model}")
    try:
        return LlamaConfig.from_hf_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def has_weights(model: str) -> bool:
    path = Path(model)
    return path.is_dir() and any(path.glob("*.safetensors"))


def model_name(model: str) -> str:
    """The name the swarm knows a trained model by: its directory's name (for a config.json, the
    directory holding it). Nodes and trainers must agree on it."""
    path = Path(model)
    return checkpoint.model_name(path.parent if path.is_file() else path)


def warmup_factor(steps: int, epoch: int) -> float:
    """The learning rate's factor at optimizer step `epoch`: linear warm-up over `steps`, then 1."""
    return min(1.0, (epoch + 1) / max(1, steps))


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
