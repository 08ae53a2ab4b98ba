"""swarm.models.llama against transformers (float32, CPU): full forward, cached decoding, configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from swarm.errors import ConfigError
from swarm.models.llama import (
    HF_CLIENT_KEYS,
    LayerCache,
    LlamaBlock,
    LlamaConfig,
    LlamaForCausalLM,
    RopeScaling,
    hf_block_prefix,
)
from tests.checkpoints import LLAMA3, make_hf_model, to_legacy_layout

TOL = 1e-4
CASES: dict[str, dict[str, Any]] = {
    "llama": {"family": "llama"},
    "llama-mha": {"family": "llama", "num_kv_heads": 4},
    "llama-llama3-rope": {"family": "llama", "rope_scaling": LLAMA3, "rope_theta": 500000.0},
    "llama-linear-rope": {"family": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama-tied": {"family": "llama", "tie": True},
    "llama-head-dim-biases": {"family": "llama", "head_dim": 32, "attention_bias": True, "mlp_bias": True},
    "mistral-window": {"family": "mistral", "sliding_window": 4},
    "qwen2": {"family": "qwen2"},
    "qwen2-window": {
        "family": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 0,
    },
}


def ours_from_hf(hf: Any) -> LlamaForCausalLM:
    """Our model with the transformers model's weights, through the public name map."""
    model = LlamaForCausalLM(LlamaConfig.from_hf_dict(hf.config.to_dict())).eval()
    theirs = hf.state_dict()
    state = {}
    for name in model.state_dict():
        head, _, rest = name.partition(".")
        if head == "parts":
            key = HF_CLIENT_KEYS[rest]
            state[name] = theirs[key if key in theirs else HF_CLIENT_KEYS["embed_tokens.weight"]]
        else:
            index, _, rest = rest.partition(".")
            state[name] = theirs[hf_block_prefix(int(index)) + rest]
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest) -> tuple[Any, LlamaForCausalLM]:
    hf = make_hf_model(num_layers=3, **CASES[request.param])
    return hf, ours_from_hf(hf)


def parse(case: str, **options: Any) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(make_hf_model(**{**CASES[case], **options}).config.to_dict())


