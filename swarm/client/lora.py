"""Client-owned LoRA on remote blocks, in peft's format.

The adapter's weights live here, in the client, as ordinary trainable parameters. Each hop of
a pipeline gets the part for its blocks (`payload`), sent to the node once and named by
content hash afterwards; Backward returns their gradients, which autograd puts in `.grad`.
`save_pretrained` writes, and `load_pretrained` reads, peft's `adapter_config.json` +
`adapter_model.safetensors`, so an adapter trained here loads in peft on top of the
transformers model, and one trained with peft runs on the swarm.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.adapters import AdapterPayload, tensor_name
from swarm.errors import ConfigError
from swarm.models.llama import LORA_PROJECTIONS, LlamaConfig, projection_shapes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# peft's key for a LoRA tensor of a transformers causal LM ('.default' appears in some versions)
_PEFT_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight"
)


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA adapter looks like; the fields are peft.LoraConfig's, with its meaning.

    target_modules: projection names, "all-linear", or a regex matched against module names
    like "model.layers.3.self_attn.q_proj" (as peft does for a string).
    lora_dropout is kept for peft's sake but not applied: the remote blocks run without it.
    """

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    use_rslora: bool = False
    lora_dropout: float = 0.0
    init_lora_weights: bool = True  # B = 0, so a new adapter starts as the base model
    base_model_name_or_path: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # other peft keys, written back as read

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, list | set | frozenset):
            object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        if isinstance(self.target_modules, tuple):
            unknown = [m for m in self.target_modules if m not in LORA_PROJECTIONS]
            if unknown or not self.target_modules:
                raise ConfigError(
                    f"target_modules {list(self.target_modules)}: remote blocks can adapt only "
                    f"{list(LORA_PROJECTIONS)}"
                )
        if self.layers_to_transform is not None:
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, config: LlamaConfig) -> list[tuple[int, str]]:
        """(block, projection) pairs the adapter covers in a model of this config."""
        layers = range(config.num_hidden_layers)
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if i not in layers]
            if bad:
                raise ConfigError(f"layers_to_transform {bad} not in the model's 0..{len(layers) - 1}")
            layers = sorted(set(self.layers_to_transform))  # type: ignore[assignment]
        found = []
        for block in layers:
            for projection, parent in LORA_PROJECTIONS.items():
                if self._targets(f"model.layers.{block}.{parent}.{projection}", projection):
                    found.append((block, projection))
        if not found:
            raise ConfigError(f"target_modules {self.target_modules!r} matches no projection of the blocks")
        return found

    def _targets(self, module: str, projection: str) -> bool:
        if self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return projection in self.target_modules

    @classmethod
    def from_peft(cls, peft_config: Any) -> LoraConfig:
        """From a peft.LoraConfig, or the dict of an adapter_config.json; refuses what we cannot run."""
        d = dict(peft_config) if isinstance(peft_config, Mapping) else dict(vars(peft_config))
        if str(d.get("peft_type", "LORA")).rsplit(".", 1)[-1].upper() != "LORA":
            raise ConfigError(f"only LoRA adapters run on remote blocks, this one is {d.get('peft_type')}")
        unsupported = {
            "use_dora": bool(d.get("use_dora")),
            "fan_in_fan_out": bool(d.get("fan_in_fan_out")),
            "bias": d.get("bias", "none") != "none",
            "rank_pattern": bool(d.get("rank_pattern")),
            "alpha_pattern": bool(d.get("alpha_pattern")),
            "modules_to_save": bool(d.get("modules_to_save")),
            "layer_replication": bool(d.get("layer_replication")),
        }
        if any(unsupported.values()):
            raise ConfigError(f"unsupported LoRA options: {[k for k, v in unsupported.items() if v]}")
        layers = d.get("layers_to_transform")
        known = {"r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora", "lora_dropout"}
        return cls(
            r=int(d.get("r", 8)),
            lora_alpha=float(d.get("lora_alpha", 8)),
            target_modules=_targets_of(d.get("target_modules")),
            layers_to_transform=(layers,) if isinstance(layers, int) else layers,
            use_rslora=bool(d.get("use_rslora", False)),
            lora_dropout=float(d.get("lora_dropout", 0.0)),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            extra={
                k: v for k, v in d.items() if k not in known | {"base_model_name_or_path"} and _is_json(v)
            },
        )

    def to_peft_dict(self) -> dict[str, Any]:
        """adapter_config.json as peft writes it (peft fills in the keys left out)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            **self.extra,
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets,
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "use_rslora": self.use_rslora,
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def _targets_of(value: Any) -> tuple[str, ...] | str:
    if value is None:
        raise ConfigError("the LoRA config names no target_modules")
    return value if isinstance(value, str) else tuple(sorted(value))


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class RemoteLora(nn.Module):
    """The trainable LoRA weights for a model's remote blocks: A [r, in] and B [out, r] per target."""

    def __init__(self, model_config: LlamaConfig, config: LoraConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.model_config, self.config = model_config, config
        shapes = projection_shapes(model_config)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.names: list[str] = []  # wire names of the parameters, in registration order
        self._by_name: dict[str, nn.Parameter] = {}
        for block, projection in config.targets(model_config):
            in_features, out_features = shapes[projection]
            # peft's init: A like nn.Linear's default, B zero (or small noise when asked not to be a no-op)
            bound = 1 / math.sqrt(in_features)
            a = (torch.rand(config.r, in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(out_features, config.r)
            if not config.init_lora_weights:
                b = (torch.rand(out_features, config.r, generator=gen) * 2 - 1) / math.sqrt(config.r)
            for which, value in (("A", a), ("B", b)):
                name = tensor_name(block, projection, which)
                param = nn.Parameter(value)
                self.register_parameter(name.replace(".", "_"), param)
                self.names.append(name)
                self._by_name[name] = param
        self._payloads: dict[tuple[int, int], tuple[tuple[int, ...], AdapterPayload | None]] = {}

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Wire name ('3.self_attn.q_proj.lora_A') -> parameter."""
        return dict(self._by_name)

    def payload(self, start: int, end: int) -> AdapterPayload | None:
        """The tensors of blocks [start, end), hashed, to send to the hop running them; None if none.

        Cached until a parameter changes in place (an optimizer step bumps its version counter).
        """
        versions = tuple(p._version for p in self._by_name.values())
        cached = self._payloads.get((start, end))
        if cached is not None and cached[0] == versions:
            return cached[1]
        mine = {n: p for n, p in self._by_name.items() if start <= int(n.split(".", 1)[0]) < end}
        payload = AdapterPayload.build(mine, self.config.scaling) if mine else None
        if len(self._payloads) > 256:  # routes vary; old spans' payloads are not needed again
            self._payloads.clear()
        self._payloads[(start, end)] = (versions, payload)
        return payload

    def accumulate(self, grads: Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Gradients by wire name -> one per parameter, in `parameters()` order (autograd's layout)."""
        unknown = set(grads) - set(self._by_name)
        if unknown:
            raise ConfigError(
                f"a node returned gradients for tensors this adapter lacks: {sorted(unknown)[:4]}"
            )
        return [grads.get(name) for name in self.names]

    # ---- peft format ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write adapter_config.json and adapter_model.safetensors, as peft's save_pretrained does."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {_peft_key(name): p.detach().cpu().contiguous() for name, p in self._by_name.items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_peft_dict(), indent=2) + "\n")

    @classmethod
    def load_pretrained(cls, directory: str | Path, model_config: LlamaConfig) -> RemoteLora:
        """Read a peft LoRA adapter directory written for this model."""
        path = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise ConfigError(f"{path} is not a peft adapter: it has no {name}")
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from e
        config = LoraConfig.from_peft(raw)
        adapter = cls(model_config, config)
        adapter.load_tensors(_from_peft_keys(load_file(str(path / WEIGHTS_NAME))), str(path))
        return adapter

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        expected = {name: tuple(p.shape) for name, p in self._by_name.items()}
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ConfigError(
                f"{source} does not match its config: missing {missing[:4]}, unexpected {extra[:4]}"
            )
        for name, value in tensors.items():
            if tuple(value.shape) != expected[name]:
                raise ConfigError(f"{source}: {name} is {list(value.shape)}, expected {list(expected[name])}")
        with torch.no_grad():
            for name, value in tensors.items():
                self._by_name[name].copy_(value.float())


def _peft_key(name: str) -> str:
    block, parent, projection, which = name.split(".")
    return f"base_model.model.model.layers.{block}.{parent}.{projection}.{which}.weight"


def _from_peft_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    foreign = []
    for key, value in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None or LORA_PROJECTIONS.get(match[3]) != match[2]:
            foreign.append(key)
            continue
        out[tensor_name(int(match[1]), match[3], match[4])] = value
    if foreign:
        raise ConfigError(f"the adapter has weights remote blocks cannot apply: {foreign[:4]}")
    return out
