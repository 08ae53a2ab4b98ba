"""The announcer keeps a node's records fresh, and survives a DHT that stops answering."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hivemind.dht import DHT

from swarm.dht import start_dht
from swarm.node.announcer import Announcer
from swarm.records import NodeIdentity, ServerRecord, ServerState, fetch_records


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
def dht(identity: NodeIdentity) -> Iterator[DHT]:
    node = start_dht(initial_peers=[], identity=identity)
    yield node
    node.shutdown()


def record(dht: DHT, state: ServerState = ServerState.ONLINE, start: int = 0, end: int = 2) -> ServerRecord:
    return ServerRecord(
        state=state,
        peer_id=str(dht.peer_id),
        grpc_address="127.0.0.1:5",
        model="ann",
        start=start,
        end=end,
        software_version="0",
    )


async def newest(dht: DHT, block: int) -> ServerRecord:
    (found,) = (await fetch_records(dht, "ann", [block]))[block]
    return found


async def test_state_changes_take_even_after_an_offline_record(dht: DHT, identity: NodeIdentity) -> None:
    announcer = Announcer(dht, identity, period=30)
    await announcer.publish(record(dht, ServerState.JOINING), required=True)
    assert (await newest(dht, 0)).state == ServerState.JOINING
    await announcer.withdraw()  # OFFLINE, stored to expire after the record it replaced
    assert (await newest(dht, 0)).state == ServerState.OFFLINE
    # A restart (same identity) must still be able to announce itself online.
    await announcer.publish(record(dht, ServerState.ONLINE), required=True)
    assert (await newest(dht, 1)).state == ServerState.ONLINE
    assert (await newest(dht, 1)).announced_at > 0


async def test_refreshes_fill_in_live_fields(dht: DHT, identity: NodeIdentity) -> None:
    refreshed = iter(range(1, 100))
    announcer = Announcer(
        dht,
        identity,
        period=0.2,
        refresh=lambda r: r.model_copy(update={"free_cache_tokens": next(refreshed)}),
    )
    await announcer.publish(record(dht), required=True)
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))
    await asyncio.wait_for(announcer.attempted.wait(), timeout=30)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert announcer.failures == 0
    assert (await newest(dht, 0)).free_cache_tokens >= 2  # set by the periodic refresh, not the publish


async def test_a_dead_dht_is_survived_and_reported(dht: DHT, identity: NodeIdentity) -> None:
    announcer = Announcer(dht, identity, period=0.2)
    await announcer.publish(record(dht), required=True)
    dht.shutdown()
    stop = asyncio.Event()
    task = asyncio.create_task(announcer.run(stop))
    await asyncio.wait_for(announcer.attempted.wait(), timeout=30)
    assert announcer.failures >= 1
    assert not task.done()  # still running: the node keeps serving and keeps trying
    await announcer.publish(record(dht, ServerState.DRAINING))  # not required: logged, not raised
    stop.set()
    await asyncio.wait_for(task, timeout=10)
