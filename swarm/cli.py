"""`swarm`: the user's command line.

    swarm generate --model PATH_OR_ID --initial-peers MADDR --prompt-ids 1 2 3 [--max-new-tokens N]
    swarm generate --model PATH_OR_ID --initial-peers MADDR --prompt "text"   (needs tokenizer.json)
    swarm generate ... --adapter DIR   (a peft LoRA adapter, applied on the remote blocks)
    swarm generate ... --speculative {off,lookup,model} [--draft-model DIR] [--draft-tokens K]
    swarm generate ... --no-push   (the client relays every hop's output; default: nodes push it on)

Tokens are printed as they are generated.

    swarm train --model CONFIG_OR_CHECKPOINT --initial-peers MADDR [--steps N] [--data PATH]
    swarm export --model CONFIG_OR_CHECKPOINT --initial-peers MADDR --checkpoint-dir DIR --out DIR

    swarm serve --model PATH_OR_ID --initial-peers MADDR [--host 127.0.0.1] [--port 8000] [--ready-file PATH]
    swarm monitor --initial-peers MADDR [--model PATH_OR_ID...] [--port 8001]   (status page, all models)
    swarm chat --model PATH_OR_ID --initial-peers MADDR
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarm.cli_args import add_config_arguments, config_from_args
from swarm.errors import ConfigError, SwarmError
from swarm.serve.chat import ChatConfig
from swarm.serve.config import MonitorConfig, ServeConfig


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
    verify_rate: float = field(
        default=0.05,  # ClientConfig.verify_rate (not imported here: it pulls in torch)
        metadata={
            "help": "spot checks: chance that a trusted server's answer is re-run on another server (0: off)"
        },
    )
    speculative: Literal["off", "lookup", "model"] = field(
        default="off",
        metadata={
            "help": "draft tokens locally and verify them in one round trip: from n-grams of the text "
            "(lookup) or with --draft-model (model); same tokens as without"
        },
    )
    draft_model: str | None = field(
        default=None,
        metadata={
            "help": "checkpoint of a small model with the same tokenizer (--speculative model)",
            "metavar": "DIR",
        },
    )
    push: bool = field(
        default=True,  # ClientConfig.push
        metadata={
            "help": "nodes send their outputs straight to the next node of the route (--no-push: "
            "the client relays every hop's output)"
        },
    )
    draft_tokens: int = field(
        default=8,  # swarm.speculative.DEFAULT_DRAFT_TOKENS (that module imports torch: not at start-up)
        metadata={"help": "most drafted tokens verified per round trip"},
    )

    def __post_init__(self) -> None:
        if not 0 <= self.verify_rate <= 1:
            raise ConfigError(f"--verify-rate must be in [0, 1] (0: no spot checks), got {self.verify_rate}")
        if bool(self.prompt_ids) == (self.prompt is not None):
            raise ConfigError("give exactly one of --prompt-ids or --prompt")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        from swarm.speculative import SpeculativeConfig

        # checked here, before any swarm is contacted
        SpeculativeConfig(self.speculative, self.draft_model, draft_tokens=self.draft_tokens)


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

    from swarm.client.config import ClientConfig
    from swarm.client.model import DistributedModelForCausalLM

    tokenizer = _tokenizer(cfg.model) if cfg.prompt is not None else None
    ids = tokenizer.encode(cfg.prompt).ids if tokenizer is not None else list(cfg.prompt_ids)
    input_ids = torch.tensor([ids], dtype=torch.long)

    def show(token: torch.Tensor) -> None:
        t = int(token[0])
        print(tokenizer.decode([t]) if tokenizer is not None else t, end="" if tokenizer else " ", flush=True)

    client_config = ClientConfig(verify_rate=cfg.verify_rate, push=cfg.push)
    with DistributedModelForCausalLM.from_pretrained(
        cfg.model, cfg.initial_peers, client_config=client_config
    ) as model:
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
            speculative=cfg.speculative,
            draft_model=cfg.draft_model,
            draft_tokens=cfg.draft_tokens,
        )
        stats = model.last_speculation
    print(flush=True)
    if cfg.speculative != "off" and stats is not None:
        print(f"speculative ({cfg.speculative}): {stats}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class TrainCommand:
    model: str = field(metadata={"help": "the training nodes' --model: config.json or checkpoint dir"})
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    steps: int = field(default=100, metadata={"help": "optimizer steps to train for"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    in_flight: int = field(default=4, metadata={"help": "micro-batches in the swarm at once"})
    target_batch_size: int = field(
        default=256, metadata={"help": "samples per optimizer step, swarm-wide (as the nodes')"}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of embeddings and head"})
    warmup_steps: int = field(default=10, metadata={"help": "steps of learning-rate warm-up"})
    seq_len: int = field(default=256, metadata={"help": "bytes per training sequence"})
    data: str | None = field(
        default=None, metadata={"help": "text file or directory (default: the Python standard library)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initial weights and data order (as the nodes')"})
    shard: tuple[int, ...] = field(
        default=(0, 1),
        metadata={
            "help": "K N: with N trainers, this one (K = 0..N-1) reads every N-th sequence",
            "metavar": "K",
        },
    )
    codec: str = field(
        default="bf16",
        metadata={
            "help": "activations and gradients on the wire (int8: half of bf16's bytes, learns less evenly)"
        },
    )
    wiring: str = field(default="random", metadata={"help": "random (SWARM) or fixed pipeline"})
    checkpoint_dir: str = field(
        default="swarm-train", metadata={"help": "save (and resume from) trainer.pt here", "metavar": "DIR"}
    )
    checkpoint_every: int = field(default=10, metadata={"help": "steps between checkpoints"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop after this many seconds"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (as the nodes')"})
    request_timeout: float = field(
        default=60.0, metadata={"help": "seconds one Forward/Backward may take before another peer is tried"}
    )
    averaging_timeout: float = field(
        default=10.0, metadata={"help": "seconds one averaging call between trainers may take"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address this trainer's DHT peer listens on"})
    tls: bool = field(
        default=True,
        metadata={"help": "serve this trainer's averaging over TLS, pinned by its signed DHT entry"},
    )


def train(cmd: TrainCommand) -> int:
    if len(cmd.shard) != 2:
        raise ConfigError(f"--shard takes two numbers, K and N, got {list(cmd.shard)}")
    shard = (cmd.shard[0], cmd.shard[1])
    from swarm.dht import start_dht
    from swarm.records import NodeIdentity
    from swarm.training.data import DataConfig
    from swarm.training.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(
        model=cmd.model,
        steps=cmd.steps,
        micro_batch_size=cmd.micro_batch_size,
        in_flight=cmd.in_flight,
        target_batch_size=cmd.target_batch_size,
        lr=cmd.lr,
        warmup_steps=cmd.warmup_steps,
        seed=cmd.seed,
        codec=cmd.codec,
        wiring=cmd.wiring,  # type: ignore[arg-type]  # checked by TrainerConfig
        checkpoint_dir=Path(cmd.checkpoint_dir),
        checkpoint_every=cmd.checkpoint_every,
        max_seconds=cmd.max_seconds,
        weight_decay=cmd.weight_decay,
        request_timeout=cmd.request_timeout,
        averaging_timeout=cmd.averaging_timeout,
        tls=cmd.tls,
        data=DataConfig(data=Path(cmd.data) if cmd.data else None, seq_len=cmd.seq_len + 1, shard=shard),
    )
    identity = NodeIdentity.generate()
    dht = start_dht(initial_peers=cmd.initial_peers, host=cmd.host, identity=identity)
    trainer = Trainer(cfg, dht, identity)
    stops = 0

    def stop(signum: int, _frame: object) -> None:
        """First SIGINT/SIGTERM: finish the micro-batches in flight, save, report. Second: now."""
        nonlocal stops
        stops += 1
        if stops > 1:
            raise KeyboardInterrupt
        print("\nswarm: stopping: finishing the micro-batches in flight (again to stop at once)", flush=True)
        trainer.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        progress = trainer.train(ProgressLine(cfg.steps))
    finally:
        trainer.shutdown()
        dht.shutdown()
    first = progress.losses[0][2] if progress.losses else float("nan")
    print(
        f"train: loss {first:.3f} -> {progress.recent_loss():.3f} in {progress.step} steps, "
        f"{progress.completed} micro-batches ({progress.resent} re-sent), "
        f"{progress.samples_per_second:.1f} samples/s, issued {progress.issued}",
        flush=True,
    )
    return 0


class ProgressLine:
    """One status line: redrawn in place on a terminal, printed every 5 s otherwise."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        import time

        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        done = min(1.0, p.step / self.steps)
        bar = "#" * int(done * 20)
        peers = " ".join(f"s{k}:{n}" for k, n in p.peers.items())
        line = (
            f"[{bar:<20}] step {p.step}/{self.steps}  loss {p.recent_loss():.3f}  "
            f"{p.samples_per_second:.1f} samples/s  peers {peers}  re-sent {p.resent}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)


@dataclass(frozen=True)
class ExportCommand:
    model: str = field(metadata={"help": "the training nodes' --model: config.json or checkpoint dir"})
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    out: str = field(metadata={"help": "directory to write the transformers checkpoint to", "metavar": "DIR"})
    checkpoint_dir: str = field(
        default="swarm-train",
        metadata={"help": "the trainer's --checkpoint-dir (embeddings and head)", "metavar": "DIR"},
    )
    timeout: float = field(default=60.0, metadata={"help": "seconds for one stage's weights to arrive"})

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout}")


