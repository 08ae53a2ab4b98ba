"""bench/inference.py's case (d) with speculative decoding: tokens/s of off / lookup / model against
the one-token-per-round-trip bound, over the same emulated WAN link (bench/wan_proxy.py: 25 ms one
way per direction in front of each of the 2 nodes).

Two texts:

random      the demo model (random weights) from the benchmark's 8-token prompt: its greedy text
            does not repeat itself, so drafts are rarely right; speculation must not cost
            (target: >= 0.95 x off).
repetitive  the prompt holds a passage and then the passage's first 32 tokens again, and greedy
            decoding goes on copying the passage: what an LLM does when it quotes, edits code or
            fills a template. A random model only copies when it cannot see the difference: this
            one is the demo model as Mistral with a 4-token sliding window (8 blocks: each token
            sees the last 25, RoPE is relative), and the passage is its own greedy text from the
            8-token prompt. Target: lookup >= 1.5 x the bound.

The draft model of `--speculative model` is the verifier's first 2 blocks with its embeddings and
head (a layer-skip draft: same vocabulary, a quarter of the compute). Every run's tokens are
checked against the local model's greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from swarm import checkpoint
from swarm.client.model import DistributedModelForCausalLM
from swarm.demo import DEMO_CONFIG
from swarm.generation import SamplingConfig, generate_tokens
from swarm.models.llama import LlamaConfig, LlamaForCausalLM

# (path, workdir) -> a client of 2 nodes serving `path` behind WAN proxies (bench/inference.py)
ClientFactory = Callable[[Path, Path], AbstractContextManager[DistributedModelForCausalLM]]

WINDOW = 4  # the repetitive text's model: Mistral-style sliding window
COPIED = 32  # tokens of the passage repeated at the end of the prompt (> the 25 a token sees)
DRAFT_BLOCKS = 2
MODES = ("off", "lookup", "model")
REPEAT_TARGET = 1.5  # lookup on repetitive text / bound
RANDOM_TARGET = 0.95  # speculative on random text / off


@dataclass
class SpecRun:
    text: str  # random | repetitive
    mode: str  # off | lookup | model
    rep: int
    tokens: int
    seconds: float  # the whole generate call
    decode_tokens_per_s: float  # tokens after the first, over the time they took
    steps: int  # round trips after the prompt's
    acceptance: float
    match: bool  # same tokens as the local model's greedy decoding


def build_windowed(path: Path, seed: int = 0) -> Path:
    """The demo model's shape and init (swarm.demo.build_checkpoint), as Mistral with a sliding window."""
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(**{**DEMO_CONFIG, "model_type": "mistral", "sliding_window": WINDOW})  # type: ignore[arg-type]
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    checkpoint.save_checkpoint(model, path)
    return path


def build_draft(target: Path, path: Path) -> Path:
    """The target's first DRAFT_BLOCKS blocks with its embeddings, final norm and head."""
    if (path / "config.json").exists():
        return path
    full = checkpoint.load_model(checkpoint.open_checkpoint(target))
    draft = LlamaForCausalLM(replace(full.config, num_hidden_layers=DRAFT_BLOCKS))
    state = {
        k: v
        for k, v in full.state_dict().items()
        if not k.startswith("blocks.") or int(k.split(".")[1]) < DRAFT_BLOCKS
    }
    draft.load_state_dict(state)
    checkpoint.save_checkpoint(draft, path)
    return path


