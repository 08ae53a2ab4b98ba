"""SwarmMapCache over a real hivemind DHT: background refresh, coalesced lookups, failures, close()."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from swarm.coordinator.routing import SwarmMap
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.dht import start_dht, visible_maddrs
from swarm.errors import ConfigError, DHTError
from swarm.records import NodeIdentity, ServerRecord, ServerState, announce

NUM_BLOCKS = 4


class Probe(SwarmMapCache):
    """Counts DHT lookups; `gate` stalls them and `fail` makes them raise, for as long as a test wants."""

    def __init__(self, dht: DHT, model: str, ttl: float, max_age: float | None, fetch_timeout: float) -> None:
        super().__init__(dht, model, NUM_BLOCKS, ttl, max_age=max_age, fetch_timeout=fetch_timeout)
        self.lookups = 0
        self.failures = 0
        self.fail = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def _fetch(self) -> SwarmMap:
        self.lookups += 1
        await self.gate.wait()
        if self.fail:
            self.failures += 1
            raise DHTError("injected DHT failure")
        return await super()._fetch()


MakeProbe = Callable[..., Probe]


@dataclass(frozen=True)
class Swarm:
    reader: DHT
    server: DHT
    identity: NodeIdentity


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    """Two DHT peers: the cache reads through the first, servers announce through the second (a lone
    DHT node stores nothing, and a DHT signs with the key it was started with)."""
    reader = start_dht(startup_timeout=60)
    identity = NodeIdentity.generate()
    server = start_dht(initial_peers=visible_maddrs(reader), identity=identity, startup_timeout=60)
    yield Swarm(reader, server, identity)
    server.shutdown()
    reader.shutdown()


@pytest.fixture(scope="module")
def dht(swarm: Swarm) -> DHT:
    return swarm.reader


@pytest.fixture
async def make_probe(dht: DHT) -> AsyncIterator[MakeProbe]:
    made: list[Probe] = []

    def make(
        model: str, *, ttl: float = 60.0, max_age: float | None = None, fetch_timeout: float = 5.0
    ) -> Probe:
        made.append(Probe(dht, model, ttl, max_age, fetch_timeout))
        return made[-1]

    yield make
    for cache in made:  # a refresher left running would outlive the test's event loop
        await asyncio.wait_for(cache.close(), 5.0)


async def add_server(swarm: Swarm, model: str) -> str:
    """Announce the server's record for `model`; returns its peer id (readers accept only the id of
    the key that signs, so one DHT announces as one peer)."""
    record = ServerRecord(
        state=ServerState.ONLINE,
        peer_id=swarm.identity.peer_id,
        grpc_address="127.0.0.1:50051",
        model=model,
        start=0,
        end=NUM_BLOCKS,
        software_version="0.1.0",
        announced_at=time.time(),
    )
    await announce(swarm.server, swarm.identity, record, expiration_time=get_dht_time() + 60)
    return record.peer_id


def peers(snapshot: SwarmMap) -> set[str]:
    return {s.peer_id for s in snapshot.servers}


async def eventually(check: Callable[[], Awaitable[bool] | bool], deadline: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `deadline` seconds."""
    stop = time.monotonic() + deadline
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        assert time.monotonic() < stop, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


def refreshers() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("swarm-map:") and not t.done()}


async def test_new_servers_appear_through_the_background_refresh(swarm: Swarm, make_probe: MakeProbe) -> None:
    # max_age is huge, so get() never reads inline: only the refresher can bring the new server in.
    cache = make_probe("m-bg", ttl=0.2, max_age=1000.0)
    assert peers(await cache.get()) == set()
    new = await add_server(swarm, "m-bg")

    async def seen() -> bool:
        return new in peers(await cache.get())

    await eventually(seen)
    assert cache.lookups >= 2


async def test_fresh_snapshot_is_served_without_a_lookup(make_probe: MakeProbe) -> None:
    cache = make_probe("m-fresh")
    first = await cache.get()
    cache.gate.clear()  # any lookup would now hang: get() must answer from memory
    assert await asyncio.wait_for(cache.get(), 1.0) is first
    assert cache.lookups == 1


async def test_stale_snapshot_is_read_inline(make_probe: MakeProbe) -> None:
    # The refresher sleeps ttl/2 = 30 s, so after max_age only get() itself can read the DHT.
    cache = make_probe("m-stale", max_age=0.05)
    first = await cache.get()
    taken = time.monotonic()
    await eventually(lambda: time.monotonic() - taken > 0.05)
    second = await cache.get()
    assert second is not first and second.taken_at > first.taken_at
    assert cache.lookups == 2


