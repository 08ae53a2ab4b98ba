"""The Llama family (Llama 2/3, Mistral, Qwen2) as one plain-PyTorch decoder.

Read top to bottom: config -> rotary embedding -> KV cache -> decoder block -> client parts ->
full model. Parameter names equal transformers' (`self_attn.q_proj.weight`, ...) so checkpoints
load through a name map (`hf_block_prefix`, `HF_CLIENT_KEYS`) and Swarm never imports
transformers. The three families differ only in config: Qwen2 adds q/k/v biases, Mistral
limits attention to a sliding window, Llama 3 rescales rotary frequencies.

Shapes: b = batch, t = new tokens, s = keys attended to, H = query heads, KV = key/value
heads, hd = head_dim, D = hidden_size, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarm.errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("linear", "llama3")  # plus plain RoPE, which is rope_scaling=None

# transformers' class defaults, used for keys an older config.json leaves out, so a config
# means here what it means there.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}

# Fields named as in config.json; the first five are required there, all must be positive.
_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_FIELDS = (*_HF_SIZES, "num_key_value_heads", "head_dim", "max_position_embeddings")

_BIAS_LAYOUTS = {  # (qkv_bias, o_bias, mlp_bias): llama's attention_bias covers q, k, v and o
    "llama": {(False, False, False), (False, False, True), (True, True, False), (True, True, True)},
    "mistral": {(False, False, False)},
    "qwen2": {(True, False, False)},
}

HF_CLIENT_KEYS: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_block_prefix(index: int) -> str:
    """Prefix of block `index`'s tensors in a transformers checkpoint."""
    return f"model.layers.{index}."


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts ('linear' or 'llama3')."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        _check_rope_type(self.rope_type)
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            orig = self.original_max_position_embeddings
            if orig is None or orig <= 0:
                raise ConfigError(
                    f"llama3 rope scaling needs original_max_position_embeddings > 0, got {orig}"
                )
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ConfigError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
                )

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return d


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the decoder needs; `from_hf_dict` reads a transformers config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {list(ARCHITECTURES)}"
            )
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        heads, kv, window = self.num_attention_heads, self.num_key_value_heads, self.sliding_window
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        problems = [  # (is wrong, what to say)
            (heads % kv != 0, f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}"),
            (self.head_dim % 2 == 1, f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dims"),
            (not self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be > 0"),
            (not self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0"),
            (window is not None and window <= 0, f"sliding_window={window} must be > 0 or None"),
            (self.model_type == "llama" and window is not None, f"llama has no sliding window, got {window}"),
            (self.hidden_act != "silu", f"hidden_act={self.hidden_act!r} is not supported (only 'silu')"),
            # Each family's checkpoints have a fixed bias layout; another could not be exported.
            (
                biases not in _BIAS_LAYOUTS[self.model_type],
                f"{self.model_type} does not have (qkv_bias, o_bias, mlp_bias)={biases}; "
                f"it has one of {sorted(_BIAS_LAYOUTS[self.model_type])}",
            ),
        ]
        for wrong, message in problems:
            if wrong:
                raise ConfigError(message)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], generation_config: dict[str, Any] | None = None) -> LlamaConfig:
        """Read a transformers config.json, old layout (top-level rope_theta/rope_scaling) or new
        (rope_parameters); bos/eos come from generation_config.json first, as `generate` uses it."""
        try:
            return cls._from_hf_dict(d, generation_config or {})
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong JSON type
            raise ConfigError(f"malformed config: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_hf_dict(cls, d: dict[str, Any], gen: dict[str, Any]) -> LlamaConfig:
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; expected one of {list(ARCHITECTURES)}"
            )
        defaults = _FAMILY_DEFAULTS[model_type]
        hidden, heads = _required(d, "hidden_size"), _required(d, "num_attention_heads")
        if not d.get("head_dim") and heads > 0 and hidden % heads:
            raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        max_pos = d.get("max_position_embeddings", defaults["max_position_embeddings"])
        rope_theta, rope_scaling = _parse_rope(d, max_pos)
        attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
        qkv_bias, o_bias, mlp_bias = {
            "llama": (attention_bias, attention_bias, mlp_bias),
            "mistral": (False, False, False),
            "qwen2": (True, False, False),
        }[model_type]
        eos = gen.get("eos_token_id")
        if eos is None:
            eos = d.get("eos_token_id", defaults["eos_token_id"])
        bos = gen.get("bos_token_id")
        if bos is None:
            bos = d.get("bos_token_id", defaults["bos_token_id"])
        sizes = {key: _required(d, key) for key in _HF_SIZES}
        hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
        return cls(
            model_type=model_type,
            **sizes,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // max(heads, 1),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=_parse_sliding_window(d, model_type),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=bos,
            eos_token_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 5 (rope_parameters) and 4.x (rope_theta/rope_scaling) load."""
        scaling = self.rope_scaling.to_hf_dict() if self.rope_scaling else None
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            **{key: getattr(self, key) for key in _POSITIVE_FIELDS},
            **{key: getattr(self, key) for key in ("rms_norm_eps", "hidden_act", "tie_word_embeddings")},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:  # qwen2: max_window_layers=0 puts the window on every layer, the only case we support
            d.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                max_window_layers=0 if self.sliding_window is not None else self.num_hidden_layers,
            )
        return d

    def block_param_count(self) -> int:
        """Parameters in one decoder block (for memory estimates)."""
        d, i = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = d * q_out + 2 * d * kv_out + q_out * d
        attention += (q_out + 2 * kv_out) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * i + (2 * i + d) * self.mlp_bias
        return attention + mlp + 2 * d  # + two RMSNorm weights


def _required(d: dict[str, Any], key: str) -> int:
    if key not in d:
        raise ConfigError(f"config has no {key!r}")
    return int(d[key])


def _check_rope_type(rope_type: str) -> None:
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope scaling type {rope_type!r}; Swarm implements {', '.join(ROPE_TYPES)} "
            "and plain RoPE (rope_scaling=None)"
        )


def _parse_rope(d: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    # transformers gives an old-style `rope_scaling` priority over `rope_parameters`; so do we.
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"rope parameters must be one flat dict (no per-layer-type RoPE), got {params!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type == "default":
        return theta, None
    _check_rope_type(rope_type)
    if "factor" not in params:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor', got {params!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    return theta, RopeScaling(
        "llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
    )


def _parse_sliding_window(d: dict[str, Any], model_type: str) -> int | None:
    if model_type == "llama":
        return None
    window = d.get("sliding_window", 4096)  # transformers' default when the key is absent
    if model_type == "mistral" or window is None:
        return window
    # Qwen2: off unless use_sliding_window; then it applies to layers >= max_window_layers (or
    # where layer_types says). One window for all blocks keeps a block independent of its index.
    if not d.get("use_sliding_window", False):
        return None
    n = _required(d, "num_hidden_layers")
    first = d.get("max_window_layers", 28)
    types = d.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding == len(types):
        return int(window)
    raise ConfigError(
        f"qwen2 slides the window on {sliding} of {len(types)} layers; Swarm supports all or none"
    )


# ----------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Rotation speed of each dim pair, [hd / 2] float32 (transformers computes it in float32 too)."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":  # stretching positions by `factor` == slowing every frequency
        return inv_freq / s.factor
    # llama3: dims whose wavelength is long compared with the pretraining context are slowed by
    # `factor`, short ones kept (they encode local order), and the band between is interpolated.
    assert s.original_max_position_embeddings is not None  # checked in RopeScaling
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    short_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    slowed = torch.where(wavelen > long_wavelen, inv_freq / s.factor, inv_freq)
    mix = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    between = (1 - mix) * slowed / s.factor + mix * slowed
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, between, slowed)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by the angle of their position (transformers' pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- KV cache


class LayerCache:
    """Keys and values of ONE block for one session, preallocated to `max_length` tokens so a
    node can budget memory up front and decoding never reallocates."""

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive")
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # [b, KV, max_length, hd], rotated
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens held; positions [0, length) are valid

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_needed(config: LlamaConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        return 2 * batch_size * config.num_key_value_heads * max_length * config.head_dim * dtype.itemsize

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (speculative decoding drops rejected drafts). O(1): the
        dropped positions are simply overwritten by the next append, and no query reads past `length`."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} tokens of a cache holding {self.length}")
        self.length = length

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [b, KV, t, hd]; return all keys and values held, [b, KV, length, hd]."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KV cache overflow: it holds {self.length} tokens, {k.shape[2]} more exceed "
                f"max_length={self.max_length}"
            )
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


# ----------------------------------------------------------------------------- LoRA


# Projections a LoRA adapter may target, and the submodule each lives in (peft's names).
LORA_PROJECTIONS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp"),
}


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection in a block."""
    d, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, i),
        "up_proj": (d, i),
        "down_proj": (i, d),
    }