def local_greedy(model: LlamaForCausalLM, input_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the per-token compute time (decode steps after the first)."""
    caches = model.new_caches(1, input_ids.shape[1] + n)
    stamps: list[float] = []
    with torch.inference_mode():
        out = generate_tokens(
            lambda ids, start: model(ids, start, caches)[:, -1],
            input_ids,
            SamplingConfig(max_new_tokens=n, eos_token_ids=()),
            lambda _: stamps.append(time.perf_counter()),
        )
    return out, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def timed(
    client: DistributedModelForCausalLM,
    input_ids: torch.Tensor,
    n: int,
    mode: str,
    draft: Path,
    expected: torch.Tensor,
    text: str,
    rep: int,
) -> SpecRun:
    stamps: list[float] = []
    started = time.perf_counter()
    out = client.generate(
        input_ids,
        max_new_tokens=n,
        eos_token_id=[],
        on_tokens=lambda _: stamps.append(time.perf_counter()),
        speculative=mode,  # type: ignore[arg-type]
        draft_model=draft if mode == "model" else None,
    )
    seconds = time.perf_counter() - started
    stats = client.last_speculation if mode != "off" else None
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    steps = stats.steps if stats is not None else n - 1
    acceptance = stats.acceptance if stats is not None else 0.0
    return SpecRun(text, mode, rep, n, seconds, decode, steps, acceptance, torch.equal(out, expected))


def bench_text(
    args: argparse.Namespace,
    workdir: Path,
    text: str,
    path: Path,
    input_ids: torch.Tensor,
    wan_client: ClientFactory,
) -> tuple[list[SpecRun], float]:
    """Every mode on one text, alternating, `args.spec_reps` times; returns the runs and compute_s."""
    model = checkpoint.load_model(checkpoint.open_checkpoint(path))
    n = args.new_tokens
    local_greedy(model, input_ids, 4)  # warm-up
    expected, compute_s = local_greedy(model, input_ids, n)
    # Under load torch's default threads can collapse (docs/benchmarks.md): the bound takes the
    # faster of default threads and one thread, so a slow baseline cannot inflate the ratio.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_s = min(compute_s, local_greedy(model, input_ids, 16)[1])
    finally:
        torch.set_num_threads(threads)
    draft = build_draft(path, workdir / f"{text}-draft")
    del model
    runs: list[SpecRun] = []
    with wan_client(path, workdir / f"{text}-swarm") as client:
        client.generate(input_ids[:, :4], max_new_tokens=2, eos_token_id=[])  # warm-up
        for rep in range(args.spec_reps):
            for mode in MODES[rep % 3 :] + MODES[: rep % 3]:  # rotated: no mode always runs first
                runs.append(timed(client, input_ids, n, mode, draft, expected, text, rep))
                print_run(runs[-1])
    return runs, compute_s


def print_run(r: SpecRun) -> None:
    acc = f"{100 * r.acceptance:5.0f}%" if r.mode != "off" else "     -"
    print(
        f"wan-spec {r.text:10} {r.mode:6} {r.rep:>3} {r.seconds:>7.2f} s {r.decode_tokens_per_s:>7.2f} tok/s "
        f"{r.steps:>4} steps  acceptance {acc}  match {'yes' if r.match else 'NO'}",
        flush=True,
    )


def repetitive_prompt(path: Path, prompt: list[int], n: int) -> torch.Tensor:
    """The windowed model's greedy passage from `prompt`, then its first COPIED generated tokens again."""
    model = checkpoint.load_model(checkpoint.open_checkpoint(path))
    passage, _ = local_greedy(model, torch.tensor([prompt]), COPIED + n)
    start = len(prompt)
    return torch.cat([passage, passage[:, start : start + COPIED]], dim=1)


def bench_speculative(
    args: argparse.Namespace,
    workdir: Path,
    demo_path: Path,
    prompt: list[int],
    rtt_s: float,
    hops: int,
    wan_client: ClientFactory,
) -> dict[str, Any]:
    """Both texts, every mode; prints the runs and a summary line, returns the summary."""
    windowed = build_windowed(workdir / "model-windowed")
    texts = {
        "random": (demo_path, torch.tensor([prompt])),
        "repetitive": (windowed, repetitive_prompt(windowed, prompt, args.new_tokens)),
    }
    summary: dict[str, Any] = {"rtt_s": rtt_s, "hops": hops, "draft_blocks": DRAFT_BLOCKS, "texts": {}}
    all_runs: list[SpecRun] = []
    for text, (path, input_ids) in texts.items():
        runs, compute_s = bench_text(args, workdir, text, path, input_ids, wan_client)
        all_runs += runs
        bound = 1 / (hops * rtt_s + compute_s)
        tps = {m: statistics.median(r.decode_tokens_per_s for r in runs if r.mode == m) for m in MODES}
        acc = {m: statistics.median(r.acceptance for r in runs if r.mode == m) for m in MODES[1:]}
        summary["texts"][text] = {
            "prompt_tokens": input_ids.shape[1],
            "compute_s": compute_s,
            "bound_tokens_per_s": bound,
            "tokens_per_s": tps,
            "acceptance": acc,
            "over_bound": {m: tps[m] / bound for m in MODES},
            # against 1 / (hops x RTT), the bound with zero compute: immune to a load-inflated compute_s
            "over_rtt_bound": {m: tps[m] * hops * rtt_s for m in MODES},
            "over_off": {m: tps[m] / tps["off"] for m in MODES[1:]},
        }
    summary["all_match"] = all(r.match for r in all_runs)
    summary["runs"] = [asdict(r) for r in all_runs]
    rep, rnd = summary["texts"]["repetitive"], summary["texts"]["random"]
    summary["met"] = {
        "repetitive_lookup_over_bound": rep["over_bound"]["lookup"] >= REPEAT_TARGET,
        "random_over_off": min(rnd["over_off"].values()) >= RANDOM_TARGET,
    }
    for text, s in summary["texts"].items():
        print(
            f"(d) speculative, {text} text: bound {s['bound_tokens_per_s']:.2f} tok/s "
            f"(1/({hops} x {rtt_s * 1000:.0f} ms + {s['compute_s'] * 1000:.1f} ms)); "
            + ", ".join(
                f"{m} {s['tokens_per_s'][m]:.2f} tok/s ({s['over_bound'][m]:.2f}x bound"
                + (
                    f", {s['over_off'][m]:.2f}x off, acceptance {100 * s['acceptance'][m]:.0f}%)"
                    if m != "off"
                    else ")"
                )
                for m in MODES
            )
        )
    lookup, acceptance = rep["over_bound"]["lookup"], 100 * rep["acceptance"]["lookup"]
    print(
        f"speculative: repetitive lookup {lookup:.2f}x bound (target >= {REPEAT_TARGET}; "
        f"{rep['over_rtt_bound']['lookup']:.2f}x the zero-compute bound), "
        f"acceptance {acceptance:.0f}%; random lookup {rnd['over_off']['lookup']:.2f}x off, "
        f"model {rnd['over_off']['model']:.2f}x off (target >= {RANDOM_TARGET}); "
        f"tokens identical to greedy: {'yes' if summary['all_match'] else 'NO'}",
        flush=True,
    )
    return summary
