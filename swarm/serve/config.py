"""Settings of `swarm serve` and `swarm monitor` (their flags are generated from these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(metadata={"help": "checkpoint directory or hub id", "metavar": "PATH_OR_ID"})
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "HTTP port (0: any free port)"})
    ready_file: str | None = field(
        default=None, metadata={"help": "write the URL here as JSON once listening", "metavar": "PATH"}
    )
    max_sessions: int = field(default=8, metadata={"help": "generations running through the swarm at once"})
    max_queue: int = field(default=32, metadata={"help": "requests waiting for a session; beyond: 429"})
    wait_for_blocks: float = field(
        default=60.0, metadata={"help": "seconds to wait at start for every block to be served"}
    )
    status_interval: float = field(default=1.0, metadata={"help": "seconds between status page refreshes"})
    require_tls: bool = field(
        default=False,
        metadata={
            "help": "use only nodes that serve TLS pinned by their signed records (skip --no-tls nodes)"
        },
    )

    def __post_init__(self) -> None:
        _check_common(self.port, self.status_interval)
        if self.max_sessions < 1 or self.max_queue < 0:
            raise ConfigError(
                f"need --max-sessions >= 1 and --max-queue >= 0, got {self.max_sessions} and {self.max_queue}"
            )


@dataclass(frozen=True)
class MonitorConfig:
    initial_peers: tuple[str, ...] = field(metadata={"help": "multiaddrs of swarm peers"})
    model: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "models to watch (checkpoint directory or hub id); default: every model the swarm serves",
            "metavar": "PATH_OR_ID",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8001, metadata={"help": "HTTP port (0: any free port)"})
    ready_file: str | None = field(
        default=None, metadata={"help": "write the URL here as JSON once listening", "metavar": "PATH"}
    )
    status_interval: float = field(default=1.0, metadata={"help": "seconds between status page refreshes"})

    def __post_init__(self) -> None:
        _check_common(self.port, self.status_interval)


def _check_common(port: int, interval: float) -> None:
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be 0-65535, got {port}")
    if not interval > 0:
        raise ConfigError(f"--status-interval must be > 0, got {interval}")
