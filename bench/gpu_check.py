"""Check swarm.node.device on a real CUDA GPU: dtype choice, bf16 and quantized block forwards,
quantized weight memory against `span_bytes`, and the memory plan on the GPU's real free memory.

    python bench/gpu_check.py [--out gpu_check.json]

Needs only torch (and bitsandbytes for the int8/nf4 checks, which are skipped without it): it
imports swarm.errors, swarm.models.llama and swarm.node.device, which import nothing else. From a
plain checkout (no `pip install`) it puts the repository on sys.path and lets `swarm.node` resolve
to node/, as pyproject's package-dir mapping does when installed.

Prints `gpu_check: <name> ok|FAIL|skip <details>` per check and writes a JSON summary to --out;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swarm  # noqa: E402

try:
    importlib.import_module("swarm.node")
except ModuleNotFoundError:  # not pip-installed: node/ is swarm.node only through package-dir
    swarm.__path__.append(str(ROOT))

from swarm.errors import ConfigError  # noqa: E402
from swarm.models.llama import LlamaBlock, LlamaConfig  # noqa: E402
from swarm.node import device as dev  # noqa: E402

CUDA = torch.device("cuda")
SMALL = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 4}
LLAMA_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
# Relative error of the block's update (output - input) against the unquantized bf16 block.
TOLERANCE = {"bfloat16": 0.03, "int8": 0.06, "nf4": 0.25}
MEMORY_RATIO = (0.95, 1.10)  # measured / estimated weight bytes (allocator rounds up to 512 B)

results: list[dict[str, Any]] = []


def report(name: str, status: str, details: str, **data: Any) -> None:
    print(f"gpu_check: {name} {status} {details}", flush=True)
    results.append({"name": name, "status": status, "details": details, **data})


def check(name: str, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> None:
    """Run one check; an exception is a failure, reported with its type and message."""
    try:
        ok, details, data = fn()
    except Exception as e:  # a check must never stop the others
        ok, details, data = False, f"{type(e).__name__}: {e}", {}
    report(name, "ok" if ok else "FAIL", details, **data)
    torch.cuda.empty_cache()


def make_config(sizes: dict[str, int], layers: int = 32) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(
        {"model_type": "llama", "vocab_size": 32000, "num_hidden_layers": layers, **sizes}
    )


def random_block(config: LlamaConfig, seed: int = 0) -> LlamaBlock:
    """A float32 CPU block with weights of a trained model's scale (nn.Linear's init is similar)."""
    torch.manual_seed(seed)
    block = LlamaBlock(config).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    return block


def update_error(block: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """||f(x) - x - ref_update|| / ||ref_update||: the residual x would hide errors in the update."""
    with torch.no_grad():
        out = block(x)
    if out.dtype != x.dtype or out.shape != x.shape:
        raise AssertionError(f"output {out.dtype} {list(out.shape)} for input {x.dtype} {list(x.shape)}")
    update = (out - x).float()
    return float((update - reference).norm() / reference.norm())


def check_resolve() -> tuple[bool, str, dict[str, Any]]:
    device, dtype = dev.resolve_device("auto"), dev.resolve_dtype("auto", CUDA)
    ok = device.type == "cuda" and dtype == torch.bfloat16
    return ok, f"auto -> {device}, {dtype}", {}


def check_name_and_free() -> tuple[bool, str, dict[str, Any]]:
    name, free = dev.device_name(CUDA), dev.free_memory(CUDA)
    total = torch.cuda.get_device_properties(CUDA).total_memory
    ok = bool(name) and name == dev.device_name(CUDA) and 0 < free <= total
    return ok, f"{name!r}, free {free / dev.GiB:.2f} of {total / dev.GiB:.2f} GiB", {"free": free}


def check_bf16(
    config: LlamaConfig, x32: torch.Tensor, ref32: torch.Tensor
) -> tuple[bool, str, dict[str, Any]]:
    block = random_block(config).to(CUDA, torch.bfloat16)
    err = update_error(block, x32.to(torch.bfloat16), ref32)
    return err < TOLERANCE["bfloat16"], f"bf16 vs float32 update rel error {err:.4f}", {"rel_error": err}


def check_quant(
    config: LlamaConfig, quant: dev.Quant, x: torch.Tensor, ref: torch.Tensor
) -> tuple[bool, str, dict[str, Any]]:
    plain = random_block(config).to(torch.bfloat16)
    names = [name for name, _ in plain.named_parameters()]
    before = torch.cuda.memory_allocated(CUDA)
    block = dev.quantize_block(plain, quant, CUDA)
    measured = torch.cuda.memory_allocated(CUDA) - before
    estimate = dev.span_bytes(config, 1, torch.bfloat16, quant)
    kinds = sorted({type(m).__name__ for m in block.modules() if "Linear" in type(m).__name__})
    err = update_error(block, x, ref)
    x_grad = x.detach().clone().requires_grad_()
    block(x_grad).float().square().mean().backward()  # nodes backpropagate to their inputs (--train)
    grad = x_grad.grad
    grad_ok = grad is not None and bool(grad.isfinite().all()) and bool(grad.abs().sum() > 0)
    ratio = measured / estimate
    ok = err < TOLERANCE.get(quant, 0.01) and MEMORY_RATIO[0] <= ratio <= MEMORY_RATIO[1]
    ok = ok and (quant == "none" or "Linear" not in kinds)  # every nn.Linear was replaced
    ok = ok and names == [name for name, _ in block.named_parameters()]  # checkpoint names still apply
    ok = ok and grad_ok
    details = (
        f"rel error {err:.4f}, input grad {'ok' if grad_ok else 'BAD'}, "
        f"weights {measured} B vs estimate {estimate} B ({ratio:.3f}), {kinds}"
    )
    return ok, details, {"rel_error": err, "measured": measured, "estimate": estimate}


def check_plan(config: LlamaConfig, quant: dev.Quant) -> tuple[bool, str, dict[str, Any]]:
    """Fill the GPU as the default plan says, then run a long prefill through a real block:
    the headroom must hold the activations."""
    dtype = torch.bfloat16
    n = dev.default_num_blocks(config, dtype, quant, CUDA)
    weights = dev.span_bytes(config, n, dtype, quant)
    cache = dev.default_cache_bytes(CUDA, weights_bytes=weights)
    free = dev.free_memory(CUDA)
    dev.check_fits(config, n, dtype, quant, CUDA, cache)
    with torch.device("meta"):  # a 70B block: skip nn.Linear's slow float32 init on the CPU
        plain = LlamaBlock(config).to(dtype)
    plain.to_empty(device="cpu")
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.02)
    block = dev.quantize_block(plain, quant, CUDA)
    filler = torch.empty(
        weights - dev.span_bytes(config, 1, dtype, quant) + cache, dtype=torch.uint8, device=CUDA
    )
    with torch.no_grad():
        out = block(torch.randn(1, 4096, config.hidden_size, dtype=dtype, device=CUDA))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(CUDA)
    del plain, block, filler, out
    details = (
        f"{n} blocks ({weights / dev.GiB:.2f} GiB) + cache {cache / dev.GiB:.2f} GiB of {free / dev.GiB:.2f} "
        f"GiB free; a 4096-token prefill ran, peak allocated {peak / dev.GiB:.2f} GiB"
    )
    return 1 <= n <= config.num_hidden_layers, details, {"num_blocks": n, "cache_bytes": cache}


def check_too_big(config: LlamaConfig) -> tuple[bool, str, dict[str, Any]]:
    try:
        dev.check_fits(config, config.num_hidden_layers, torch.float32, "none", CUDA, 64 * dev.GiB)
    except ConfigError as e:
        return "--num-blocks" in str(e) and "--quant nf4" in str(e), f"refused: {e}", {}
    return False, "a float32 70B with a 64 GiB cache was said to fit", {}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    if not torch.cuda.is_available():
        report("cuda", "FAIL", f"torch {torch.__version__} sees no CUDA device")
    else:
        run_checks()
    try:
        bnb_version = importlib.import_module("bitsandbytes").__version__
    except Exception:  # absent, or failing to load: the checks above said which
        bnb_version = None
    summary = {
        "ok": all(r["status"] != "FAIL" for r in results),
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "device": dev.device_name(CUDA) if torch.cuda.is_available() else None,
        "seconds": round(time.perf_counter() - start, 1),
        "checks": results,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_check: {'all ok' if summary['ok'] else 'FAILED'}, summary in {args.out}")
    return 0 if summary["ok"] else 1


def run_checks() -> None:
    small, big = make_config(SMALL), make_config(LLAMA_70B, layers=80)
    check("resolve_auto", check_resolve)
    check("device_name_free_memory", check_name_and_free)
    torch.manual_seed(1)
    x32 = torch.randn(2, 64, small.hidden_size, device=CUDA)
    with torch.no_grad():  # references: the float32 and the bf16 block's updates
        ref32 = (random_block(small).to(CUDA)(x32) - x32).float()
        x = x32.to(torch.bfloat16)
        ref = (random_block(small).to(CUDA, torch.bfloat16)(x) - x).float()
    check("bf16_forward", lambda: check_bf16(small, x32, ref32))
    check("quant_none", lambda: check_quant(small, "none", x, ref))
    quants: tuple[dev.Quant, ...] = ("int8", "nf4")
    bnb_ok = True
    for quant in quants:
        try:
            dev.check_quant(quant, CUDA)
        except ConfigError as e:  # without bitsandbytes: the error must say how to get it
            bnb_ok = False
            ok = "swarm[gpu]" in str(e)
            report(f"quant_{quant}", "skip" if ok else "FAIL", f"bitsandbytes unusable: {e}")
            continue
        check(f"quant_{quant}", functools.partial(check_quant, small, quant, x, ref))
    check("plan_bf16", lambda: check_plan(big, "none"))
    if bnb_ok:
        check("plan_nf4", lambda: check_plan(big, "nf4"))
    check("check_fits_refuses", lambda: check_too_big(big))


if __name__ == "__main__":
    sys.exit(main())
