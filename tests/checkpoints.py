"""Tiny random-weight transformers checkpoints for tests (Llama, Mistral, Qwen2).

Weights are drawn wider than transformers' init (std 0.2): with the default std 0.02 a tiny
random model's logits are nearly flat, so greedy decoding hits near-ties that float noise
flips, and it repeats one token. Norm weights get noise too, so a test notices if they are
ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from swarm.training.data import VOCAB_SIZE

FAMILIES: dict[str, tuple[type[Any], type[Any]]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


# llama3 rope scaling sized for the tiny test models
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that with head_dim 16 all three llama3 bands (kept, interpolated, slowed) occur
    "original_max_position_embeddings": 32,
}


# A tiny byte-level Llama: what the training tests train from scratch (a config, no weights).
BYTE_CONFIG = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,  # bytes
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def make_hf_model(
    family: str = "llama",
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    tie: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
    std: float = 0.2,
    **extra: Any,
) -> Any:
    """A float32 transformers model in eval mode; `extra` goes to its config (head_dim=, sliding_window=)."""
    config_cls, model_cls = FAMILIES[family]
    theta = float(extra.pop("rope_theta", 10000.0))
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta}
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie,
        rope_parameters=rope,
        bos_token_id=0,
        eos_token_id=None
        if eos_token_id == []
        else eos_token_id,  # [] means never stop; generate fails on []
        **extra,
    )
    model = model_cls(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return model


def make_checkpoint(
    path: Path,
    family: str = "llama",
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    tie: bool = False,
    sharded: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    legacy_layout: bool = False,
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
    **extra: Any,
) -> Path:
    """Save a random model with `save_pretrained` (sharded: about one shard per block) and return `path`.

    legacy_layout: rewrite config.json as before transformers 5 (top-level rope_theta and
    rope_scaling, as in the published Llama 3.1 config.json)."""
    model = make_hf_model(
        family,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        tie=tie,
        rope_scaling=rope_scaling,
        eos_token_id=eos_token_id,
        seed=seed,
        **extra,
    )
    path = Path(path)
    if sharded:
        block_bytes = sum(p.nbytes for p in model.model.layers[0].parameters())
        model.save_pretrained(path, max_shard_size=max(block_bytes // 2, 1024))
    else:
        model.save_pretrained(path)
    generation = {"bos_token_id": 0, "eos_token_id": None if eos_token_id == [] else eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if legacy_layout:
        config_file = path / "config.json"
        config_file.write_text(json.dumps(to_legacy_layout(json.loads(config_file.read_text())), indent=2))
    return path


def to_legacy_layout(config: dict[str, Any]) -> dict[str, Any]:
    """transformers-5 config dict -> the older layout with top-level rope_theta / rope_scaling."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    return config


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORD_SPECIALS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def add_word_tokenizer(
    path: Path, vocab_size: int = 128, *, chat_template: str | None = CHAT_TEMPLATE
) -> Path:
    """Give a checkpoint a word-level tokenizer (`tokenizer.json` + `tokenizer_config.json`).

    Token i >= 6 is the word `w{i}`, so any token sequence decodes to text and back; the chat
    template is a small ChatML-like one. Built locally: tests never download a tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(WORD_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(WORD_SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(WORD_SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path
