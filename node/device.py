"""Where a node computes and how much fits there.

Device and dtype choice, bitsandbytes weight quantization, memory estimates for a span of blocks
and the KV cache, and a stable device name to key cached throughput measurements.

Imports only torch and the standard library (bitsandbytes lazily, when quantizing), so
`bench/gpu_check.py` can exercise it on a GPU machine that has nothing but torch installed.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType
from typing import Literal, get_args

import torch
from torch import nn

from swarm.errors import ConfigError
from swarm.models.llama import LlamaConfig

MiB = 1 << 20
GiB = 1 << 30

Quant = Literal["none", "int8", "nf4"]
QUANTS: tuple[str, ...] = get_args(Quant)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

NF4_BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit format (its default blocksize)
_NESTED_BLOCK = 256  # absmax values per float32 scale once double-quantized (compress_statistics)
_HEADROOM_MIN = 256 * MiB
_MIN_CACHE = 64 * MiB
_MAX_CPU_CACHE = 16 * GiB
# Share of usable memory default_num_blocks keeps from weights, for the KV cache. A GPU is the
# node's own; host RAM is shared with the OS and the volunteer's programs, so it leaves more.
_CUDA_CACHE_FRACTION, _HOST_CACHE_FRACTION = 0.2, 0.4


# ----------------------------------------------------------------------------- device and dtype


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was requested but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device torch knows (use auto, cpu or cuda)") from e


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a CUDA GPU that supports it, else float32 (CPU half math is slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not supported; use auto or one of {list(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- quantization


def check_quant(quant: str, device: torch.device) -> None:
    """Fail at startup, before any weights load, if `quant` cannot run on `device`."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r} is not supported; use one of {list(QUANTS)}")
    if quant == "none":
        return
    if device.type != "cuda":  # bitsandbytes' int8/nf4 kernels we rely on are CUDA kernels
        raise ConfigError(
            f"--quant {quant} needs a CUDA device; this node runs on {device.type} (use --quant none)"
        )
    import_bitsandbytes(quant)


def import_bitsandbytes(quant: str) -> ModuleType:
    """bitsandbytes, imported only when quantizing: it is an optional, CUDA-only dependency."""
    try:
        return importlib.import_module("bitsandbytes")
    except (ImportError, OSError, RuntimeError) as e:  # absent, or its CUDA library fails to load
        raise ConfigError(
            f"--quant {quant} needs bitsandbytes: pip install 'swarm[gpu]' ({type(e).__name__}: {e})"
        ) from e


def quantize_block(block: nn.Module, quant: Quant, device: torch.device) -> nn.Module:
    """Swap every nn.Linear of a loaded block for its bitsandbytes twin and move it to `device`.

    Call with loaded weights in the serving dtype: bitsandbytes quantizes each weight as it moves to
    the GPU in `.to(device)`. Parameter names stay and the forward is unchanged. 'none' only moves it.
    """
    check_quant(quant, device)
    if quant != "none":
        if any(p.is_meta for p in block.parameters()):
            raise ValueError("the block still has meta tensors; load its weights before quantizing")
        bnb = import_bitsandbytes(quant)
        if quant == "int8":  # LLM.int8() computes in float16 by design, and bitsandbytes says so on
            # every bf16 call (a warning in older releases, a log record in newer): it would flood the log.
            warnings.filterwarnings("ignore", "MatMul8bitLt: inputs will be cast", UserWarning)
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)
        dtype = next(p.dtype for p in block.parameters() if p.is_floating_point())
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized_linear(bnb, child, quant, dtype))
    return block.to(device)


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


def _quantized_linear(bnb: ModuleType, linear: nn.Linear, quant: Quant, dtype: torch.dtype) -> nn.Module:
    shape = (linear.in_features, linear.out_features)
    has_bias = linear.bias is not None
    # Built on meta: the weight is replaced right away, so allocating a random one would be waste.
    new: nn.Module
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(
            *shape, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )  # threshold 6.0: LLM.int8()'s outlier features stay in 16-bit, which keeps accuracy
        new.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(*shape, bias=has_bias, compute_dtype=dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            quant_type="nf4",
            blocksize=NF4_BLOCK,
            compress_statistics=True,  # double-quantized absmax: ~0.05 byte/param less than float32 ones
            module=new,
        )
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
    return new


