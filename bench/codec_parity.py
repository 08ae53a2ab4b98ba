"""What does the training wire codec alone do to learning? One process, rounding where a swarm sends.

    python bench/codec_parity.py [--steps N] [--seeds 0,1,2] [--codecs bf16,int8] [--workers 2]

For each seed, the demo's model (swarm.demo.TRAIN_CONFIG) is trained in one process with the demo's
settings (batches of 16 in micro-batches of 8, AdamW lr 3e-3, 20 warm-up steps, 400 steps, the
Python standard library's sources), once exactly (`none`) and once per codec with the hidden states
and their gradients rounded where a swarm of 2 stages sends them (swarm.training.local.wire_blocks:
the input of each stage and the last block's output, forward and backward, through the real
swarm.wire encoder and decoder). Everything else is identical, so the difference is the codec's.
Compared: the mean loss of the last 20 micro-batches and the held-out loss (first 256 held-out
sequences, unrounded) of each codec minus the exact run of the same seed.

Runs go to --workers processes of one torch thread each. Writes bench/results/codec_parity.json;
the last line reads

    codec parity: bf16 gap mean G (from A to B), int8 gap mean H (from C to D) over N seeds at S samples
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_one(job: tuple[str, int, int, str]) -> dict[str, Any]:
    """Train one (codec, seed) in this worker; returns its last-20 mean and held-out loss."""
    import torch

    torch.set_num_threads(1)
    from swarm.demo import TRAIN_CONFIG, trainer_config
    from swarm.training.local import train_locally

    codec, seed, steps, folder = job
    config_dir = Path(folder) / "byte-llama"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(TRAIN_CONFIG))
    cfg = trainer_config(config_dir, steps, seed)
    run = train_locally(cfg, evaluate_every=steps, wire_codec=codec, num_stages=2)
    return {
        "codec": codec,
        "seed": seed,
        "samples": run.losses[-1][1],
        "last20": run.recent_loss(20),
        "held_out": run.held_out[-1][1],
        "seconds": round(run.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--codecs", default="bf16,int8")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "codec_parity.json")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    codecs = [c for c in args.codecs.split(",") if c and c != "none"]
    if args.steps < 1 or not seeds or not codecs or args.workers < 1:
        ap.error(
            f"need steps >= 1, seeds, codecs and workers >= 1; got steps {args.steps}, seeds {seeds}, "
            f"codecs {codecs}, workers {args.workers}"
        )
    jobs_done: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="codec-parity-") as folder:
        jobs = [(c, s, args.steps, folder) for s in seeds for c in ("none", *codecs)]
        print(
            f"codec parity: {len(jobs)} runs of {args.steps} steps on {args.workers} workers ...", flush=True
        )
        pool = multiprocessing.get_context("spawn").Pool(args.workers)
        try:
            for r in pool.imap_unordered(run_one, jobs):
                jobs_done.append(r)
                print(
                    f"  {r['codec']:>5} seed {r['seed']}: last-20 {r['last20']:.3f}, held-out "
                    f"{r['held_out']:.3f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
            pool.close()  # let the workers exit on their own (terminate() leaks their semaphores)
        finally:
            if len(jobs_done) < len(jobs):
                pool.terminate()
            pool.join()
    exact = {r["seed"]: r for r in jobs_done if r["codec"] == "none"}
    summary: dict[str, Any] = {"samples": jobs_done[0]["samples"], "seeds": seeds}
    parts = []
    for c in codecs:
        gaps = [r["last20"] - exact[r["seed"]]["last20"] for r in jobs_done if r["codec"] == c]
        held = [r["held_out"] - exact[r["seed"]]["held_out"] for r in jobs_done if r["codec"] == c]
        summary[c] = {"gaps": gaps, "held_out_gaps": held, "gap_mean": sum(gaps) / len(gaps)}
        parts.append(f"{c} gap mean {sum(gaps) / len(gaps):+.3f} (from {min(gaps):+.3f} to {max(gaps):+.3f})")
        print(
            f"codec parity: {c} held-out gaps "
            + ", ".join(f"{g:+.3f}" for g in held)
            + " (seeds "
            + ", ".join(str(s) for s in seeds)
            + ")",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "steps": args.steps,
        "seconds": round(time.monotonic() - began),
        "runs": jobs_done,
        "summary": summary,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"codec parity: {', '.join(parts)} over {len(seeds)} seeds at {summary['samples']} samples",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
