"""Configuration of `swarm-node` commands; the CLI flags are generated from these fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from swarm.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def _help(text: str, **extra: object) -> dict[str, object]:
    return {"help": text, **extra}


def parse_span(text: str) -> tuple[int, int]:
    """'4:8' -> (4, 8), the half-open block range [4, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--blocks must look like START:END (e.g. 0:4), got {text!r}")
    start, end = int(match[1]), int(match[2])
    if start >= end:
        raise ConfigError(f"--blocks START:END needs START < END, got {start}:{end}")
    return start, end


@dataclass(frozen=True)
class DHTPeerConfig:
    """`swarm-node dht`: a bootstrap peer of the control plane, serving no blocks."""

    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=0, metadata=_help("DHT port; 0 picks a free one"))
    initial_peers: tuple[str, ...] = field(default=(), metadata=_help("multiaddrs of known peers"))
    ready_file: str | None = field(default=None, metadata=_help("write the ready line as JSON here"))
    startup_timeout: float = field(default=120.0, metadata=_help("seconds to wait for the DHT daemon"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.startup_timeout <= 0:
            raise ConfigError(f"--startup-timeout must be > 0, got {self.startup_timeout}")


@dataclass(frozen=True)
class NodeConfig:
    """`swarm-node join`: serve blocks of a model to the swarm (chosen automatically unless --blocks)."""

    model: str = field(metadata=_help("checkpoint directory or hub id", metavar="PATH_OR_ID"))
    blocks: str | None = field(
        default=None,
        metadata=_help("serve exactly this half-open block range and never move", metavar="START:END"),
    )
    num_blocks: int | None = field(
        default=None,
        metadata=_help("how many blocks to serve, placed where the swarm needs them; default: what fits"),
    )
    initial_peers: tuple[str, ...] = field(default=(), metadata=_help("multiaddrs of DHT peers to join"))
    host: str = field(default="127.0.0.1", metadata=_help("address the gRPC and DHT servers bind"))
    port: int = field(default=0, metadata=_help("gRPC port; 0 picks a free one"))
    announce_host: str | None = field(
        default=None, metadata=_help("host other peers dial, when it differs from --host (NAT, containers)")
    )
    announce_port: int | None = field(
        default=None, metadata=_help("port other peers dial, when it differs from the bound port")
    )
    check_reachability: bool = field(
        default=True, metadata=_help("ask a peer to dial the announced address back before going online")
    )
    tls: bool = field(
        default=True,
        metadata=_help(
            "serve gRPC over TLS with a fresh certificate whose hash the signed DHT record pins "
            "(--no-tls: plaintext, for benchmarks and older clients)"
        ),
    )
    push: bool = field(
        default=True,
        metadata=_help(
            "inference sessions: take inputs pushed by the previous node and push outputs to the next "
            "(--no-push: behave as a node without push; clients then relay this node's inputs and outputs)"
        ),
    )
    dht_port: int = field(default=0, metadata=_help("DHT port; 0 picks a free one"))
    metrics_port: int | None = field(
        default=None, metadata=_help("serve Prometheus metrics on this port (0 picks a free one)")
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("compute device"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("compute dtype; auto = bfloat16 on GPUs that support it, else float32")
    )
    quant: Literal["none", "int8", "nf4"] = field(
        default="none", metadata=_help("quantize block weights with bitsandbytes (CUDA only)")
    )
    throughput: float | None = field(
        default=None, metadata=_help("announce this many tokens/s through the span instead of measuring")
    )
    network_throughput: float | None = field(
        default=None, metadata=_help("network bytes/s to announce instead of measuring against a peer")
    )
    throughput_cache: str | None = field(
        default=None, metadata=_help("file caching measured compute throughput (default: ~/.cache/swarm)")
    )
    ready_file: str | None = field(default=None, metadata=_help("write the ready line as JSON here"))
    identity_file: str | None = field(
        default=None, metadata=_help("RSA key file, created if missing, so a restarted node owns its records")
    )
    announce_period: float = field(default=30.0, metadata=_help("seconds between DHT announcements"))
    rebalance_period: float = field(
        default=120.0, metadata=_help("mean seconds between checks whether moving to other blocks pays")
    )
    balance_threshold: float = field(
        default=0.15,
        metadata=_help(
            "move only if the weakest blocks gain more than this fraction "
            "(the bottleneck, or their total shortfall)"
        ),
    )
    drain_timeout: float = field(
        default=30.0, metadata=_help("seconds in-flight work may take to finish when stopping or moving")
    )
    max_batch: int = field(default=32, metadata=_help("largest batch a request may carry"))
    max_tokens: int = field(default=8192, metadata=_help("largest batch x length a request may carry"))
    batch_tokens: int = field(
        default=8192, metadata=_help("merge queued forward/backward requests up to this many tokens")
    )
    batching: bool = field(default=True, metadata=_help("merge compatible queued requests into one batch"))
    max_session_length: int = field(
        default=4096, metadata=_help("largest max_length of an inference session")
    )
    max_message_bytes: int = field(default=256 * MiB, metadata=_help("largest gRPC message accepted or sent"))
    cache_bytes: int | None = field(
        default=None,
        metadata=_help("KV-cache budget shared by inference sessions; default: from free memory"),
    )
    client_share: float = field(
        default=0.5,
        metadata=_help(
            "most of the KV-cache budget (beyond its first session) and of the adapter store that one "
            "client connection may hold, so that others get served (0-1; 1 turns the limit off)"
        ),
    )
    adapter_cache_bytes: int = field(
        default=256 * MiB,
        metadata=_help("bytes of client LoRA adapters kept (least recently used dropped first)"),
    )
    # ---- training (--train): this node trains one stage of the model with its peers
    train: bool = field(default=False, metadata=_help("train one stage of the model (SWARM training)"))
    stage: str = field(default="auto", metadata=_help("stage to train: auto (the least served) or its index"))
    num_stages: int = field(default=2, metadata=_help("stages the model is cut into (all peers must agree)"))
    target_batch_size: int = field(
        default=256, metadata=_help("samples the whole stage accumulates per optimizer step")
    )
    lr: float = field(default=1e-3, metadata=_help("AdamW learning rate"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=10, metadata=_help("optimizer steps of linear learning-rate warm-up"))
    matchmaking_time: float = field(
        default=1.0, metadata=_help("ignored: averaging is leader-led (kept for old command lines)")
    )
    averaging_timeout: float = field(
        default=10.0, metadata=_help("seconds one averaging call with a stage-mate may take")
    )
    average_state_every: int = field(
        default=5, metadata=_help("ignored: peers step on the same numbers (kept for old command lines)")
    )
    averaging: Literal["gradients", "diloco"] = field(
        default="gradients",
        metadata=_help(
            "how a stage's peers stay together: gradients (every step on the averaged gradient) or "
            "diloco (each peer steps on its own micro-batches; every --outer-every steps the peers "
            "average their parameter deltas and take an outer Nesterov step); all peers must agree"
        ),
    )
    outer_every: int = field(default=6, metadata=_help("diloco: optimizer steps between outer steps"))
    outer_lr: float = field(default=0.7, metadata=_help("diloco: outer Nesterov learning rate"))
    outer_momentum: float = field(default=0.9, metadata=_help("diloco: outer Nesterov momentum, in [0, 1)"))
    averaging_codec: Literal["none", "int8"] = field(
        default="none",
        metadata=_help(
            "averaging payloads between stage-mates (gradients or deltas): none (float32) or int8 "
            "(blockwise, with error feedback)"
        ),
    )
    seed: int = field(default=0, metadata=_help("seed of the initial weights when training from a config"))
    checkpoint_dir: str | None = field(
        default=None, metadata=_help("save the stage's state here (and resume from it)", metavar="DIR")
    )
    checkpoint_every: int = field(default=10, metadata=_help("optimizer steps between stage checkpoints"))
    slowdown: float = field(
        default=1.0,
        metadata=_help("emulate a slower device for benchmarks: every batch takes this many times as long"),
    )
    corrupt_rate: float = field(
        default=0.0,
        metadata=_help(
            "fault injection for tests and benchmarks: perturb this fraction of answers (a dishonest node)"
        ),
    )
    session_idle_timeout: float = field(
        default=300.0, metadata=_help("seconds an inference session may wait for its next step")
    )
    startup_timeout: float = field(default=120.0, metadata=_help("seconds to wait for the DHT daemon"))

    def __post_init__(self) -> None:
        if self.blocks is not None:
            parse_span(self.blocks)
            if self.num_blocks is not None:
                raise ConfigError("give either --blocks START:END or --num-blocks N, not both")
        for name in ("port", "dht_port", "announce_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 65535], got {value}")
        positive = [
            *("max_batch", "max_tokens", "max_session_length", "max_message_bytes", "batch_tokens"),
            *(
                "announce_period",
                "rebalance_period",
                "drain_timeout",
                "session_idle_timeout",
                "startup_timeout",
            ),
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.stage != "auto" and not self.stage.isdigit():
            raise ConfigError(f"--stage must be 'auto' or a stage index, got {self.stage!r}")
        for name in (
            *("num_stages", "target_batch_size", "lr", "matchmaking_time", "averaging_timeout"),
            *("average_state_every", "checkpoint_every", "outer_every", "outer_lr"),
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.client_share <= 1:
            raise ConfigError(f"--client-share must be in (0, 1], got {self.client_share}")
        if self.adapter_cache_bytes < 0:
            raise ConfigError(f"--adapter-cache-bytes must be >= 0, got {self.adapter_cache_bytes}")
        for name in ("num_blocks", "cache_bytes", "throughput", "network_throughput"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"--outer-momentum must be in [0, 1), got {self.outer_momentum}")
        if self.slowdown < 1:
            raise ConfigError(f"--slowdown must be >= 1, got {self.slowdown}")
        if not 0 <= self.corrupt_rate <= 1:
            raise ConfigError(f"--corrupt-rate must be in [0, 1], got {self.corrupt_rate}")
        if self.balance_threshold < 0:
            raise ConfigError(f"--balance-threshold must be >= 0, got {self.balance_threshold}")

    @property
    def span(self) -> tuple[int, int] | None:
        """The fixed span of --blocks, or None when the node chooses (and may move)."""
        return parse_span(self.blocks) if self.blocks is not None else None
