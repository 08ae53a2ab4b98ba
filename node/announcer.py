"""Keeps a node's records in the DHT while its state changes: joining, online, draining, offline.

A DHT that stops answering must not take the node down: in-flight sessions keep being served,
and announcing is retried with back-off (through the one retry policy) until the DHT is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from swarm.records import NodeIdentity, ServerRecord, announce, withdraw
from swarm.retry import RetryPolicy

log = logging.getLogger("swarm.node")
# Records live this many announce periods, so one lost announcement does not drop the node.
RECORD_TTL_PERIODS = 2.5


class Announcer:
    def __init__(
        self,
        dht: DHT,
        identity: NodeIdentity,
        period: float,
        refresh: Callable[[ServerRecord], ServerRecord] = lambda r: r,
        num_blocks: int | None = None,
    ) -> None:
        self.dht, self.identity, self.period = dht, identity, period
        # The model's block count: with it, the node's model registry entry (what `swarm monitor`
        # discovers models by) is refreshed with its records and left to expire with them.
        self.num_blocks = num_blocks
        self.refresh = refresh  # fills in what changes between announcements (free cache)
        self.record: ServerRecord | None = None
        self.failures = 0  # consecutive periods in which the DHT refused or did not answer
        self.attempts = 0  # periodic refreshes tried so far
        self.attempted = asyncio.Event()  # set after each periodic refresh, to wait on
        # Within one period: a few quick retries, then wait for the next period.
        self._policy = RetryPolicy(
            max_attempts=4, base_delay=min(0.5, period / 4), max_delay=min(8.0, period)
        )

    @property
    def ttl(self) -> float:
        return self.period * RECORD_TTL_PERIODS

    async def publish(self, record: ServerRecord, *, required: bool = False) -> None:
        """Announce a new state or span at once (superseding what this node stored before).

        A store the DHT did not confirm for every block is retried (the retry policy) first. With
        `required`, a failure then raises (a node that cannot announce at all should not claim to
        be up); otherwise it is logged and the periodic loop keeps trying.
        """
        self.record = self.refresh(record).model_copy(update={"announced_at": time.time()})
        try:
            await self._policy.run(functools.partial(self._store_superseding, self.record))
        except Exception as e:
            if required:
                raise
            self.failures += 1
            log.warning("announcing %s failed (%s); retrying in the background", record.state, e)

    async def run(self, stop: asyncio.Event) -> None:
        """Re-announce every period until `stop`; never raises on DHT trouble."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
                return
            except TimeoutError:
                pass
            if self.record is None:
                continue
            record = self.record = self.refresh(self.record).model_copy(update={"announced_at": time.time()})
            try:
                await self._policy.run(functools.partial(self._store_superseding, record))
                if self.failures:
                    log.info("the DHT answers again; records refreshed")
                self.failures = 0
            except Exception as e:
                self.failures += 1
                log.warning(
                    "DHT unreachable for %d period(s) (%s); still serving, retrying in %.1f s",
                    self.failures,
                    e,
                    self.period,
                )
            self.attempts += 1
            self.attempted.set()

    async def _store_superseding(self, record: ServerRecord, attempt: int) -> None:
        # Superseding costs one DHT read more, but a refresh must take even when an OFFLINE record
        # of this node's previous run (same identity) still outlives it.
        await self._announce(record, supersede=True)

    async def withdraw(self, timeout: float = 5.0) -> None:
        """Best effort: replace the records with OFFLINE ones."""
        if self.record is None:
            return
        try:
            await asyncio.wait_for(withdraw(self.dht, self.identity, self.record), timeout=timeout)
        except Exception as e:  # records expire on their own; never fail the shutdown over it
            log.warning("could not withdraw records (%s); they expire within %.0f s", e, self.ttl)

    async def _announce(self, record: ServerRecord, *, supersede: bool) -> None:
        # A partitioned DHT never answers: give up within about a period, so the retries and the
        # next refresh still come before the records (TTL = 2.5 periods) expire.
        await announce(
            self.dht,
            self.identity,
            record,
            expiration_time=get_dht_time() + self.ttl,
            supersede=supersede,
            timeout=max(5.0, self.period),
            num_blocks=self.num_blocks,
        )