# ----------------------------------------------------------------------------- memory estimates


def span_bytes(config: LlamaConfig, num_blocks: int, dtype: torch.dtype, quant: Quant) -> int:
    """Bytes the weights of `num_blocks` blocks take on the device, quantized as `quant`."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    shapes = _linear_shapes(config)
    rest = config.block_param_count() - sum(o * i for o, i in shapes)  # biases and norms: never quantized
    per_block = sum(_linear_bytes(o * i, o, dtype, quant) for o, i in shapes) + rest * dtype.itemsize
    return num_blocks * per_block


def _linear_shapes(config: LlamaConfig) -> list[tuple[int, int]]:
    """(out, in) of the seven linear weights of a block: q, k, v, o, gate, up, down."""
    d, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)]


def _linear_bytes(n: int, rows: int, dtype: torch.dtype, quant: Quant) -> int:
    if quant == "int8":
        return n + 4 * rows  # int8 weights + one float32 scale per output row
    if quant == "nf4":
        absmax = math.ceil(n / NF4_BLOCK)
        # two 4-bit codes per byte + a uint8 absmax per block + a float32 scale per 256 absmax
        return math.ceil(n / 2) + absmax + 4 * math.ceil(absmax / _NESTED_BLOCK)
    return n * dtype.itemsize


def _headroom(need: int) -> int:
    # Memory kept free beyond weights and KV cache, for what the estimates leave out: activations
    # (a long prefill's MLP intermediates), allocator fragmentation, cuBLAS/bitsandbytes workspaces;
    # on a host also the interpreter, gRPC buffers and other processes. 10% scales with the span;
    # the 256 MiB floor covers the fixed costs that dominate for small models.
    return max(need // 10, _HEADROOM_MIN)


def _max_need(free: int) -> int:
    """Largest weights + cache that leaves `_headroom` of `free` (may be negative)."""
    return min(free * 10 // 11, free - _HEADROOM_MIN)


def check_fits(
    config: LlamaConfig,
    num_blocks: int,
    dtype: torch.dtype,
    quant: Quant,
    device: torch.device,
    cache_bytes: int,
    *,
    free: int | None = None,
) -> None:
    """Raise ConfigError, naming every number and the fixes, if the span and its cache do not fit."""
    free = free_memory(device) if free is None else free
    weights = span_bytes(config, num_blocks, dtype, quant)
    need = weights + cache_bytes
    if need <= _max_need(free):
        return
    per_block, most = span_bytes(config, 1, dtype, quant), _max_need(free)
    fit, cache_left = (most - cache_bytes) // per_block, most - weights
    fixes = [f"serve fewer blocks (--num-blocks {fit})" if fit >= 1 else "free some memory"]
    if device.type == "cuda" and quant != "nf4":
        fixes.append(f"quantize (--quant nf4: {_fmt(span_bytes(config, num_blocks, dtype, 'nf4'))})")
    fixes.append(f"a smaller KV cache (--cache-bytes {cache_left if cache_left >= _MIN_CACHE else 'N'})")
    kind = f"{quant}, {str(dtype).removeprefix('torch.')}"
    raise ConfigError(
        f"{num_blocks} block(s) of {_fmt(per_block)} each do not fit on {device}: weights {_fmt(weights)} "
        f"({kind}) + KV cache {_fmt(cache_bytes)} + headroom {_fmt(_headroom(need))} = "
        f"{_fmt(need + _headroom(need))}, but {_fmt(free)} is free; " + ", or ".join(fixes)
    )


def default_num_blocks(
    config: LlamaConfig,
    dtype: torch.dtype,
    quant: Quant,
    device: torch.device,
    *,
    free: int | None = None,
    cache_fraction: float | None = None,
) -> int:
    """Blocks to serve when --num-blocks is omitted: as many as fit next to the default KV cache.

    `cache_fraction` of the usable memory is kept from the weights (default 0.2 on CUDA, 0.4
    elsewhere); the result is in [1, num_hidden_layers] and fits next to `default_cache_bytes`.
    Raises ConfigError if not even one block fits.
    """
    free = free_memory(device) if free is None else free
    fraction = _CUDA_CACHE_FRACTION if device.type == "cuda" else _HOST_CACHE_FRACTION
    fraction = fraction if cache_fraction is None else cache_fraction
    if not 0 <= fraction < 1:
        raise ValueError(f"cache_fraction must be in [0, 1), got {fraction}")
    per_block = span_bytes(config, 1, dtype, quant)
    n = min(config.num_hidden_layers, max(1, int(_max_need(free) * (1 - fraction)) // per_block))
    while n >= 1 and _default_need(config, n, dtype, quant, device, free) > _max_need(free):
        n -= 1  # the default cache (at least 64 MiB) must fit next to the weights too
    if n < 1:  # not even one block: check_fits raises, naming the numbers and the fixes
        cache = default_cache_bytes(device, free=free, weights_bytes=per_block)
        check_fits(config, 1, dtype, quant, device, cache, free=free)
    return n


def _default_need(
    config: LlamaConfig, n: int, dtype: torch.dtype, quant: Quant, device: torch.device, free: int
) -> int:
    weights = span_bytes(config, n, dtype, quant)
    return weights + default_cache_bytes(device, free=free, weights_bytes=weights)


def default_cache_bytes(device: torch.device, *, free: int | None = None, weights_bytes: int = 0) -> int:
    """KV-cache budget when --cache-bytes is omitted, from the memory the weights leave free."""
    free = free_memory(device) if free is None else free
    left = max(0, free - weights_bytes)
    if device.type == "cuda":
        # The GPU is the node's own: half of what is left, the other half stays for activations,
        # allocator fragmentation and workspaces. No cap: the budget only admits sessions.
        return max(_MIN_CACHE, left // 2)
    # Host RAM is shared with the OS and the volunteer's programs, and MemAvailable moves: take a
    # quarter, capped because CPU attention over caches that large is too slow to be worth serving.
    return min(max(_MIN_CACHE, left // 4), _MAX_CPU_CACHE)


def free_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory our caching allocator holds but does not use is free to us, not to the driver.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # MemAvailable: free memory plus the caches Linux can drop, which is what we may take.
    available = _field(Path("/proc/meminfo"), "MemAvailable")
    host = int(available.split()[0]) * 1024 if available else _sysconf_free()  # kB in meminfo
    limit = _cgroup_free()  # a container's limit binds before the host's memory does
    return host if limit is None else min(host, limit)


def _sysconf_free() -> int:
    # Free pages where the OS counts them; else (macOS) half of all memory, a cautious guess.
    for name, share in (("SC_AVPHYS_PAGES", 1), ("SC_PHYS_PAGES", 2)):
        try:
            return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE") // share
        except (ValueError, OSError, AttributeError):
            continue
    raise ConfigError("cannot tell how much memory is free; pass --num-blocks and --cache-bytes")


_CGROUPS = (  # (limit file, usage file, reclaimable page-cache key in memory.stat): v2, then v1
    ("memory.max", "memory.current", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
)


def _cgroup_free() -> int | None:
    """Bytes left under this container's memory limit, or None when there is no limit."""
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file, inactive_key in _CGROUPS:
        limit_path = root / limit_file
        try:
            limit = limit_path.read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2**63
                return None
            # Usage counts page cache (checkpoint files just read, say); its inactive part is reclaimable.
            inactive = int(_field(limit_path.parent / "memory.stat", inactive_key) or 0)
            used = int((root / usage_file).read_text()) - inactive
            return max(0, int(limit) - used)
        except (OSError, ValueError):
            continue
    return None


def _field(path: Path, key: str) -> str | None:
    """The value of the first `key: value` or `key value` line of a /proc- or /sys-style file."""
    try:
        for line in path.read_text().splitlines():
            rest = line[len(key) :] if line.startswith(key) else ""
            if rest[:1] in (":", " ", "\t"):  # the whole key, not the prefix of a longer one
                return " ".join(rest.lstrip(" \t:").split())
    except OSError:
        pass
    return None


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


# ----------------------------------------------------------------------------- naming


def device_name(device: torch.device) -> str:
    """A stable human name of the hardware, the key under which throughput measurements are cached."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":  # CPU throughput scales with the threads torch uses, so they are part of it
        return f"{_cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def _cpu_model() -> str:
    return _field(Path("/proc/cpuinfo"), "model name") or " ".join(platform.processor().split()) or "cpu"
