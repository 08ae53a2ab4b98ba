"""`swarm chat`: talk to a model of the swarm from a terminal.

The conversation is kept and sent whole (through the model's chat template) each turn; the answer
streams in as it is generated. Ctrl-C stops the current answer (what was said so far stays in the
history), Ctrl-D (or Ctrl-C at the prompt) quits.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import ConfigError, SwarmError
from swarm.serve.text import Detokenizer, TextModel


@dataclass(frozen=True)
class ChatConfig:
    model: str = field(metadata={"help": "checkpoint directory or hub id", "metavar": "PATH_OR_ID"})
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    system: str | None = field(default=None, metadata={"help": "system prompt at the start of the chat"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer, in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"need --temperature >= 0 and 0 < --top-p <= 1, got {self.temperature}, {self.top_p}"
            )


def chat(cfg: ChatConfig) -> int:
    from swarm.client.model import DistributedModelForCausalLM
    from swarm.serve.commands import text_model_for

    text_model = text_model_for(cfg.model)
    if text_model.chat_template is None:
        raise ConfigError(f"{cfg.model} has no chat template (tokenizer_config.json); swarm chat needs one")
    history: list[dict[str, str]] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    # Ctrl-C in the terminal signals the whole process group; the DHT process forked here must
    # not die of it, so it is started ignoring SIGINT (the disposition survives the fork). The chat
    # itself then takes Ctrl-C as KeyboardInterrupt even when it was started ignoring SIGINT (as
    # `cmd &` in a script starts it): stopping an answer is what Ctrl-C is for here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = DistributedModelForCausalLM.from_pretrained(cfg.model, cfg.initial_peers)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with model:
        print(f"swarm chat: {model.model_name} ({model.config.num_hidden_layers} blocks in the swarm). "
              "Ctrl-C stops an answer, Ctrl-D quits.", flush=True)  # fmt: skip
        while True:
            try:
                message = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print(flush=True)
                return 0
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            answer, ids = _answer(model, text_model, history, cfg)
            history.append({"role": "assistant", "content": answer})
            print(f"[{len(ids)} prompt tokens]", flush=True)


def _answer(
    model: Any, text_model: TextModel, history: list[dict[str, str]], cfg: ChatConfig
) -> tuple[str, list[int]]:
    import torch

    ids = text_model.chat_ids(history)
    budget = min(cfg.max_new_tokens, model.config.max_position_embeddings - len(ids))
    if budget < 1:
        print("swarm chat: the conversation fills the model's context; start a new chat", flush=True)
        return "", ids
    detok = Detokenizer(text_model)

    def show(tokens: torch.Tensor) -> None:
        print(detok.add(int(tokens[0])), end="", flush=True)

    print("assistant> ", end="", flush=True)
    try:
        model.generate(
            torch.tensor([ids]),
            budget,
            do_sample=cfg.temperature > 0,
            temperature=cfg.temperature or 1.0,
            top_k=0,
            top_p=cfg.top_p,
            seed=cfg.seed,
            on_tokens=show,
        )
        print(detok.flush(), flush=True)
    except KeyboardInterrupt:
        print(detok.flush() + " [stopped]", flush=True)
    except SwarmError as e:
        print(f"\nswarm chat: this answer failed: {e}", file=sys.stderr, flush=True)
    return detok.text, ids
