"""`swarm`: the user's command line.

    swarm generate --model PATH_OR_ID --initial-peers MADDR --prompt-ids 1 2 3 [--max-new-tokens N]
    swarm generate --model PATH_OR_ID --initial-peers MADDR --prompt "text"   (needs tokenizer.json)
    swarm generate ... --adapter DIR   (a peft LoRA adapter, applied on the remote blocks)

Tokens are printed as they are generated.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.cli_args import add_config_arguments, config_from_args
from swarm.errors import ConfigError, SwarmError


@dataclass(frozen=True)
class GenerateConfig:
    model: str = field(metadata={"help": "checkpoint directory or hub id", "metavar": "PATH_OR_ID"})
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    prompt_ids: tuple[int, ...] = field(default=(), metadata={"help": "prompt as token ids"})
    prompt: str | None = field(
        default=None, metadata={"help": "prompt as text (needs the model's tokenizer.json)"}
    )
    max_new_tokens: int = field(default=20, metadata={"help": "tokens to generate"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    adapter: str | None = field(
        default=None, metadata={"help": "peft LoRA adapter directory to apply", "metavar": "DIR"}
    )

    def __post_init__(self) -> None:
        if bool(self.prompt_ids) == (self.prompt is not None):
            raise ConfigError("give exactly one of --prompt-ids or --prompt")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def _tokenizer(model: str) -> Any:
    path = Path(model) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"--prompt needs a tokenizer, but {path} does not exist; pass --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ConfigError("--prompt needs the `tokenizers` package: pip install tokenizers") from e
    return Tokenizer.from_file(str(path))


def generate(cfg: GenerateConfig) -> int:
    import torch

    from swarm.client.model import DistributedModelForCausalLM

    tokenizer = _tokenizer(cfg.model) if cfg.prompt is not None else None
    ids = tokenizer.encode(cfg.prompt).ids if tokenizer is not None else list(cfg.prompt_ids)
    input_ids = torch.tensor([ids], dtype=torch.long)

    def show(token: torch.Tensor) -> None:
        t = int(token[0])
        print(tokenizer.decode([t]) if tokenizer is not None else t, end="" if tokenizer else " ", flush=True)

    with DistributedModelForCausalLM.from_pretrained(cfg.model, cfg.initial_peers) as model:
        if cfg.adapter is not None:
            model.load_adapter(cfg.adapter)
        model.generate(
            input_ids,
            cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed,
            on_tokens=show,
        )
    print(flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm", description="Use a model served by a Swarm.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_arguments(
        commands.add_parser("generate", help="generate text through the swarm"), GenerateConfig
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return generate(config_from_args(GenerateConfig, args))
    except SwarmError as e:
        print(f"swarm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
