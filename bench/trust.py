"""Spot checks (issue 12): how fast liars are caught, what the checks cost, and that honest servers pass.

    python bench/trust.py [--trials 20000] [--real-trials 10] [--honest-requests 1000] [--reps 3]
                          [--new-tokens 48] [--out bench/results/trust.json]

A local swarm on 127.0.0.1 with the demo-size model (a random 8-block Llama, hidden 512, float32 on
the CPU): blocks 0:4 and 4:8 on two honest nodes each, plus a third honest 4:8 node (a referee).

1. Detection. (a) Simulated: `--trials` liars under the client's real sampling logic
   (coordinator/trust.py, default ClientConfig), each corrupting 10% or 100% of its answers: the
   fraction caught within 50 of its requests and the requests it took. (b) Real: a liar node
   (`--corrupt-rate 0.1` / `1`, announcing itself the fastest so that routes take it) on 4:8; a fresh
   checker per trial runs `forward()` until it convicts the liar: requests to detection, and whether
   within 50. (c) A generation through the 100% liar: its tokens must equal the honest ones.
2. Overhead: tokens/s of greedy generation with default checks vs checks off, honest swarm, two
   clients side by side, alternating `--reps` times; the ratio of medians (target >= 0.9).
3. False positives: `--honest-requests` forward passes (random prompts of 4-24 tokens, four at a
   time so nodes batch them) with every answer checked (verify_rate 1), once on float32 nodes and
   once on bfloat16 nodes; plus checked generations (KV cache vs a fresh recomputation). Honest
   servers flagged: zero expected.

Writes the figures to --out and ends with one line starting `trust:`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from swarm.client.autograd import RemotePipeline
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.verify import SpotChecker
from swarm.coordinator.bans import BanList
from swarm.coordinator.trust import TrustPolicy, requests_to_detection
from swarm.demo import build_checkpoint
from swarm.localswarm import LocalSwarm, NodeProcess

PROMPT = torch.tensor([[11, 230, 17, 900, 45, 3000, 8, 77]])
WITHIN = 50


def simulate(corrupt_rate: float, trials: int, seed: int) -> dict[str, Any]:
    defaults = ClientConfig()
    rng = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(trials):
        policy = TrustPolicy(defaults.verify_rate, defaults.verify_probation)
        found.append(requests_to_detection(corrupt_rate, policy, rng, max_requests=10_000))
    caught = [n for n in found if n is not None]
    return {
        "trials": trials,
        "p_caught_within_50": sum(n <= WITHIN for n in caught) / trials,
        "median_requests": statistics.median(caught) if caught else None,
        "p99_requests": sorted(caught)[int(0.99 * len(caught)) - 1] if caught else None,
        "never_caught": trials - len(caught),
    }


def fresh_checker(model: DistributedModelForCausalLM) -> None:
    """Forget everything the client learnt about servers (a new client, without a new DHT)."""
    model.bans = BanList(model.client_config.ban_base, model.client_config.ban_limit)
    model.checker = SpotChecker(model.pool, model.swarm_map, model.client_config, model.bans, None)


def real_detection(model: DistributedModelForCausalLM, liar: str, trials: int) -> dict[str, Any]:
    """Trials of forward() through a liar until the checker convicts it (at most 200 requests)."""
    found: list[int | None] = []
    for _ in range(trials):
        fresh_checker(model)
        for n in range(1, 201):
            model.forward(PROMPT)
            if liar in model.checker.convicted:
                found.append(n)
                break
        else:
            found.append(None)
    caught = [n for n in found if n is not None]
    return {
        "trials": trials,
        "requests_to_detection": found,
        "p_caught_within_50": sum(n <= WITHIN for n in caught) / trials,
        "median_requests": statistics.median(caught) if caught else None,
    }


def tokens_per_second(model: DistributedModelForCausalLM, n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = model.generate(PROMPT, n)
    return n / (time.perf_counter() - start), out[0, PROMPT.shape[1] :].tolist()


def overhead(
    checked: DistributedModelForCausalLM, off: DistributedModelForCausalLM, n: int, reps: int
) -> dict[str, Any]:
    tokens_per_second(checked, 8)  # warm: connections, first-call costs
    tokens_per_second(off, 8)
    rates: dict[str, list[float]] = {"checked": [], "off": []}
    for rep in range(reps):
        for name, model in (
            (("off", off), ("checked", checked)) if rep % 2 else (("checked", checked), ("off", off))
        ):
            rate, _ = tokens_per_second(model, n)
            rates[name].append(rate)
        print(
            f"rep {rep}: checks on {rates['checked'][-1]:.1f} tokens/s, off {rates['off'][-1]:.1f}",
            flush=True,
        )
    on, no = statistics.median(rates["checked"]), statistics.median(rates["off"])
    # each rep's two runs are back to back: their ratio is less exposed to the machine's load swings
    paired = statistics.median(c / o for c, o in zip(rates["checked"], rates["off"], strict=True))
    return {
        "new_tokens": n,
        "reps": reps,
        "checked_tokens_per_s": on,
        "off_tokens_per_s": no,
        "ratio": on / no,
        "paired_ratio_median": paired,
        "all": rates,
    }


async def _honest_requests(
    model: DistributedModelForCausalLM, pipelines: list[RemotePipeline], count: int, seed: int
) -> None:
    rng = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    async def one(pipeline: RemotePipeline) -> None:
        length = int(torch.randint(4, 25, (), generator=rng))
        x = torch.randn(1, length, hidden, generator=rng)
        await pipeline.forward(x)

    for k in range(count // 4):
        await asyncio.gather(*(one(pipelines[(4 * k + j) % len(pipelines)]) for j in range(4)))


def false_positives(
    model: DistributedModelForCausalLM, count: int, generations: int, seed: int
) -> dict[str, Any]:
    fresh_checker(model)
    started = time.perf_counter()
    # routes drawn by throughput (both servers of each span take part), four requests at a time
    pipelines = [model.remote_pipeline(randomized=True) for _ in range(16)]
    run_sync(_honest_requests(model, pipelines, count, seed))
    for _ in range(generations):
        model.generate(PROMPT, 24)
    checker = model.checker
    return {
        "forward_requests": count // 4 * 4,
        "checked_generations": generations,
        "checks": checker.checks,
        "disagreements": checker.disagreements,
        "flagged": len(checker.convicted),
        "seconds": time.perf_counter() - started,
    }


def start_nodes(local: LocalSwarm, ckpt: Path, *extra: str) -> list[NodeProcess]:
    nodes = [
        local.start_node(ckpt, "0:4", "--throughput", "100", *extra, name=f"a{i}{extra}") for i in range(2)
    ]
    nodes += [
        local.start_node(ckpt, "4:8", "--throughput", "100", *extra, name=f"b{i}{extra}") for i in range(3)
    ]
    return nodes


def only_overhead(args: argparse.Namespace) -> int:
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work / "demo-model")
        with LocalSwarm(work / "swarm") as local:
            local.start_dht()
            start_nodes(local, ckpt)
            peers = local.initial_peers
            with (
                DistributedModelForCausalLM.from_pretrained(ckpt, peers) as checked,
                DistributedModelForCausalLM.from_pretrained(
                    ckpt, peers, client_config=ClientConfig(verify_rate=0.0)
                ) as off,
            ):
                row = overhead(checked, off, args.new_tokens, args.reps)
    row["load_before"], row["load_after"] = load_before, os.getloadavg()
    results["overhead"] = row
    results.setdefault("overhead_runs", []).append({"run": f"--only-overhead --reps {args.reps}", **row})
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"trust: tokens/s checks on/off {row['ratio']:.3f} (medians of {args.reps} reps)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--real-trials", type=int, default=10)
    parser.add_argument("--honest-requests", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench/results/trust.json"))
    parser.add_argument(
        "--only-overhead", action="store_true", help="measure the overhead alone and update it in --out"
    )
    args = parser.parse_args()
    if args.only_overhead:
        return only_overhead(args)
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    results["simulated"] = {f"{q:.0%}": simulate(q, args.trials, seed=i) for i, q in enumerate((0.1, 1.0))}
    print(json.dumps(results["simulated"]), flush=True)
    checked_cfg = ClientConfig()
    off_cfg = ClientConfig(verify_rate=0.0)
    every_cfg = ClientConfig(verify_rate=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work / "demo-model")
        with LocalSwarm(work / "swarm") as local:
            local.start_dht()
            peers = local.initial_peers
            honest = start_nodes(local, ckpt)
            with (
                DistributedModelForCausalLM.from_pretrained(
                    ckpt, peers, client_config=checked_cfg
                ) as checked,
                DistributedModelForCausalLM.from_pretrained(ckpt, peers, client_config=off_cfg) as off,
                DistributedModelForCausalLM.from_pretrained(ckpt, peers, client_config=every_cfg) as every,
            ):
                _, expected = tokens_per_second(off, args.new_tokens)
                results["overhead"] = overhead(checked, off, args.new_tokens, args.reps)
                results["false_positives_float32"] = false_positives(every, args.honest_requests, 10, seed=1)
                print(json.dumps(results["false_positives_float32"]), flush=True)
                results["real"] = {}
                for q in (0.1, 1.0):
                    liar = local.start_node(
                        ckpt, "4:8", "--throughput", "100000", "--corrupt-rate", str(q), name=f"liar-{q}"
                    )
                    liar_id = liar.info["peer_id"]
                    run_sync(checked.swarm_map.get(refresh=True))
                    row = real_detection(checked, liar_id, args.real_trials)
                    fresh_checker(checked)
                    _, got = tokens_per_second(checked, args.new_tokens)
                    row["generation_tokens_equal_honest"] = got == expected
                    row["generation_convicted_liar"] = liar_id in checked.checker.convicted
                    results["real"][f"{q:.0%}"] = row
                    print(json.dumps({f"real {q:.0%}": row}), flush=True)
                    local.stop(liar)
                    run_sync(checked.swarm_map.get(refresh=True))
            for node in honest:
                local.stop(node)
            start_nodes(local, ckpt, "--dtype", "bfloat16")
            with DistributedModelForCausalLM.from_pretrained(ckpt, peers, client_config=every_cfg) as every:
                results["false_positives_bfloat16"] = false_positives(every, args.honest_requests, 10, seed=2)
                print(json.dumps(results["false_positives_bfloat16"]), flush=True)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    sim, real, over = results["simulated"], results["real"], results["overhead"]
    fp = results["false_positives_float32"]["flagged"] + results["false_positives_bfloat16"]["flagged"]
    print(
        f"trust: 10% liar caught within 50 requests p={sim['10%']['p_caught_within_50']:.4f} (simulated, "
        f"{args.trials} trials), {real['10%']['p_caught_within_50']:.2f} real (median "
        f"{real['10%']['median_requests']} requests); 100% liar median {sim['100%']['median_requests']} "
        f"request(s); tokens/s checks on/off {over['ratio']:.3f}; honest servers flagged {fp} over "
        f"{results['false_positives_float32']['forward_requests']} + "
        f"{results['false_positives_bfloat16']['forward_requests']} requests (float32 + bfloat16)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
