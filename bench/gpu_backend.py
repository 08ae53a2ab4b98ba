"""The node's execution path on a real CUDA GPU: BlockBackend with bf16 / int8 / nf4 blocks.

    python bench/gpu_backend.py [--out gpu_backend.json]

For each weight format: batched forward of concurrent requests equals each request run alone,
cached inference steps match a full forward, Backward gives finite input gradients close to the
bf16 ones, the measured per-block throughput, and forward tokens/s with batching on vs off for
64 concurrent 1x32-token requests. `weights_bytes_measured` is all memory allocated on the GPU
(weights plus the test's own tensors, about 128 MiB). Needs torch (and bitsandbytes for
int8/nf4); like bench/gpu_check.py it runs from a plain checkout without the gRPC server stack.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

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
from swarm.node.backend import BlockBackend  # noqa: E402
from swarm.node.throughput import measure_compute  # noqa: E402

CONFIG = {  # Llama-3-8B-shaped blocks
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 4,
    "vocab_size": 128,
    "max_position_embeddings": 4096,
}


def make_blocks(config: LlamaConfig, quant: dev.Quant, seed: int = 0) -> list[LlamaBlock]:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(config.num_hidden_layers):
        block = LlamaBlock(config).to(torch.bfloat16).eval()
        blocks.append(cast(LlamaBlock, dev.quantize_block(block, quant, torch.device("cuda"))))
    return blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


async def forwards(backend: BlockBackend, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    started = time.perf_counter()
    outs = await asyncio.gather(*(backend.forward(x, 0, backend.end) for x in inputs))
    return list(outs), time.perf_counter() - started


async def check_format(config: LlamaConfig, quant: dev.Quant) -> dict[str, Any]:
    blocks = make_blocks(config, quant)
    device = torch.device("cuda")
    result: dict[str, Any] = {"quant": quant}
    on = BlockBackend(config, blocks, 0, dtype=torch.bfloat16, device=device, cache_bytes=4 << 30)
    off = BlockBackend(
        config, blocks, 0, dtype=torch.bfloat16, device=device, cache_bytes=4 << 30, batching=False
    )
    try:
        inputs = [torch.randn(1, 32, config.hidden_size) for _ in range(8)]
        batched, _ = await forwards(on, inputs)
        alone = [await on.forward(x, 0, on.end) for x in inputs]
        result["batched_vs_alone_rel_err"] = max(rel(a, b) for a, b in zip(batched, alone, strict=True))

        prompt = torch.randn(1, 12, config.hidden_size)
        full = await on.forward(prompt, 0, on.end)
        session = on.open_session(0, on.end, 1, 16)
        first = await on.step(session, prompt[:, :8], 0)
        rest = await on.step(session, prompt[:, 8:], 8)
        on.close_session(session)
        result["step_vs_forward_rel_err"] = rel(torch.cat([first, rest], 1), full)

        grad = (await on.backward(prompt, torch.randn_like(prompt), 0, on.end)).grad_inputs
        result["backward_finite"] = bool(torch.isfinite(grad).all())

        rates = {}
        for name, backend in (("on", on), ("off", off)):
            await forwards(backend, inputs)  # warm-up
            _, seconds = await forwards(backend, [torch.randn(1, 32, config.hidden_size) for _ in range(64)])
            rates[name] = 64 * 32 / seconds
        result["batching_tokens_per_s"] = rates
        result["batching_ratio"] = rates["on"] / rates["off"]
        forward_tps, inference_rps = measure_compute(
            config, device, torch.bfloat16, block_factory=lambda: blocks[0], budget_s=2.0
        )
        result["block_forward_tps"], result["block_inference_rps"] = forward_tps, inference_rps
        result["weights_bytes_measured"] = torch.cuda.memory_allocated()
        result["weights_bytes_estimate"] = dev.span_bytes(config, len(blocks), torch.bfloat16, quant)
    finally:
        on.shutdown()
        off.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_backend: no CUDA device", file=sys.stderr)
        return 1
    config = LlamaConfig.from_hf_dict(CONFIG)
    results = []
    for quant in ("none", "int8", "nf4"):
        try:
            dev.check_quant(quant, torch.device("cuda"))
        except ConfigError as e:
            print(f"gpu_backend: {quant} skip {e}")
            continue
        torch.cuda.empty_cache()
        result = asyncio.run(check_format(config, quant))
        ok = (
            result["batched_vs_alone_rel_err"] < 2e-2
            and result["step_vs_forward_rel_err"] < 5e-2
            and result["backward_finite"]
        )
        result["ok"] = ok
        print(f"gpu_backend: {quant} {'ok' if ok else 'FAIL'} {json.dumps(result)}")
        results.append(result)
    if args.out:
        summary = {"device": torch.cuda.get_device_name(), "results": results}
        args.out.write_text(json.dumps(summary, indent=2))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
