"""Device choice, quantization checks and memory estimates (CPU only: no real GPU memory is touched)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from swarm.errors import ConfigError
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node import device as dev

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a name: every function given it here is passed `free` explicitly
MiB, GiB = dev.MiB, dev.GiB


def make_config(model_type: str = "llama", **sizes: Any) -> LlamaConfig:
    d = {
        "model_type": model_type,
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **sizes,
    }
    return LlamaConfig.from_hf_dict(d)


# A Llama-2-7B-sized block: big enough that per-row and per-block overheads are small.
BIG = make_config(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dev.resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="no CUDA device; use --device cpu"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device 'tpu7'"):
        dev.resolve_device("tpu7")


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dev.resolve_dtype("auto", CPU) == torch.float32
    assert dev.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert dev.resolve_dtype("float16", CPU) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dev.resolve_dtype("auto", CUDA) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dev.resolve_dtype("auto", CUDA) == torch.float32
    with pytest.raises(ConfigError, match="--dtype 'int4'"):
        dev.resolve_dtype("int4", CPU)


def test_check_quant_on_cpu() -> None:
    dev.check_quant("none", CPU)
    for quant in ("int8", "nf4"):
        message = f"--quant {quant} needs a CUDA device; this node runs on cpu (use --quant none)"
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dev.check_quant(quant, CPU)
    with pytest.raises(ConfigError, match="--quant 'fp8'"):
        dev.check_quant("fp8", CPU)


def test_check_quant_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match=r"--quant nf4 needs bitsandbytes: pip install 'swarm\[gpu\]'"):
        dev.check_quant("nf4", CUDA)  # the device check passes on the name alone; CUDA is never touched
    with pytest.raises(ConfigError, match=r"swarm\[gpu\]"):
        dev.quantize_block(LlamaBlock(make_config()), "int8", CUDA)


def test_quantize_block_on_cpu() -> None:
    block = LlamaBlock(make_config())
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        dev.quantize_block(block, "nf4", CPU)
    assert dev.quantize_block(block, "none", CPU) is block


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2 has q/k/v biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span_bytes_exact_without_quantization(model_type: str, dtype: torch.dtype) -> None:
    config = make_config(model_type)
    block = LlamaBlock(config).to(dtype)
    real = sum(p.numel() * p.element_size() for p in block.parameters())
    assert dev.span_bytes(config, 1, dtype, "none") == real
    assert dev.span_bytes(config, 5, dtype, "none") == 5 * real
    assert dev.span_bytes(config, 0, dtype, "none") == 0


def test_span_bytes_ratios() -> None:
    f32 = dev.span_bytes(BIG, 1, torch.float32, "none")
    assert dev.span_bytes(BIG, 1, torch.bfloat16, "none") * 2 == f32
    int8 = dev.span_bytes(BIG, 1, torch.bfloat16, "int8") / f32
    nf4 = dev.span_bytes(BIG, 1, torch.bfloat16, "nf4") / f32
    assert 0.25 < int8 < 0.26  # a byte per weight plus a float32 scale per row
    assert 0.125 < nf4 < 0.13  # half a byte per weight plus an absmax byte per 64
    with pytest.raises(ValueError, match="num_blocks"):
        dev.span_bytes(BIG, -1, torch.float32, "none")


def test_check_fits() -> None:
    weights = dev.span_bytes(BIG, 4, torch.bfloat16, "none")
    dev.check_fits(BIG, 4, torch.bfloat16, "none", CPU, 1 * GiB, free=weights + 2 * GiB)
    with pytest.raises(ConfigError) as e:
        dev.check_fits(BIG, 4, torch.bfloat16, "none", CPU, 1 * GiB, free=weights + GiB)
    message = str(e.value)
    for part in ("4 block(s) of 386.0 MiB", "1.00 GiB", "--num-blocks 3", "--cache-bytes", "headroom"):
        assert part in message
    assert "--quant" not in message  # not a fix on a CPU
    expected = (
        r"free some memory, or quantize \(--quant nf4: 398.3 MiB\), or a smaller KV cache \(--cache-bytes N"
    )
    with pytest.raises(ConfigError, match=expected):
        dev.check_fits(BIG, 4, torch.bfloat16, "none", CUDA, 1 * GiB, free=weights)


def test_default_num_blocks_is_monotone_and_clamped() -> None:
    for device in (CPU, CUDA):
        counts = [
            dev.default_num_blocks(BIG, torch.bfloat16, "none", device, free=free * GiB)
            for free in range(2, 200, 3)
        ]
        assert counts == sorted(counts)
        assert counts[0] >= 1 and counts[-1] == BIG.num_hidden_layers
        assert dev.default_num_blocks(BIG, torch.bfloat16, "nf4", device, free=3 * GiB) > counts[0]


def test_default_num_blocks_fits_next_to_the_default_cache() -> None:
    for device in (CPU, CUDA):
        for free in range(1 * GiB, 40 * GiB, 700 * MiB):
            n = dev.default_num_blocks(BIG, torch.bfloat16, "none", device, free=free)
            weights = dev.span_bytes(BIG, n, torch.bfloat16, "none")
            cache = dev.default_cache_bytes(device, free=free, weights_bytes=weights)
            dev.check_fits(BIG, n, torch.bfloat16, "none", device, cache, free=free)


def test_default_num_blocks_when_nothing_fits() -> None:
    with pytest.raises(ConfigError, match=r"1 block\(s\) of 772.0 MiB each do not fit on cuda.*--quant nf4"):
        dev.default_num_blocks(BIG, torch.float32, "none", CUDA, free=512 * MiB)
    with pytest.raises(ValueError, match="cache_fraction"):
        dev.default_num_blocks(BIG, torch.float32, "none", CPU, free=GiB, cache_fraction=1.0)


def test_default_cache_bytes() -> None:
    assert dev.default_cache_bytes(CPU, free=8 * GiB, weights_bytes=4 * GiB) == 1 * GiB
    assert dev.default_cache_bytes(CPU, free=8 * GiB, weights_bytes=8 * GiB) == 64 * MiB
    assert dev.default_cache_bytes(CPU, free=1024 * GiB) == 16 * GiB
    assert dev.default_cache_bytes(CUDA, free=80 * GiB, weights_bytes=40 * GiB) == 20 * GiB


def test_free_memory_and_device_name() -> None:
    assert dev.free_memory(CPU) > 0
    name = dev.device_name(CPU)
    assert name and name == dev.device_name(CPU)
    assert name.endswith(f"x{torch.get_num_threads()} threads")
