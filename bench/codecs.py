"""Benchmark Swarm's wire codecs against hivemind.compression on the same tensor, in the same run.

    python bench/codecs.py [--numel N] [--repeats R] [--block-size B] [--json PATH] [--check]

For every codec: bytes per element on the wire (whole protobuf message), encode / decode / round-trip
throughput in GB/s of the raw float32 input, and the round-trip relative error ||x - x̂|| / ||x||.
Throughputs use the best of `repeats` runs after one warm-up run (as timeit does: on a shared machine
the slower runs measure the neighbours); the JSON also keeps the median round trip.
A hivemind codec that fails (its 8-bit codecs do with numpy >= 2.4) shows its error class instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from swarm.wire import decode_tensor, encode_tensor, encoded_nbytes

BYTES_RATIO_TARGET = 3.5
SPEED_RATIO_TARGET = 5.0
HIDDEN = 4096  # activation-like layout: [tokens, hidden]
HIVEMIND_CODECS = ("FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT", "QUANTILE_8BIT")


@dataclass
class Result:
    library: str
    codec: str
    bytes_per_element: float | None = None
    encode_gbps: float | None = None
    decode_gbps: float | None = None
    roundtrip_gbps: float | None = None
    roundtrip_gbps_median: float | None = None
    rel_error: float | None = None
    error: str | None = None


def activation_like(numel: int, seed: int = 0) -> torch.Tensor:
    """Gaussian [tokens, hidden] float32 with a few 8x outlier channels, as LLM hidden states have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    rows = numel // HIDDEN
    if rows:
        outliers = torch.randperm(HIDDEN, generator=gen)[: HIDDEN // 200]
        x[: rows * HIDDEN].view(rows, HIDDEN)[:, outliers] *= 8.0
    return x


def measure(
    library: str,
    codec: str,
    x: torch.Tensor,
    encode: Callable[[torch.Tensor], Any],
    decode: Callable[[Any], torch.Tensor],
    repeats: int,
) -> Result:
    """Warm up once, then time `repeats` encode/decode pairs; report the best (and median) times."""
    try:
        msg = encode(x)
        y = decode(msg)
        enc_times, dec_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            msg = encode(x)
            t1 = time.perf_counter()
            y = decode(msg)
            t2 = time.perf_counter()
            enc_times.append(t1 - t0)
            dec_times.append(t2 - t1)
    except Exception as e:  # a failing third-party codec is a result, not a crash
        return Result(library, codec, error=type(e).__name__)
    raw_gb = x.numel() * x.element_size() / 1e9
    roundtrips = [e + d for e, d in zip(enc_times, dec_times, strict=True)]
    return Result(
        library=library,
        codec=codec,
        bytes_per_element=msg.ByteSize() / x.numel(),
        encode_gbps=raw_gb / min(enc_times),
        decode_gbps=raw_gb / min(dec_times),
        roundtrip_gbps=raw_gb / min(roundtrips),
        roundtrip_gbps_median=raw_gb / statistics.median(roundtrips),
        rel_error=float((y.float() - x).norm() / x.norm()),
    )


def bench_swarm(x: torch.Tensor, repeats: int, block_size: int) -> list[Result]:
    results = []
    for codec in ("none", "fp16", "bf16", "int8"):
        encode = functools.partial(encode_tensor, codec=codec, block_size=block_size)
        result = measure("swarm", codec, x, encode, decode_tensor, repeats)
        if result.error is None:  # bytes on the wire as the metrics count them
            result.bytes_per_element = (
                encoded_nbytes(encode_tensor(x, codec, block_size=block_size)) / x.numel()
            )
        results.append(result)
    return results


def bench_hivemind(x: torch.Tensor, repeats: int) -> list[Result]:
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    results = []
    for name in HIVEMIND_CODECS:
        ctype = runtime_pb2.CompressionType.Value(name)
        encode = functools.partial(serialize_torch_tensor, compression_type=ctype)
        results.append(measure("hivemind", name, x, encode, deserialize_torch_tensor, repeats))
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    header = (
        f"{'library':9} {'codec':15} {'B/elem':>7} {'enc GB/s':>9} {'dec GB/s':>9} {'rt GB/s':>8} "
        f"{'rel err':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error is not None:
            print(f"{r.library:9} {r.codec:15} failed: {r.error}")
            continue
        print(
            f"{r.library:9} {r.codec:15} {_fmt(r.bytes_per_element, '7.3f')} {_fmt(r.encode_gbps, '9.2f')} "
            f"{_fmt(r.decode_gbps, '9.2f')} {_fmt(r.roundtrip_gbps, '8.2f')} {_fmt(r.rel_error, '9.2e')}"
        )


def ratios(results: list[Result]) -> dict[str, float | None]:
    by_key = {(r.library, r.codec): r for r in results}
    ours, theirs = by_key[("swarm", "int8")], by_key[("hivemind", "FLOAT16")]
    bytes_ratio = 4.0 / ours.bytes_per_element if ours.bytes_per_element else None
    speed_ratio = (
        ours.roundtrip_gbps / theirs.roundtrip_gbps if ours.roundtrip_gbps and theirs.roundtrip_gbps else None
    )
    return {"int8_bytes_ratio_vs_fp32": bytes_ratio, "int8_speed_ratio_vs_hivemind_fp16": speed_ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements of the float32 tensor (16M)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per codec (best reported)")
    parser.add_argument("--block-size", type=int, default=64, help="int8 elements per absmax block")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target ratio is missed")
    args = parser.parse_args(argv)

    x = activation_like(args.numel)
    print(
        f"tensor: {args.numel} float32 ({args.numel * 4 / 2**20:.0f} MiB), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"best of {args.repeats} runs\n"
    )
    results = bench_swarm(x, args.repeats, args.block_size) + bench_hivemind(x, args.repeats)
    print_table(results)
    r = ratios(results)
    bytes_ratio, speed_ratio = r["int8_bytes_ratio_vs_fp32"], r["int8_speed_ratio_vs_hivemind_fp16"]
    print()
    print(f"int8 bytes vs fp32: {_fmt(bytes_ratio, '.2f')}x fewer (target >= {BYTES_RATIO_TARGET}x)")
    print(f"int8 speed vs hivemind fp16: {_fmt(speed_ratio, '.1f')}x (target >= {SPEED_RATIO_TARGET:g}x)")
    met = (bytes_ratio or 0) >= BYTES_RATIO_TARGET and (speed_ratio or 0) >= SPEED_RATIO_TARGET
    if args.json is not None:
        report = {
            "numel": args.numel,
            "repeats": args.repeats,
            "block_size": args.block_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": [asdict(res) for res in results],
            "ratios": r,
            "targets": {"bytes": BYTES_RATIO_TARGET, "speed": SPEED_RATIO_TARGET, "met": met},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
