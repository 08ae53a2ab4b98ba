"""Client settings: one typed object instead of keyword relays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from swarm import wire
from swarm.errors import ConfigError
from swarm.retry import RetryPolicy


@dataclass(frozen=True)
class ClientConfig:
    # Lossless by default, so generation matches a local run token for token.
    codec: str = "none"
    # Training sends activations and gradients as int8 blockwise: a quarter of the bytes, with
    # errors far below those of SGD noise. "none" gives gradients exact to float rounding.
    training_codec: str = "int8"
    # Route of a plain forward(): the fastest one, or spread over servers by throughput.
    # Training always spreads (SWARM wiring); generation always takes the fastest route.
    routing: Literal["min_latency", "throughput_weighted"] = "min_latency"
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
    # Nodes whose signed record pins a TLS certificate are always dialled over TLS, pinned. With
    # require_tls, a node that announces none (a --no-tls node) counts as failed instead of being
    # dialled in plaintext.
    require_tls: bool = False
    # Server-to-server push in inference sessions: each node sends its output straight to the next
    # node of the route (client -> A -> B -> client: one leg per hop plus one back, not two legs per
    # hop). The client still gets every hop's answer (failover replay, spot checks) and sends an
    # input itself whenever a push did not happen. Off: the client relays every hop's output.
    push: bool = True

    # Spot checks (coordinator/trust.py): the chance that a trusted server's answer is re-run on
    # another server of its blocks (0 turns checks off); a server is trusted once `verify_probation`
    # of its answers were checked right (until then all are checked). `verify_tolerance`: relative
    # error per token two honest answers may show (None: from the servers' dtypes and the codec).
    verify_rate: float = 0.05
    verify_probation: int = 50
    verify_tolerance: float | None = None

    def __post_init__(self) -> None:
        wire.parse_codec(self.codec)
        wire.parse_codec(self.training_codec)
        if self.routing not in ("min_latency", "throughput_weighted"):
            raise ConfigError(f"routing must be 'min_latency' or 'throughput_weighted', got {self.routing!r}")
        positive = [
            *("connect_timeout", "request_timeout", "swarm_map_ttl", "dht_startup_timeout"),
            *("step_timeout_floor", "step_timeout_factor", "ban_base", "ban_limit"),
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.verify_rate <= 1:
            raise ConfigError(f"verify_rate must be in [0, 1] (0: no spot checks), got {self.verify_rate}")
        if self.verify_probation < 0:
            raise ConfigError(f"verify_probation must be >= 0 answers, got {self.verify_probation}")
        if self.verify_tolerance is not None and not 0 < self.verify_tolerance < 1:
            raise ConfigError(f"verify_tolerance must be in (0, 1), got {self.verify_tolerance}")
        if self.wait_for_blocks < 0:
            raise ConfigError(f"wait_for_blocks must be >= 0, got {self.wait_for_blocks}")