def token_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_forward_matches_transformers(pair: tuple[Any, LlamaForCausalLM]) -> None:
    hf, ours = pair
    ids = token_ids()
    expected = hf(ids).logits
    got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 12, 128)
    assert (got - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_cached_decoding_matches_transformers(pair: tuple[Any, LlamaForCausalLM]) -> None:
    hf, ours = pair
    ids = token_ids(length=14)
    expected = hf(ids).logits
    caches = ours.new_caches(batch_size=2, max_length=14)
    # prompt, then a multi-token chunk (mask against cached keys), then one token at a time
    steps = [(0, 5), (5, 9), *((i, i + 1) for i in range(9, 14))]
    got = torch.cat([ours(ids[:, a:b], a, caches) for a, b in steps], dim=1)
    assert all(c.length == 14 for c in caches)
    assert (got - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_sliding_window_is_applied() -> None:
    hf = make_hf_model("mistral", num_layers=2, sliding_window=4)
    windowed = ours_from_hf(hf)
    full = LlamaForCausalLM(LlamaConfig.from_hf_dict({**hf.config.to_dict(), "sliding_window": None})).eval()
    full.load_state_dict(windowed.state_dict())
    ids = token_ids(length=10)
    a, b = windowed(ids), full(ids)
    assert torch.allclose(a[:, :4], b[:, :4], atol=TOL)  # within the window nothing changes
    assert (a[:, 4:] - b[:, 4:]).abs().max().item() > 1e-2


@torch.no_grad()
def test_block_depends_only_on_relative_positions() -> None:
    block = ours_from_hf(make_hf_model("llama", num_layers=1)).blocks[0]
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    # equal up to float32 rounding of the rotation angles (position * frequency)
    assert (block(hidden, start=0) - block(hidden, start=1000)).abs().max().item() <= 1e-3


@torch.no_grad()
def test_cache_misuse_raises_value_error() -> None:
    block = LlamaBlock(parse("llama", num_layers=1))
    cache = LayerCache(block.config, batch_size=2, max_length=4, dtype=torch.float32)
    block(torch.randn(2, 3, 64), start=0, cache=cache)
    with pytest.raises(ValueError, match="start=1 but the KV cache holds 3"):
        block(torch.randn(2, 1, 64), start=1, cache=cache)
    with pytest.raises(ValueError, match="max_length=4"):
        block(torch.randn(2, 2, 64), start=3, cache=cache)
    with pytest.raises(ValueError, match="batch"):
        block(torch.randn(1, 1, 64), start=3, cache=cache)
    with pytest.raises(ValueError, match="hidden must be"):
        block(torch.randn(2, 1, 32), start=3, cache=cache)
    assert cache.length == 3  # a refused step leaves the cache as it was
    block(torch.randn(2, 1, 64), start=3, cache=cache)
    assert cache.length == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_size(dtype: torch.dtype) -> None:
    config = parse("llama", num_layers=1, head_dim=32)
    cache = LayerCache(config, batch_size=3, max_length=10, dtype=dtype)
    expected = 2 * 3 * 2 * 10 * 32 * dtype.itemsize  # k and v, batch, kv heads, length, head_dim
    assert cache.nbytes() == LayerCache.bytes_needed(config, 3, 10, dtype) == expected


@torch.no_grad()
def test_bfloat16_decoding_stays_close_to_float32() -> None:
    ours = ours_from_hf(make_hf_model("llama", num_layers=3))
    ids = token_ids()
    reference = ours(ids)
    ours.to(torch.bfloat16)
    caches = ours.new_caches(2, 12)
    assert caches[0].keys.dtype == torch.bfloat16
    steps = [ours(ids[:, :6], 0, caches)] + [ours(ids[:, i : i + 1], i, caches) for i in range(6, 12)]
    got = torch.cat(steps, dim=1)
    assert got.dtype == torch.float32
    assert (got - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def test_embed_rejects_out_of_range_ids() -> None:
    ours = ours_from_hf(make_hf_model("llama", num_layers=1))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        ours.parts.embed(torch.tensor([[1, 128]]))


def test_tied_model_shares_the_matrix() -> None:
    ours = ours_from_hf(make_hf_model("llama", num_layers=1, tie=True))
    assert ours.parts.lm_head.weight is ours.parts.embed_tokens.weight


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("case", list(CASES))
def test_both_config_layouts_parse_identically(case: str) -> None:
    new_layout = make_hf_model(num_layers=3, **CASES[case]).config.to_dict()
    assert "rope_parameters" in new_layout
    old_layout = to_legacy_layout(new_layout)
    config = LlamaConfig.from_hf_dict(new_layout)
    assert LlamaConfig.from_hf_dict(old_layout) == config
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize("case", list(CASES))
def test_exported_config_loads_in_transformers(case: str) -> None:
    config = LlamaConfig.from_hf_dict(make_hf_model(num_layers=3, **CASES[case]).config.to_dict())
    exported = config.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(**exported)
    assert type(hf_config).__name__.lower().startswith(config.model_type)
    assert LlamaConfig.from_hf_dict(hf_config.to_dict()) == config


def test_parsed_fields() -> None:
    llama3 = parse("llama-llama3-rope", num_layers=1)
    assert llama3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    assert llama3.rope_theta == 500000.0
    c = parse("llama-head-dim-biases", num_layers=1)
    assert (c.head_dim, c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window) == (32, True, True, True, None)
    c = parse("qwen2", num_layers=1)
    assert (c.head_dim, c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window) == (16, True, False, False, None)
    assert parse("qwen2-window", num_layers=1).sliding_window == 4
    assert parse("mistral-window", num_layers=1).sliding_window == 4


LLAMA_31_8B = {  # as published in meta-llama/Llama-3.1-8B config.json (older layout)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_published_llama31_config() -> None:
    generation = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    config = LlamaConfig.from_hf_dict(LLAMA_31_8B, generation)
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (128, 8, 500000.0)
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert LlamaConfig.from_hf_dict(LLAMA_31_8B).eos_token_ids == (128001,)
    # 4 attention matrices (k, v are 8 heads of 128) + 3 MLP matrices + 2 norms
    assert config.block_param_count() == 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336 + 2 * 4096


@pytest.mark.parametrize(
    ("generation", "config_eos", "expected"),
    [
        ({"eos_token_id": 5}, 2, (5,)),
        ({"eos_token_id": [5, 6]}, 2, (5, 6)),
        ({}, [7, 8], (7, 8)),
        (None, None, ()),
        ({"eos_token_id": []}, 2, ()),
    ],
)
def test_eos_sources(generation: dict[str, Any] | None, config_eos: Any, expected: tuple[int, ...]) -> None:
    d = {**make_hf_model(num_layers=1).config.to_dict(), "eos_token_id": config_eos}
    assert LlamaConfig.from_hf_dict(d, generation).eos_token_ids == expected


def test_rope_scaling_with_old_type_key() -> None:
    d = to_legacy_layout(make_hf_model(num_layers=1).config.to_dict())
    d["rope_scaling"] = {"type": "linear", "factor": 4.0}
    assert LlamaConfig.from_hf_dict(d).rope_scaling == RopeScaling("linear", 4.0)


@pytest.mark.parametrize("case", list(CASES))
def test_block_param_count(case: str) -> None:
    hf = make_hf_model(num_layers=1, **CASES[case])
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    hf_count = sum(p.numel() for p in hf.model.layers[0].parameters())
    assert config.block_param_count() == sum(p.numel() for p in LlamaBlock(config).parameters()) == hf_count


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
        ({"hidden_size": -64}, ["hidden_size", "-64"]),
        ({"model_type": "gpt2"}, ["'gpt2'", "llama"]),
        ({"hidden_act": "gelu"}, ["'gelu'"]),
        ({"head_dim": 15}, ["head_dim=15"]),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ["'dynamic'", "linear", "llama3"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, ["'yarn'"]),
        ({"rope_parameters": {"rope_type": "linear"}}, ["'factor'"]),
        (
            {"rope_parameters": {**LLAMA3, "low_freq_factor": 4.0}},
            ["high_freq_factor=4.0", "low_freq_factor=4"],
        ),
        ({"vocab_size": None}, ["vocab_size"]),
        ({"rms_norm_eps": 0.0}, ["rms_norm_eps=0.0"]),
        ({"rms_norm_eps": "tiny"}, ["malformed config", "tiny"]),
        ({"rope_parameters": ["default"]}, ["flat dict", "['default']"]),
    ],
)
def test_config_errors_show_the_numbers(change: dict[str, Any], shown: list[str]) -> None:
    d = {**make_hf_model(num_layers=2).config.to_dict(), **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_hf_dict(d)
    assert isinstance(err.value, ValueError)
    for text in shown:
        assert text in str(err.value)


def test_config_errors_for_layouts_we_do_not_run() -> None:
    d = {**make_hf_model("qwen2", num_layers=4).config.to_dict(), "use_sliding_window": True}
    d["sliding_window"] = 4
    d.pop("layer_types")
    with pytest.raises(ConfigError, match="2 of 4 layers"):
        LlamaConfig.from_hf_dict({**d, "max_window_layers": 2})
    assert LlamaConfig.from_hf_dict({**d, "max_window_layers": 4}).sliding_window is None
    config = LlamaConfig.from_hf_dict(make_hf_model("mistral", num_layers=1).config.to_dict())
    with pytest.raises(ConfigError, match=r"\(True, False, False\)"):
        LlamaConfig(**{**config.__dict__, "qkv_bias": True})
