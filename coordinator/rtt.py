"""Round-trip times to servers, measured with the Ping RPC, for min-latency routing.

Each server is pinged at most once per `ttl`, all of them concurrently, so building a route
costs one round of pings at worst. A server that does not answer within `timeout` gets the
timeout as its RTT: routes avoid it, and a later measurement may clear it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import PeerUnavailable
from swarm.records import ServerRecord

# The client's ChannelPool.stub: dials the server as its record says (TLS pinned to its certificate).
StubFor = Callable[[ServerRecord], Awaitable[swarm_pb2_grpc.BlockServiceStub]]


@dataclass
class RttTable:
    ttl: float = 30.0  # seconds a measurement is trusted
    timeout: float = 2.0  # seconds a ping may take
    clock: Callable[[], float] = time.monotonic
    _rtt: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (seconds, measured at)

    def known(self) -> dict[str, float]:
        return {peer: rtt for peer, (rtt, _) in self._rtt.items()}

    async def measure(self, servers: Iterable[ServerRecord], stub_for: StubFor) -> dict[str, float]:
        """Ping the servers whose RTT is unknown or stale; return every RTT known."""
        now = self.clock()
        stale = {s.peer_id: s for s in servers if now - self._rtt.get(s.peer_id, (0.0, -1e18))[1] > self.ttl}
        results = await asyncio.gather(*(self._ping(s, stub_for) for s in stale.values()))
        for peer, rtt in zip(stale, results, strict=True):
            self._rtt[peer] = (rtt, self.clock())
        return self.known()

    async def _ping(self, server: ServerRecord, stub_for: StubFor) -> float:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):  # dialling may take a TLS handshake first
                stub = await stub_for(server)
            await stub.Ping(swarm_pb2.PingRequest(), timeout=self.timeout)
        except (grpc.aio.AioRpcError, PeerUnavailable, TimeoutError):  # PeerUnavailable: a wrong certificate
            return self.timeout
        return time.perf_counter() - started
