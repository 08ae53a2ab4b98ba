"""Benchmark the node's dynamic batching: Forward throughput with batching on vs off, same run.

    python bench/node.py [--clients 8] [--seconds S] [--rounds R] [--out bench/results/node.json]

Two BlockServicers serve the same blocks (one BlockBackend with batching, one without) on
127.0.0.1 over real gRPC, in one asyncio loop. `--clients` concurrent clients, each on its own
channel, send Forward requests of batch 1 x `--length` tokens back to back. Rounds alternate
on/off (on, off, on, off, ...) so that load from other processes on a shared machine hits both
modes alike; each mode reports the median of its rounds, the ratio is median(on) / median(off),
and the median ratio of adjacent on/off rounds is reported too. A round's throughput is the
tokens of all requests it completed over the time until its last request returned.

Default model: a random Llama, hidden 1024, intermediate 2816, 16 heads, 4 blocks, float32.
Every client sends the same length, as a training micro-batch of a fixed sequence length
would; requests of different lengths are never merged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node.backend import BlockBackend
from swarm.node.device import resolve_device
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server

MODEL = "bench-llama"
MAX_MESSAGE_BYTES = 64 << 20


@dataclass
class Round:
    mode: str  # "on" | "off"
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    mean_batch: float  # requests per compute run
    p50_latency_ms: float


@dataclass
class Node:
    """One serving node of the benchmark: its backend, gRPC server and batch log."""

    mode: str
    backend: BlockBackend
    server: grpc.aio.Server
    address: str
    batches: list[int]  # requests per compute run, appended by the worker thread


def make_config(hidden: int, blocks: int) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,  # Llama's ~2.7x
            "num_hidden_layers": blocks,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
        }
    )


async def start_node(mode: str, config: LlamaConfig, blocks: list[LlamaBlock], device: torch.device) -> Node:
    batches: list[int] = []
    backend = BlockBackend(
        config,
        blocks,
        0,
        dtype=torch.float32,
        device=device,
        cache_bytes=0,
        batching=mode == "on",
        on_batch=lambda kind, n, tokens, wait: batches.append(n),
    )
    limits = ServerLimits(
        max_batch=64,
        max_tokens=1 << 16,
        max_session_length=1,
        max_message_bytes=MAX_MESSAGE_BYTES,
        session_idle_timeout=60,
    )
    servicer = BlockServicer(backend, MODEL, f"bench-{mode}", limits)
    servicer.state = "online"
    server, port, _ = await start_grpc_server(servicer, "127.0.0.1", 0, MAX_MESSAGE_BYTES)
    return Node(mode, backend, server, f"127.0.0.1:{port}", batches)


async def client(
    address: str, request: swarm_pb2.ForwardRequest, until: float, latencies: list[float]
) -> None:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = swarm_pb2_grpc.BlockServiceStub(channel)
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            await stub.Forward(request, timeout=120)
            latencies.append(time.perf_counter() - t0)


async def run_round(node: Node, request: swarm_pb2.ForwardRequest, clients: int, seconds: float) -> Round:
    tokens_per_request = request.hidden_states.shape[0] * request.hidden_states.shape[1]
    latencies: list[float] = []
    batches_before = len(node.batches)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(node.address, request, t0 + seconds, latencies) for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    batches = node.batches[batches_before:]
    return Round(
        mode=node.mode,
        requests=len(latencies),
        tokens=len(latencies) * tokens_per_request,
        seconds=elapsed,
        tokens_per_s=len(latencies) * tokens_per_request / elapsed,
        mean_batch=sum(batches) / max(len(batches), 1),
        p50_latency_ms=statistics.median(latencies) * 1e3,
    )


def forward_request(config: LlamaConfig, length: int) -> swarm_pb2.ForwardRequest:
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION,
        model=MODEL,
        span=swarm_pb2.Span(start=0, end=config.num_hidden_layers),
    )
    hidden = torch.randn(1, length, config.hidden_size, generator=torch.Generator().manual_seed(0))
    return swarm_pb2.ForwardRequest(header=header, hidden_states=wire.encode_tensor(hidden))


async def bench(args: argparse.Namespace) -> tuple[list[Round], dict[str, Any]]:
    device = resolve_device(args.device)
    config = make_config(args.hidden, args.blocks)
    torch.manual_seed(0)
    # Both nodes share one set of weights: only one is loaded at a time.
    blocks = [LlamaBlock(config).to(device) for _ in range(args.blocks)]
    nodes = [await start_node(mode, config, blocks, device) for mode in ("on", "off")]
    request = forward_request(config, args.length)
    rounds: list[Round] = []
    try:
        for node in nodes:  # warm-up: first-call costs, connection setup
            await run_round(node, request, args.clients, args.warmup)
        for i in range(args.rounds * 2):
            result = await run_round(nodes[i % 2], request, args.clients, args.seconds)
            print_round(len(rounds) + 1, result)
            rounds.append(result)
    finally:
        for node in nodes:
            await node.server.stop(None)
            node.backend.shutdown()
    setup = {
        "hidden": args.hidden,
        "intermediate": config.intermediate_size,
        "heads": config.num_attention_heads,
        "blocks": args.blocks,
        "dtype": "float32",
        "device": str(device),
        "request": f"batch 1 x {args.length} tokens",
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds_per_mode": args.rounds,
        "batch_tokens": nodes[0].backend.worker.batch_tokens,
    }
    return rounds, setup


def print_round(index: int, r: Round) -> None:
    if index == 1:
        header = (
            f"{'round':>5} {'batching':>8} {'requests':>8} {'tokens/s':>9} {'mean batch':>10} {'p50 ms':>8}"
        )
        print(header)
        print("-" * len(header))
    print(
        f"{index:5d} {r.mode:>8} {r.requests:8d} {r.tokens_per_s:9.1f} {r.mean_batch:10.2f} "
        f"{r.p50_latency_ms:8.1f}",
        flush=True,
    )


def summarize(rounds: list[Round]) -> dict[str, float]:
    on = [r.tokens_per_s for r in rounds if r.mode == "on"]
    off = [r.tokens_per_s for r in rounds if r.mode == "off"]
    # Adjacent rounds share the machine's load of the moment, so their ratio is the steadier figure.
    paired = [a / b for a, b in zip(on, off, strict=True)]
    return {
        "on_tokens_per_s": statistics.median(on),
        "off_tokens_per_s": statistics.median(off),
        "ratio": statistics.median(on) / statistics.median(off),
        "paired_ratio_median": statistics.median(paired),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per mode, alternating")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds per mode first")
    parser.add_argument("--length", type=int, default=32, help="tokens per request (batch 1)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Llama")
    parser.add_argument("--blocks", type=int, default=4, help="blocks served")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    print(
        f"model: hidden {args.hidden}, {args.blocks} blocks, float32 on {args.device}; "
        f"{args.clients} clients x batch 1 x {args.length} tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    rounds, setup = asyncio.run(bench(args))
    summary = summarize(rounds)
    print()
    print(
        f"node: batching on {summary['on_tokens_per_s']:.1f} tokens/s, "
        f"off {summary['off_tokens_per_s']:.1f} tokens/s, ratio {summary['ratio']:.2f}"
    )
    print(f"median ratio of adjacent on/off rounds: {summary['paired_ratio_median']:.2f}")
    if args.out is not None:
        report = {
            "setup": setup,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "rounds": [asdict(r) for r in rounds],
            "summary": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