def export(cmd: ExportCommand) -> int:
    from swarm.dht import start_dht
    from swarm.training.export import export_model

    dht = start_dht(initial_peers=cmd.initial_peers, client_mode=True)
    try:
        result = export_model(dht, cmd.model, Path(cmd.checkpoint_dir), Path(cmd.out), timeout=cmd.timeout)
    finally:
        dht.shutdown()
    epochs = " ".join(f"s{k}:{e}" for k, e in result.epochs.items())
    print(
        f"export: {result.num_blocks} blocks from {len(result.epochs)} stages "
        f"(epochs {epochs}, trainer step {result.trainer_step}) -> {result.path}",
        flush=True,
    )
    return 0


def _serve(cfg: ServeConfig) -> int:
    from swarm.serve.commands import serve

    return serve(cfg)


def _monitor(cfg: MonitorConfig) -> int:
    from swarm.serve.commands import monitor

    return monitor(cfg)


def _chat(cfg: ChatConfig) -> int:
    from swarm.serve.chat import chat

    return chat(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm", description="Use a model served by a Swarm.")
    commands = parser.add_subparsers(dest="command", required=True)
    # name -> (help, config class, function); each command's flags come from its config class
    table: dict[str, tuple[str, type, Any]] = {
        "generate": ("generate text through the swarm", GenerateConfig, generate),
        "train": ("train a model on the swarm's training nodes (SWARM)", TrainCommand, train),
        "export": (
            "write the model trained on the swarm as a transformers checkpoint",
            ExportCommand,
            export,
        ),
        "serve": ("serve an OpenAI-compatible API and a status page over the swarm", ServeConfig, _serve),
        "monitor": ("serve the swarm's live status page, /api/status and /metrics", MonitorConfig, _monitor),
        "chat": ("chat with a model of the swarm in the terminal", ChatConfig, _chat),
    }
    for name, (help_text, cls, _) in table.items():
        add_config_arguments(commands.add_parser(name, help=help_text), cls)
    args = parser.parse_args(argv)
    # SIGTERM ends the command through SystemExit, so `finally` blocks stop what it started (a
    # trainer's DHT and averager processes would otherwise outlive it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    logging.getLogger("swarm.training").setLevel(logging.INFO)  # one line per event: resumed, took state
    _, cls, run = table[args.command]
    try:
        return int(run(config_from_args(cls, args)))
    except SwarmError as e:
        print(f"swarm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # SIGTERM
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
