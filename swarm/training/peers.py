"""The edges of a training collaboration: who its members are (the DHT), and answering their
calls (gRPC `swarm.v1.AveragingService`; nodes add it to their server, trainers start one).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import grpc
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

import swarm
from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.dht import dht_call
from swarm.errors import SwarmError
from swarm.records import NodeIdentity, signed_by

if TYPE_CHECKING:
    from swarm.training.collaboration import Collaboration

MEMBERSHIP_TTL = 8.0  # a member's DHT entry lives this long unless refreshed


def membership_key(run_id: str) -> str:
    return f"{run_id}.peers"


class DHTMembership:
    """Who belongs to a collaboration: `{run_id}.peers` in the DHT, one signed entry per peer."""

    def __init__(
        self,
        dht: DHT,
        identity: NodeIdentity,
        run_id: str,
        me: str,
        address: str,
        cert_sha256: str | None = None,
    ) -> None:
        self.dht, self.identity, self.me, self.address = dht, identity, me, address
        self.cert_sha256 = cert_sha256  # of the TLS certificate this peer serves with (None: plaintext)
        self.key = membership_key(run_id)
        self.epoch = 0  # published along (swarm export orders a stage's peers by it)

    async def publish(self, ttl: float = MEMBERSHIP_TTL, *, left: bool = False) -> None:
        value = {"peer_id": self.me, "address": self.address, "epoch": self.epoch, "left": left}
        if self.cert_sha256 is not None:
            value["tls_cert_sha256"] = self.cert_sha256
        future = self.dht.store(
            self.key, value, get_dht_time() + ttl, subkey=self.identity.subkey, return_future=True
        )
        await dht_call(future, timeout=10)

    async def withdraw(self) -> None:
        # The DHT keeps, per subkey, the value that expires last: "left" must outlive the entry.
        with contextlib.suppress(SwarmError):  # best effort: the entry expires on its own anyway
            await self.publish(ttl=MEMBERSHIP_TTL + 1, left=True)

    async def members(self) -> dict[str, tls.Endpoint]:
        """peer id -> gRPC address (and pinned certificate) of every other member with a live entry."""
        found = await dht_call(self.dht.get(self.key, latest=True, return_future=True), timeout=10)
        out: dict[str, tls.Endpoint] = {}
        if found is None or not isinstance(found.value, dict):
            return out
        for peer, value in signed_entries(found, f"a membership of {self.key}").items():
            address, cert = value.get("address"), value.get("tls_cert_sha256")
            if cert is not None and not (isinstance(cert, str) and tls.SHA256_RE.fullmatch(cert)):
                continue  # malformed pin: dialling it in plaintext instead would defeat the pin
            if not value.get("left") and isinstance(address, str) and peer != self.me:
                out[peer] = tls.Endpoint(address, cert)
        return out


def signed_entries(found: Any, what: str) -> dict[str, dict[str, Any]]:
    """peer id -> live membership entry, from what `dht.get(membership_key(...))` returned: only
    entries signed by the key of the peer id they name (`swarm.records.signed_by`), so nobody can
    join, leave or report an epoch on another peer's behalf."""
    out: dict[str, dict[str, Any]] = {}
    if found is None or not isinstance(found.value, dict):
        return out
    now = get_dht_time()
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        if getattr(item, "expiration_time", 0) < now or not isinstance(value, dict):
            continue
        peer = value.get("peer_id")
        if isinstance(peer, str) and signed_by(subkey, peer, what):
            out[peer] = value
    return out


class AveragingServicer(swarm_pb2_grpc.AveragingServiceServicer):
    """gRPC front of the collaborations this process takes part in (by run id)."""

    def __init__(self) -> None:
        self.collaborations: dict[str, Collaboration] = {}

    def _find(self, header: swarm_pb2.AveragingHeader) -> Collaboration | None:
        if header.protocol_version != swarm.PROTOCOL_VERSION:
            return None
        return self.collaborations.get(header.run_id)

    async def _missing(self, context: grpc.aio.ServicerContext, header: swarm_pb2.AveragingHeader) -> None:
        if header.protocol_version != swarm.PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"protocol version {header.protocol_version}, this peer speaks {swarm.PROTOCOL_VERSION}",
            )
        await context.abort(grpc.StatusCode.NOT_FOUND, f"this peer takes no part in {header.run_id!r}")

    async def Report(self, request: Any, context: grpc.aio.ServicerContext) -> swarm_pb2.ReportResponse:
        collab = self._find(request.header)
        if collab is None:
            await self._missing(context, request.header)
            raise AssertionError("unreachable")
        leader, epoch = collab.on_report(
            request.header.sender, int(request.header.epoch), int(request.samples)
        )
        return swarm_pb2.ReportResponse(leader=leader, epoch=epoch)

    async def Collect(self, request: Any, context: grpc.aio.ServicerContext) -> swarm_pb2.CollectResponse:
        collab = self._find(request.header)
        if collab is None:
            await self._missing(context, request.header)
            raise AssertionError("unreachable")
        return await collab.on_collect(request.header.sender, int(request.header.epoch))

    async def Apply(self, request: Any, context: grpc.aio.ServicerContext) -> swarm_pb2.ApplyResponse:
        collab = self._find(request.header)
        if collab is None:
            await self._missing(context, request.header)
            raise AssertionError("unreachable")
        return await collab.on_apply(request)

    async def DownloadState(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        collab = self._find(request.header)
        if collab is None:
            await self._missing(context, request.header)
            return
        for chunk in await collab.state_chunks():
            yield chunk