async def test_concurrent_forced_refreshes_share_lookups(make_probe: MakeProbe) -> None:
    cache = make_probe("m-coalesce")
    first = await cache.get()
    # Callers arriving together share one lookup.
    together = await asyncio.gather(*(cache.get(refresh=True) for _ in range(8)))
    assert cache.lookups == 2
    assert all(s is together[0] for s in together) and together[0] is not first

    # Callers arriving while a lookup is under way cannot use it (it may predate what they know):
    # they all share ONE lookup queued behind it.
    cache.gate.clear()
    leader = asyncio.create_task(cache.get(refresh=True))
    await eventually(lambda: cache.lookups == 3)
    followers = [asyncio.create_task(cache.get(refresh=True)) for _ in range(5)]
    await asyncio.sleep(0)  # let them all ask before the stalled lookup answers
    cache.gate.set()
    led, *followed = await asyncio.gather(leader, *followers)
    assert cache.lookups == 4
    assert all(s is followed[0] for s in followed) and followed[0] is not led


async def test_failed_refresh_keeps_the_old_snapshot_and_the_refresher(
    swarm: Swarm, make_probe: MakeProbe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="swarm.coordinator.swarm_map")
    cache = make_probe("m-fail", ttl=0.2, max_age=1000.0)
    before = await cache.get()
    cache.fail = True
    await eventually(lambda: cache.failures >= 2)  # a second failure: the task outlived the first
    assert await cache.get() is before
    with pytest.raises(DHTError, match="injected"):  # a caller's own lookup still reports its error
        await cache.get(refresh=True)

    cache.fail = False
    back = await add_server(swarm, "m-fail")

    async def recovered() -> bool:
        return back in peers(await cache.get())

    await eventually(recovered)
    warnings = [
        r for r in caplog.records if r.name == "swarm.coordinator.swarm_map" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, "one warning per outage, the rest at debug"


async def test_lookups_are_bounded_by_fetch_timeout(make_probe: MakeProbe) -> None:
    cache = make_probe("m-timeout", fetch_timeout=0.2)
    await cache.get()
    cache.gate.clear()
    started = time.monotonic()
    with pytest.raises(DHTError, match=r"took > 0\.2 s"):
        await asyncio.wait_for(cache.get(refresh=True), 5.0)  # fail, not hang, if unbounded
    assert time.monotonic() - started < 2.0
    cache.gate.set()
    assert (await cache.get(refresh=True)).model == "m-timeout"


async def test_close_stops_the_refresher(make_probe: MakeProbe) -> None:
    never_started = make_probe("m-never")
    await never_started.close()
    await never_started.close()

    cache = make_probe("m-close", ttl=0.2)
    await cache.get()
    assert len(refreshers()) == 1
    await asyncio.wait_for(cache.close(), 5.0)
    assert refreshers() == set()
    await cache.close()  # twice is fine
    # Still usable on demand after close(), without bringing the refresher back...
    assert (await cache.get(refresh=True)).model == "m-close"
    assert refreshers() == set()
    # ...unless asked to.
    await cache.start()
    assert len(refreshers()) == 1


async def test_close_during_a_lookup_fails_its_callers_with_a_swarm_error(make_probe: MakeProbe) -> None:
    cache = make_probe("m-close-busy")
    await cache.get()
    cache.gate.clear()
    waiting = asyncio.create_task(cache.get(refresh=True))
    await eventually(lambda: cache.lookups == 2)
    await cache.close()
    with pytest.raises(DHTError, match="closed during the lookup"):  # not a CancelledError it never asked for
        await waiting


async def test_another_event_loop_is_refused(make_probe: MakeProbe) -> None:
    cache = make_probe("m-loop")
    await cache.get()
    with pytest.raises(RuntimeError, match="another running event loop"):
        await asyncio.to_thread(asyncio.run, cache.get())


def test_settings_are_validated(dht: DHT) -> None:
    with pytest.raises(ConfigError, match="ttl must be > 0 seconds, got 0"):
        SwarmMapCache(dht, "m", NUM_BLOCKS, ttl=0)
    with pytest.raises(ConfigError, match="fetch_timeout must be > 0 seconds, got -1"):
        SwarmMapCache(dht, "m", NUM_BLOCKS, fetch_timeout=-1)
