"""RTTs to servers: measured with real Ping RPCs, cached for a while, a silent server penalised."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc
import pytest

from swarm._proto import swarm_pb2_grpc
from swarm.coordinator.rtt import RttTable
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server
from swarm.records import ServerRecord, ServerState


def record(peer: str, address: str) -> ServerRecord:
    return ServerRecord(
        state=ServerState.ONLINE,
        peer_id=peer,
        grpc_address=address,
        model="m",
        start=0,
        end=1,
        software_version="0",
    )


@pytest.fixture
async def live_address() -> AsyncIterator[str]:
    limits = ServerLimits(1, 1, 1, 1 << 20, 1.0)
    server, port, _ = await start_grpc_server(
        BlockServicer(None, "m", "live", limits), "127.0.0.1", 0, 1 << 20
    )
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


async def test_rtts_are_measured_cached_and_silence_is_penalised(live_address: str) -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{s.getsockname()[1]}"
    now = [0.0]
    table = RttTable(ttl=30.0, timeout=0.5, clock=lambda: now[0])
    channels: dict[str, grpc.aio.Channel] = {}
    pings: list[str] = []

    async def stub_for(server: ServerRecord) -> swarm_pb2_grpc.BlockServiceStub:
        address = server.grpc_address
        pings.append(address)
        channel = channels.setdefault(address, grpc.aio.insecure_channel(address))
        return swarm_pb2_grpc.BlockServiceStub(channel)

    servers = [record("live", live_address), record("dead", dead_address)]
    try:
        rtt = await table.measure(servers, stub_for)
        assert 0 < rtt["live"] < 0.5
        assert rtt["dead"] == 0.5  # no answer: costs the whole timeout, so routes avoid it
        await table.measure(servers, stub_for)
        assert len(pings) == 2  # fresh measurements are reused
        now[0] += 31
        await table.measure(servers[:1], stub_for)
        assert len(pings) == 3  # stale: measured again
    finally:
        for channel in channels.values():
            await channel.close()
