"""The one retry policy of the code base.

Only errors that mean "this peer (or the network to it) failed" are retried: those are
`SwarmError`s with `retryable = True`. Programming errors and refusals such as
INVALID_ARGUMENT surface at once. Attempts are finite; delays grow exponentially with
jitter so that many clients retrying after one failure do not stampede a peer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from swarm.errors import ConfigError, MissingBlocksError, SwarmError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0
    jitter: float = 0.5  # fraction of the delay drawn at random

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ConfigError(
                f"need 0 <= base_delay <= max_delay, got base_delay={self.base_delay}, "
                f"max_delay={self.max_delay}"
            )

    def delay(self, attempt: int) -> float:
        """Back-off before attempt `attempt + 1` (attempt counts from 1)."""
        raw = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return raw * (1 - self.jitter * random.random())

    async def run(self, fn: Callable[[int], Awaitable[T]]) -> T:
        """Call `fn(attempt)` until it succeeds, a non-retryable error occurs, or attempts run out.

        `fn` gets the attempt number so it can re-plan (e.g. route around a banned peer).
        """
        first: SwarmError | None = None  # the first failure: often the real cause of the last one
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await fn(attempt)
            except SwarmError as e:
                first = first or e
                if not e.retryable or attempt == self.max_attempts:
                    # Re-planning around a failed server can leave no server at all: say why it failed.
                    if isinstance(e, MissingBlocksError) and not isinstance(first, MissingBlocksError):
                        raise e.after_failure(first) from e
                    raise
                log.info("attempt %d/%d failed (%s); retrying", attempt, self.max_attempts, e)
                await asyncio.sleep(self.delay(attempt))
        raise AssertionError("unreachable")
