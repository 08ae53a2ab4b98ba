"""Which peers to avoid, and for how long: a ban that grows with each failure.

A peer that fails once may have hiccuped; one that keeps failing is probably gone or
overloaded. Each failure doubles its ban (from `base` up to `limit` seconds), and a success
forgets its record, so a recovered peer is soon used again. Pure bookkeeping: the clock is
passed in, so tests need no waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm.errors import ConfigError


@dataclass
class BanList:
    base: float = 5.0  # seconds of the first ban
    limit: float = 300.0  # longest ban
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)
    # Caught returning wrong results (coordinator/trust.py): avoided for the client's whole life.
    _convicted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.limit:
            raise ConfigError(f"need 0 < base <= limit for bans, got base={self.base}, limit={self.limit}")

    def ban(self, peer_id: str) -> float:
        """Record a failure of `peer_id`; returns how long it is banned for."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        duration = min(self.limit, self.base * 2 ** (failures - 1))
        self._until[peer_id] = self.clock() + duration
        return duration

    def forgive(self, peer_id: str) -> None:
        """The peer answered: its next failure starts from the shortest ban again."""
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def convict(self, peer_id: str) -> None:
        """The peer returned wrong results: never use it again (a success does not forgive it)."""
        self._convicted.add(peer_id)

    def convicted(self, peer_id: str) -> bool:
        return peer_id in self._convicted

    def banned(self) -> frozenset[str]:
        now = self.clock()
        return frozenset(p for p, until in self._until.items() if until > now) | self._convicted
