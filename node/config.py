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
    """`swarm-node join`: serve blocks [start, end) of a model to the swarm."""

    model: str = field(metadata=_help("checkpoint directory or hub id", metavar="PATH_OR_ID"))
    blocks: str = field(metadata=_help("half-open block range to serve", metavar="START:END"))
    initial_peers: tuple[str, ...] = field(default=(), metadata=_help("multiaddrs of DHT peers to join"))
    host: str = field(default="127.0.0.1", metadata=_help("address the gRPC and DHT servers bind"))
    port: int = field(default=0, metadata=_help("gRPC port; 0 picks a free one"))
    dht_port: int = field(default=0, metadata=_help("DHT port; 0 picks a free one"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("compute device"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("compute dtype; auto = bfloat16 on GPUs that support it, else float32")
    )
    ready_file: str | None = field(default=None, metadata=_help("write the ready line as JSON here"))
    identity_file: str | None = field(
        default=None, metadata=_help("RSA key file, created if missing, so a restarted node owns its records")
    )
    announce_period: float = field(default=30.0, metadata=_help("seconds between DHT announcements"))
    max_batch: int = field(default=32, metadata=_help("largest batch a request may carry"))
    max_tokens: int = field(default=8192, metadata=_help("largest batch x length a request may carry"))
    max_session_length: int = field(
        default=4096, metadata=_help("largest max_length of an inference session")
    )
    max_message_bytes: int = field(default=256 * MiB, metadata=_help("largest gRPC message accepted or sent"))
    cache_bytes: int = field(default=2 * GiB, metadata=_help("KV-cache budget shared by inference sessions"))
    session_idle_timeout: float = field(
        default=300.0, metadata=_help("seconds an inference session may wait for its next step")
    )
    startup_timeout: float = field(default=120.0, metadata=_help("seconds to wait for the DHT daemon"))

    def __post_init__(self) -> None:
        parse_span(self.blocks)
        for name in ("port", "dht_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 65535], got {value}")
        for name in ("max_batch", "max_tokens", "max_session_length", "max_message_bytes", "cache_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("announce_period", "session_idle_timeout", "startup_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    @property
    def span(self) -> tuple[int, int]:
        return parse_span(self.blocks)
