"""`make demo`: a local swarm generating text, next to the same model run in one process.

Builds a small random-weight Llama checkpoint, starts a DHT peer and two nodes (blocks
0:4 and 4:8), generates greedily through them, and generates the same prompt locally.
Both must give the same tokens. Everything started here is stopped here, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from swarm import checkpoint
from swarm.client.model import DistributedModelForCausalLM
from swarm.generation import SamplingConfig, generate_tokens
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaConfig, LlamaForCausalLM

DEMO_CONFIG = dict(
    model_type="llama",
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    max_position_embeddings=2048,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    sliding_window=None,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_ids=(2,),
)


def build_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight model saved in transformers' format (config.json + safetensors)."""
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG))  # type: ignore[arg-type]
    with torch.no_grad():  # wider weights than the default init: random text that does not loop at once
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    checkpoint.save_checkpoint(model, path)
    return path


def local_tokens_per_s(
    path: Path, input_ids: torch.Tensor, cfg: SamplingConfig
) -> tuple[torch.Tensor, float]:
    model = checkpoint.load_model(checkpoint.open_checkpoint(path))
    caches = model.new_caches(input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens)

    @torch.inference_mode()
    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        return model(ids, start=start, caches=caches)[:, -1]

    started = time.perf_counter()
    out = generate_tokens(step, input_ids, cfg)
    return out, (out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - started)


def swarm_tokens_per_s(
    model: DistributedModelForCausalLM, input_ids: torch.Tensor, cfg: SamplingConfig
) -> tuple[torch.Tensor, float]:
    model.generate(input_ids, max_new_tokens=2)  # warm-up: channels, first-call allocations
    started = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=cfg.max_new_tokens, eos_token_id=list(cfg.eos_token_ids))
    return out, (out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=".demo", help="where the checkpoint and logs go")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    torch.set_num_threads(1)  # the nodes get the other cores; keeps both measurements fair

    print("demo: building a random 8-block Llama checkpoint ...", flush=True)
    path = build_checkpoint(workdir / "model")
    input_ids = torch.tensor([[1, 17, 230, 981, 44, 7, 3051, 12]])
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, eos_token_ids=())  # fixed length for timing

    try:
        with LocalSwarm(workdir / "swarm") as local:
            print("demo: starting a DHT peer and two nodes (blocks 0:4 and 4:8) ...", flush=True)
            local.start_dht()
            for blocks in ("0:4", "4:8"):
                node = local.start_node(path, blocks)
                print(f"demo:   node {node.info['grpc_address']} serves {node.info['span']}", flush=True)
            with DistributedModelForCausalLM.from_pretrained(path, local.initial_peers) as model:
                swarm_out, swarm_tps = swarm_tokens_per_s(model, input_ids, cfg)
    except KeyboardInterrupt:
        print("demo: interrupted; all processes stopped", flush=True)
        return 130

    local_out, local_tps = local_tokens_per_s(path, input_ids, cfg)
    same = torch.equal(swarm_out, local_out)
    new_tokens = swarm_out[0, input_ids.shape[1] :].tolist()
    print(f"demo: generated {len(new_tokens)} tokens: {new_tokens}")
    print(f"demo: swarm and local tokens {'match' if same else 'DIFFER'}")
    print(f"demo: swarm {swarm_tps:.1f} tokens/s, local {local_tps:.1f} tokens/s", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
