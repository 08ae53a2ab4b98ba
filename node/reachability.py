"""Can other peers reach this node? gRPC does not traverse NAT, so a joining node checks.

The joining node asks an online peer (CheckReachability) to dial the address it is about to
announce and call Info there. If the peer cannot, going online would only attract requests
that fail, so the node refuses with the fix: forward the port, or announce another address.
"""

from __future__ import annotations

import logging
import socket

import grpc

from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import ConfigError, PeerUnavailable
from swarm.node.config import NodeConfig
from swarm.records import ServerRecord

log = logging.getLogger("swarm.node")
REACHABILITY_PEERS = 3  # peers asked to dial back before giving up on the check


async def check_reachable(
    address: str, peer_id: str, peers: list[ServerRecord], cert_sha256: str | None = None
) -> None:
    """Ask a peer to dial our announced address (over TLS pinned to `cert_sha256`, when we serve
    TLS); refuse to go online if it cannot."""
    if not peers:
        log.info("no other node yet: cannot check that %s is reachable from outside", address)
        return
    request = swarm_pb2.ReachabilityRequest(
        address=address, expected_peer_id=peer_id, tls_cert_sha256=cert_sha256 or ""
    )
    for peer in peers[:REACHABILITY_PEERS]:
        try:
            channel = await tls.open_channel(
                peer.grpc_address, peer.tls_cert_sha256, peer=peer.peer_id, timeout=15
            )
            async with channel:
                reply = await swarm_pb2_grpc.BlockServiceStub(channel).CheckReachability(request, timeout=15)
        except (grpc.aio.AioRpcError, PeerUnavailable) as e:
            why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
            log.info("peer %s could not check reachability (%s); asking another", peer.peer_id, why)
            continue
        if reply.reachable:
            log.info("peer %s reached this node at %s", peer.peer_id, address)
            return
        port = address.rpartition(":")[2]
        raise ConfigError(
            f"other peers cannot reach this node at {address} ({reply.error}). If this machine is "
            f"behind NAT or a firewall, forward TCP port {port} to it, or set --announce-host/"
            "--announce-port to the public address and port that lead to this node's --port"
        )
    log.warning("no peer could check whether %s is reachable; going online anyway", address)


def announce_host(cfg: NodeConfig) -> str:
    if cfg.announce_host:
        return cfg.announce_host
    if cfg.host not in ("0.0.0.0", "::", ""):
        return cfg.host
    # Bound to every interface: announce the address of the default route. Connecting a UDP
    # socket sends nothing; it only asks the kernel which source address it would use.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1, never routed to anyone
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
