"""Client settings: one typed object instead of keyword relays."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm import wire
from swarm.errors import ConfigError
from swarm.retry import RetryPolicy


@dataclass(frozen=True)
class ClientConfig:
    # Lossless by default, so generation matches a local run token for token.
    codec: str = "none"
    connect_timeout: float = 10.0  # seconds to open a stream to a node
    request_timeout: float = 60.0  # seconds for one Forward, or one inference step
    max_message_bytes: int = 256 << 20
    swarm_map_ttl: float = 5.0  # seconds a snapshot of the DHT is reused
    wait_for_blocks: float = 0.0  # seconds from_pretrained waits for missing blocks to appear
    dht_startup_timeout: float = 120.0
    # A hung peer (SIGSTOP, swapped out) never breaks its stream: a single-token step it does
    # not answer within max(floor, factor x its usual step time) counts as a failure.
    step_timeout_floor: float = 3.0
    step_timeout_factor: float = 10.0
    ban_base: float = 5.0  # seconds a failed peer is avoided; doubles with each further failure
    ban_limit: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        wire.parse_codec(self.codec)
        positive = [
            *("connect_timeout", "request_timeout", "swarm_map_ttl", "dht_startup_timeout"),
            *("step_timeout_floor", "step_timeout_factor", "ban_base", "ban_limit"),
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.wait_for_blocks < 0:
            raise ConfigError(f"wait_for_blocks must be >= 0, got {self.wait_for_blocks}")