@dataclass(frozen=True)
class BlockLora:
    """A LoRA adapter for one block: each named projection computes W x + scaling * B (A x).

    pairs: projection name -> (A [r, in_features], B [out_features, r]); projections it does
    not name run unchanged. peft's LoRA without dropout, so its saved adapters apply as is.
    """

    pairs: dict[str, tuple[Tensor, Tensor]]
    scaling: float


def _project(layer: nn.Module, x: Tensor, lora: BlockLora | None, name: str) -> Tensor:
    y: Tensor = layer(x)  # a Linear, or a quantized stand-in for one
    if lora is None or (pair := lora.pairs.get(name)) is None:
        return y
    a, b = pair
    return y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * lora.scaling


# ----------------------------------------------------------------------------- decoder block


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Mean of squares in float32: in bf16 it loses the precision the normalisation needs.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        # A plain attribute, not a buffer: modules are built on "meta" and filled from checkpoints,
        # which would leave a buffer on meta; computing it lazily on the input's device is cheap.
        self._inv_freq: Tensor | None = None

    def _cos_sin(self, start: int, t: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._inv_freq is None or self._inv_freq.device != like.device:
            self._inv_freq = rope_inv_freq(self.config, like.device)
        positions = torch.arange(start, start + t, device=like.device, dtype=torch.float32)
        freqs = torch.outer(positions, self._inv_freq)  # [t, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [t, hd]
        # Angles in float32 (large positions), then cast as transformers does.
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def forward(
        self, x: Tensor, start: int, cache: LayerCache | None, lora: BlockLora | None = None
    ) -> Tensor:
        b, t, _ = x.shape
        c = self.config
        q = _project(self.q_proj, x, lora, "q_proj").view(b, t, c.num_attention_heads, c.head_dim)
        k = _project(self.k_proj, x, lora, "k_proj").view(b, t, c.num_key_value_heads, c.head_dim)
        v = _project(self.v_proj, x, lora, "v_proj").view(b, t, c.num_key_value_heads, c.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, H or KV, t, hd]
        cos, sin = self._cos_sin(start, t, x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        k_start = start  # absolute position of k[:, :, 0]
        if cache is not None:
            k, v = cache.append(k, v)  # [b, KV, start + t, hd]
            k_start = 0
            if c.sliding_window is not None:  # keys older than the first query's window: seen by no query
                k_start = max(0, start - c.sliding_window + 1)
                k, v = k[:, :, k_start:], v[:, :, k_start:]
        s = k.shape[2]
        window = c.sliding_window
        # Use SDPA's fast paths when they are exact: one query that sees every kept key, or new
        # tokens attending only to themselves (square causal). Otherwise an explicit [t, s] mask.
        if t == 1 and (window is None or s <= window):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif k_start == start and s == t and (window is None or t <= window):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            mask = _attention_mask(start, t, k_start, s, window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        # out: [b, H, t, hd] -> [b, t, H * hd]
        return _project(self.o_proj, out.transpose(1, 2).reshape(b, t, -1), lora, "o_proj")


def _attention_mask(
    q_start: int, t: int, k_start: int, s: int, window: int | None, device: torch.device
) -> Tensor:
    """[t, s] bool, True where query at q_start + i may see the key at k_start + j."""
    q_pos = torch.arange(q_start, q_start + t, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:  # a query sees itself and the window - 1 tokens before it
        allowed &= k_pos > q_pos - window
    return allowed


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        gate, up = _project(self.gate_proj, x, lora, "gate_proj"), _project(self.up_proj, x, lora, "up_proj")
        return _project(self.down_proj, F.silu(gate) * up, lora, "down_proj")  # SwiGLU


class LlamaBlock(nn.Module):
    """One decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, hidden: Tensor, start: int = 0, cache: LayerCache | None = None, lora: BlockLora | None = None
    ) -> Tensor:
        """hidden [b, t, D], its first token at absolute position `start` -> [b, t, D]."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden must be [batch, tokens, {self.config.hidden_size}], got {list(hidden.shape)}"
            )
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if cache is not None:
            if start != cache.length:
                raise ValueError(
                    f"start={start} but the KV cache holds {cache.length} tokens; they must be equal"
                )
            if hidden.shape[0] != cache.batch_size or hidden.dtype != cache.keys.dtype:
                raise ValueError(
                    f"hidden has batch {hidden.shape[0]} and dtype {hidden.dtype}, the KV cache was made for "
                    f"batch {cache.batch_size} and dtype {cache.keys.dtype}"
                )
        h = hidden + self.self_attn(self.input_layernorm(hidden), start, cache, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


def init_weights(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fresh weights for training from scratch, identical for one seed on every machine: matrices
    ~ N(0, std) as transformers initialises Llama, norm weights 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # a fixed order, so the draws are too
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


# ----------------------------------------------------------------------------- client parts and full model


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Refuse ids the embedding has no row for (a ConfigError, which is a ValueError)."""
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ConfigError(f"token ids must be in [0, {vocab_size}), got ids from {low} to {high}")


class ClientParts(nn.Module):
    """What the client keeps locally: token embeddings, final norm, LM head."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix when the config ties them (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor, *, check: bool = True) -> Tensor:
        """[b, t] token ids -> [b, t, D]. check=False skips the range check, for ids sampled here from
        this model's own logits (always in range): two reductions less per decoded token."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if check:
            check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """[b, t, D] -> [b, t, V] float32 (sampling wants full precision)."""
        return self.lm_head(self.norm(hidden)).float()


class LlamaForCausalLM(nn.Module):
    """The whole model in one process: the single-process baseline and the export format."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.parts = ClientParts(config)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: Tensor, start: int = 0, caches: list[LayerCache] | None = None) -> Tensor:
        """[b, t] token ids at positions start.. -> logits [b, t, V] float32."""
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"got {len(caches)} caches for {len(self.blocks)} blocks")
        hidden = self.parts.embed(input_ids)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, start, caches[i] if caches is not None else None)
        return self.parts.logits(hidden)

    def new_caches(
        self, batch_size: int, max_length: int, dtype: torch.dtype | None = None
    ) -> list[LayerCache]:
        weight = self.parts.norm.weight
        return [
            LayerCache(self.config, batch_size, max_length, dtype or weight.dtype, weight.device)
            for _ in self.blocks
        ]
