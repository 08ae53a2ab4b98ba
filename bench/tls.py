"""What TLS on the data plane costs on loopback: the same swarm with and without it, side by side.

    python bench/tls.py [--new-tokens 64] [--reps 5] [--batch 8 --length 128] [--out bench/results/tls.json]

Two local swarms start together, each a DHT peer and 2 nodes (blocks 0:4 and 4:8) of the demo
model (swarm/demo.py: random 8-block Llama, hidden 512, vocab 4096, float32 on the CPU):
`tls` with the nodes' default (gRPC over TLS, pinned by the hash in the signed records; its
client requires TLS) and `plain` with `--no-tls`. The two are measured alternately, `--reps`
times each, so machine load hits both alike; medians are reported, and their ratio:

(a) generate  greedy tokens/s of DistributedModelForCausalLM.generate (an inference stream per
              hop, one small message per token per hop: TLS's per-message cost);
(a') steps    the same, token by token: one inference session per swarm, stepped alternately
              (a tls step, a plain step, ...) so that load bursts hit both alike; reported as
              1 / median step time (prefill excluded), `--step-sessions` x `--new-tokens` steps each;
(b) forward   tokens/s of a no-grad forward of a training-size batch (`--batch` x `--length`
              tokens: float32 activations of batch x length x 512 x 4 bytes per hop, each way:
              TLS's per-byte cost);
(c) dial      seconds to open a channel to a node and get the first Ping answer (TLS: one
              handshake to take the certificate and check its hash, then gRPC's own);
(d) transport the transport alone, no compute: median round trip of an empty Ping, and bytes/s
              of 4 MiB Pings each way (node.throughput.measure_network, what nodes announce);
(e) stream    a bidirectional stream echoing messages of a decode step's size (2 KiB: one token
              of hidden 512 in float32) and of a prefill's (64 KiB), TLS and plain servers in
              this process, round trips interleaved: the per-message cost of TLS on the
              Inference path without any model compute or other processes.

Within each repetition the order of the two swarms alternates; ratios are tls / plain, and
for (a) and (b) the median of the per-repetition ratios (paired: both ran under the same load)
is reported next to the ratio of the medians. Every generation must give the same tokens in
both swarms (same seed, same weights).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch

from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.demo import build_checkpoint
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.node.throughput import measure_network

PROMPT = [1, 17, 230, 981, 44, 7, 3051, 12]
SPANS = ("0:4", "4:8")
# Announced figures instead of measuring them: faster start, same routing in both swarms.
NODE_ARGS = ["--throughput", "1000", "--network-throughput", "1e9"]
MODES = {"tls": [], "plain": ["--no-tls"]}


def start_swarm(workdir: Path, path: Path, extra: list[str]) -> tuple[LocalSwarm, list[NodeProcess]]:
    local = LocalSwarm(workdir)
    local.start_dht()
    with ThreadPoolExecutor(len(SPANS)) as pool:
        futures = [
            pool.submit(
                local.start_node, path, span, *NODE_ARGS, *extra, name=f"node-{span.replace(':', '-')}"
            )
            for span in SPANS
        ]
        return local, [f.result() for f in futures]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


async def transport(node: NodeProcess, pings: int) -> dict[str, float]:
    """Median empty-Ping round trip (s) and 4 MiB Ping bytes/s to `node`, on a pinned channel."""
    address, pin = node.info["grpc_address"], node.info["tls_cert_sha256"]
    channel = await tls.open_channel(address, pin, timeout=10)
    async with channel:
        stub = swarm_pb2_grpc.BlockServiceStub(channel)
        await stub.Ping(swarm_pb2.PingRequest(), timeout=10)
        rtts = []
        for _ in range(pings):
            began = time.perf_counter()
            await stub.Ping(swarm_pb2.PingRequest(), timeout=10)
            rtts.append(time.perf_counter() - began)
    bps = await measure_network(address, cert_sha256=pin, payload_bytes=4 << 20, rounds=5, timeout=60)
    return {"ping_rtt_s": statistics.median(rtts), "bytes_per_s": bps}


async def stream_echo(rounds: int, sizes: tuple[int, ...] = (2048, 65536)) -> dict[str, dict[str, float]]:
    """Median round trip (s) per message size and mode on an echoing bidi stream, interleaved."""

    async def echo(requests: Any, _context: Any) -> Any:
        async for message in requests:
            yield message

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}
    )
    cert = tls.NodeCertificate.generate("bench")
    servers, calls, channels = [], {}, []
    try:
        for mode in MODES:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((handler,))
            if mode == "tls":
                port = server.add_secure_port("127.0.0.1:0", cert.server_credentials())
            else:
                port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            channel = await tls.open_channel(f"127.0.0.1:{port}", cert.sha256 if mode == "tls" else None)
            channels.append(channel)
            calls[mode] = channel.stream_stream("/bench.Echo/Echo")()
        out: dict[str, dict[str, float]] = {m: {} for m in MODES}
        for size in sizes:
            payload = bytes(size)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for i in range(rounds):
                for mode in list(MODES) if i % 2 == 0 else list(reversed(MODES)):
                    began = time.perf_counter()
                    await calls[mode].write(payload)
                    await calls[mode].read()
                    times[mode].append(time.perf_counter() - began)
            for mode in MODES:
                out[mode][f"{size}_bytes_rtt_s"] = statistics.median(times[mode])
        return out
    finally:
        for call in calls.values():
            call.cancel()
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(grace=None)


async def dial_seconds(node: NodeProcess, rounds: int) -> float:
    """Median seconds to dial `node` as clients do and get a Ping answered on the new channel."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        channel = await tls.open_channel(node.info["grpc_address"], node.info["tls_cert_sha256"], timeout=10)
        async with channel:
            await swarm_pb2_grpc.BlockServiceStub(channel).Ping(swarm_pb2.PingRequest(), timeout=10)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def interleaved_steps(
    clients: dict[str, DistributedModelForCausalLM], prompt: torch.Tensor, new_tokens: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Greedy decoding in every swarm at once, one token each in turn (the order alternating per
    token): seconds of each decode step per mode (the prompt's step not counted), and the tokens."""
    times: dict[str, list[float]] = {m: [] for m in clients}
    with contextlib.ExitStack() as stack:
        sessions = {
            m: stack.enter_context(c.inference_session(max_length=prompt.shape[1] + new_tokens))
            for m, c in clients.items()
        }
        ids = {m: prompt for m in clients}
        out = {m: [prompt] for m in clients}
        for i in range(new_tokens):
            for m in list(clients) if i % 2 == 0 else list(reversed(clients)):
                client = clients[m]
                began = time.perf_counter()
                hidden = run_sync(sessions[m].step(client.parts.embed(ids[m])))
                if i:
                    times[m].append(time.perf_counter() - began)
                ids[m] = client.parts.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
                out[m].append(ids[m])
    return times, {m: torch.cat(t, dim=1) for m, t in out.items()}


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    path = build_checkpoint(workdir / "model")
    prompt = torch.tensor([PROMPT])
    batch = torch.randint(0, 4096, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    swarms: dict[str, LocalSwarm] = {}
    clients: dict[str, DistributedModelForCausalLM] = {}
    nodes: dict[str, list[NodeProcess]] = {}
    results: dict[str, dict[str, list[float]]] = {m: {"generate": [], "forward": []} for m in MODES}
    try:
        for mode, extra in MODES.items():
            swarms[mode], nodes[mode] = start_swarm(workdir / mode, path, extra)
            config = ClientConfig(require_tls=mode == "tls")
            clients[mode] = DistributedModelForCausalLM.from_pretrained(
                path, swarms[mode].initial_peers, client_config=config
            )
        assert all(n.info["tls_cert_sha256"] for n in nodes["tls"]), "a tls node announced no certificate"
        assert not any(n.info["tls_cert_sha256"] for n in nodes["plain"]), "a --no-tls node announced one"
        outputs: dict[str, torch.Tensor] = {}
        for client in clients.values():  # warm-up: channels, allocations
            client.generate(prompt, max_new_tokens=2, eos_token_id=[])
            client.forward(batch)
        print(f"{'rep':>3} {'mode':6} {'generate tok/s':>15} {'forward tok/s':>14}", flush=True)
        for rep in range(args.reps):
            order = list(clients.items()) if rep % 2 == 0 else list(reversed(clients.items()))
            for mode, client in order:
                seconds, out = timed(
                    functools.partial(
                        client.generate, prompt, max_new_tokens=args.new_tokens, eos_token_id=[]
                    )
                )
                if mode in outputs and not torch.equal(out, outputs[mode]):
                    raise AssertionError(f"{mode}: generation {rep} differs from the first")
                outputs[mode] = out
                results[mode]["generate"].append(args.new_tokens / seconds)
                seconds, _ = timed(functools.partial(client.forward, batch))
                results[mode]["forward"].append(batch.numel() / seconds)
                got = results[mode]
                print(
                    f"{rep:>3} {mode:6} {got['generate'][-1]:>15.1f} {got['forward'][-1]:>14.0f}", flush=True
                )
        if not torch.equal(outputs["tls"], outputs["plain"]):
            raise AssertionError("TLS and plaintext swarms generated different tokens")
        steps: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.step_sessions):
            times, tokens = interleaved_steps(clients, prompt, args.new_tokens)
            if not all(torch.equal(t, outputs["plain"]) for t in tokens.values()):
                raise AssertionError("token-by-token decoding differs from generate()")
            for m in MODES:
                steps[m] += times[m]
        step_tps = {m: 1 / statistics.median(steps[m]) for m in MODES}
        print(
            f"decode steps: tls {step_tps['tls']:.1f} tok/s, plain {step_tps['plain']:.1f} tok/s", flush=True
        )
        dial = {mode: asyncio.run(dial_seconds(nodes[mode][0], args.dial_rounds)) for mode in MODES}
        wire = {mode: asyncio.run(transport(nodes[mode][0], args.pings)) for mode in MODES}
        echo = asyncio.run(stream_echo(args.echo_rounds))
    finally:
        for client in clients.values():
            client.shutdown()
        for local in swarms.values():
            local.close()
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
    paired = {
        k: statistics.median(t / p for t, p in zip(results["tls"][k], results["plain"][k], strict=True))
        for k in ("generate", "forward")
    }
    return {
        "model": "demo Llama: 8 blocks, hidden 512, vocab 4096, float32, 2 nodes x 4 blocks, CPU",
        "new_tokens": args.new_tokens,
        "forward_batch": [args.batch, args.length],
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_before": os.getloadavg(),
        "runs": results,
        "median": med,
        "dial_seconds": dial,
        "transport": wire,
        "stream_echo": echo,
        "steps": {m: len(v) for m, v in steps.items()},
        "step_tokens_per_s": step_tps,
        "ratio_steps": step_tps["tls"] / step_tps["plain"],
        "ratio_generate": med["tls"]["generate"] / med["plain"]["generate"],
        "ratio_forward": med["tls"]["forward"] / med["plain"]["forward"],
        "paired_ratio_generate": paired["generate"],
        "paired_ratio_forward": paired["forward"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation")
    parser.add_argument("--reps", type=int, default=7, help="alternating tls/plain repetitions (median)")
    parser.add_argument("--batch", type=int, default=8, help="sequences of the forward batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence of the forward batch")
    parser.add_argument("--dial-rounds", type=int, default=20, help="dials per mode for (c)")
    parser.add_argument("--pings", type=int, default=200, help="empty Pings per mode for (d)")
    parser.add_argument("--echo-rounds", type=int, default=2000, help="round trips per size and mode for (e)")
    parser.add_argument("--step-sessions", type=int, default=3, help="interleaved sessions for (a')")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-tls-") as tmp:
        result = bench(args, Path(tmp))
    result["load_before"] = load
    result["load_after"] = os.getloadavg()
    med, wire, echo = result["median"], result["transport"], result["stream_echo"]
    print(
        f"\ngenerate: tls {med['tls']['generate']:.1f} tok/s, plain {med['plain']['generate']:.1f} tok/s, "
        f"ratio of medians {result['ratio_generate']:.3f}, median paired ratio "
        f"{result['paired_ratio_generate']:.3f}\n"
        f"forward {args.batch}x{args.length}: tls {med['tls']['forward']:.0f} tok/s, "
        f"plain {med['plain']['forward']:.0f} tok/s, ratio of medians {result['ratio_forward']:.3f}, "
        f"median paired ratio {result['paired_ratio_forward']:.3f}\n"
        f"decode steps, interleaved: tls {result['step_tokens_per_s']['tls']:.1f} tok/s, plain "
        f"{result['step_tokens_per_s']['plain']:.1f} tok/s, ratio {result['ratio_steps']:.3f}\n"
        f"dial + first Ping: tls {result['dial_seconds']['tls'] * 1e3:.1f} ms, "
        f"plain {result['dial_seconds']['plain'] * 1e3:.1f} ms\n"
        f"empty Ping round trip: tls {wire['tls']['ping_rtt_s'] * 1e3:.2f} ms, "
        f"plain {wire['plain']['ping_rtt_s'] * 1e3:.2f} ms\n"
        f"4 MiB Pings: tls {wire['tls']['bytes_per_s'] * 8 / 1e9:.2f} Gbit/s, "
        f"plain {wire['plain']['bytes_per_s'] * 8 / 1e9:.2f} Gbit/s\n"
        f"stream echo 2 KiB: tls {echo['tls']['2048_bytes_rtt_s'] * 1e3:.3f} ms, "
        f"plain {echo['plain']['2048_bytes_rtt_s'] * 1e3:.3f} ms; 64 KiB: tls "
        f"{echo['tls']['65536_bytes_rtt_s'] * 1e3:.3f} ms, "
        f"plain {echo['plain']['65536_bytes_rtt_s'] * 1e3:.3f} ms\n"
        f"load average before/after: {load[0]:.2f} / {result['load_after'][0]:.2f}",
        flush=True,
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
