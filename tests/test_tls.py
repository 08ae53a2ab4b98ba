"""TLS on the data plane: nodes serve a self-signed certificate whose SHA-256 their signed record
pins; clients reach them only through that pin, refuse any other certificate, and a plaintext
client against a TLS node fails cleanly while the node keeps serving."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pydantic
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.remote import ChannelPool
from swarm.errors import CertificateMismatch, PeerUnavailable
from swarm.generation import SamplingConfig, generate_tokens
from swarm.localswarm import LocalSwarm
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server
from swarm.records import ServerRecord, ServerState, fetch_records
from tests.checkpoints import make_checkpoint


def record(address: str, cert_sha256: str | None, peer: str = "peer-a") -> ServerRecord:
    return ServerRecord(
        state=ServerState.ONLINE,
        peer_id=peer,
        grpc_address=address,
        model="m",
        start=0,
        end=1,
        software_version="0",
        tls_cert_sha256=cert_sha256,
    )


def test_a_certificate_is_pinned_by_the_sha256_of_its_der() -> None:
    cert = tls.NodeCertificate.generate("QmPeer")
    parsed = x509.load_pem_x509_certificate(cert.cert_pem)
    der = parsed.public_bytes(serialization.Encoding.DER)
    assert cert.sha256 == hashlib.sha256(der).hexdigest()
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [tls.SERVER_NAME]
    assert tls.NodeCertificate.generate("QmPeer").sha256 != cert.sha256  # fresh per start
    assert record("h:1", cert.sha256).tls_cert_sha256 == cert.sha256
    for bad in ("ab" * 31, "AB" * 32, "zz" * 32, ""):  # a pin is exactly 64 lowercase hex digits
        with pytest.raises(pydantic.ValidationError):
            record("h:1", bad)


@pytest.fixture
async def tls_node() -> AsyncIterator[tuple[str, tls.NodeCertificate]]:
    """A real gRPC server (BlockService, health) over TLS on a free port."""
    cert = tls.NodeCertificate.generate("peer-a")
    limits = ServerLimits(1, 1, 1, 1 << 20, 1.0)
    server, port, _ = await start_grpc_server(
        BlockServicer(None, "m", "peer-a", limits), "127.0.0.1", 0, 1 << 20, certificate=cert
    )
    yield f"127.0.0.1:{port}", cert
    await server.stop(grace=None)


async def ping(channel: grpc.aio.Channel) -> bytes:
    reply = await swarm_pb2_grpc.BlockServiceStub(channel).Ping(
        swarm_pb2.PingRequest(payload=b"x", reply_bytes=3), timeout=5
    )
    return bytes(reply.payload)


async def test_a_client_reaches_the_node_through_its_pinned_certificate(
    tls_node: tuple[str, tls.NodeCertificate],
) -> None:
    address, cert = tls_node
    shown = tls.fetch_certificate(address, timeout=5)
    assert tls.certificate_sha256(shown) == cert.sha256
    async with await tls.open_channel(address, cert.sha256, timeout=5) as channel:
        assert await ping(channel) == bytes(3)
    pool = ChannelPool(ClientConfig(require_tls=True))
    try:
        stub = await pool.stub(record(address, cert.sha256))
        reply = await stub.Ping(swarm_pb2.PingRequest(reply_bytes=2), timeout=5)
        assert reply.payload == bytes(2)
    finally:
        await pool.close()


async def test_a_certificate_that_does_not_match_the_record_is_refused(
    tls_node: tuple[str, tls.NodeCertificate],
) -> None:
    address, cert = tls_node
    other = tls.NodeCertificate.generate("peer-a")  # what the record pins: not what the node shows
    with pytest.raises(CertificateMismatch, match=f"showed TLS certificate sha256 {cert.sha256[:16]}"):
        await tls.open_channel(address, other.sha256, peer="peer-a", timeout=5)
    pool = ChannelPool(ClientConfig())
    try:
        with pytest.raises(CertificateMismatch, match="peer-a") as caught:
            await pool.stub(record(address, other.sha256))
        # a failed peer to the retry policy and the routing: banned, its work goes elsewhere
        assert isinstance(caught.value, PeerUnavailable) and caught.value.retryable
        # the same node, pinned right, is dialled: a refusal leaves no broken channel behind
        stub = await pool.stub(record(address, cert.sha256))
        assert (await stub.Ping(swarm_pb2.PingRequest(reply_bytes=1), timeout=5)).payload == bytes(1)
    finally:
        await pool.close()


async def test_a_plaintext_client_fails_cleanly_and_the_node_keeps_serving(
    tls_node: tuple[str, tls.NodeCertificate],
) -> None:
    address, cert = tls_node
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ping(plain)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5  # refused at once, not left to time out
    async with await tls.open_channel(address, cert.sha256, timeout=5) as channel:
        assert await ping(channel) == bytes(3)


async def test_the_reachability_dial_back_pins_the_joining_nodes_certificate(
    tls_node: tuple[str, tls.NodeCertificate],
) -> None:
    """A peer asked to dial a joining node back does so over TLS pinned to the hash the joiner
    will announce: the right hash reaches it, another one is reported as a mismatch."""
    joiner, cert = tls_node
    limits = ServerLimits(1, 1, 1, 1 << 20, 1.0)
    server, port, _ = await start_grpc_server(
        BlockServicer(None, "m", "peer-b", limits), "127.0.0.1", 0, 1 << 20
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = swarm_pb2_grpc.BlockServiceStub(channel)
            for pin, reachable in ((cert.sha256, True), ("ab" * 32, False)):
                request = swarm_pb2.ReachabilityRequest(
                    address=joiner, expected_peer_id="peer-a", tls_cert_sha256=pin
                )
                reply = await stub.CheckReachability(request, timeout=15)
                assert reply.reachable is reachable, reply.error
            assert "its signed record pins abababab" in reply.error
    finally:
        await server.stop(grace=None)


async def test_a_tls_client_against_a_plaintext_node_and_require_tls() -> None:
    limits = ServerLimits(1, 1, 1, 1 << 20, 1.0)
    server, port, _ = await start_grpc_server(
        BlockServicer(None, "m", "plain", limits), "127.0.0.1", 0, 1 << 20
    )
    address = f"127.0.0.1:{port}"
    try:
        # a record that pins a certificate is never dialled in plaintext, whatever answers there
        with pytest.raises(PeerUnavailable, match="no TLS handshake"):
            await tls.open_channel(address, "ab" * 32, timeout=5)
        # a record that pins none: plaintext, unless the client requires TLS
        async with await tls.open_channel(address, None) as channel:
            assert await ping(channel) == bytes(3)
        pool = ChannelPool(ClientConfig(require_tls=True))
        with pytest.raises(PeerUnavailable, match="requires TLS"):
            await pool.stub(record(address, None, peer="plain"))
        await pool.close()
    finally:
        await server.stop(grace=None)


def test_real_nodes_serve_tls_pinned_by_their_signed_records(tmp_path: Path) -> None:
    """Real node processes: a TLS node's DHT record pins the certificate it shows; a client that
    requires TLS generates through it (refusing the --no-tls node) the same tokens as any client;
    after the TLS node dies, another node on its port shows another certificate, and the dead
    node's record, which still names that port, is refused."""
    model_path = make_checkpoint(tmp_path / "tls-llama", "llama", num_layers=4, eos_token_id=[])
    prompt = torch.tensor([[5, 9, 31, 77, 2]])
    new_tokens = 8
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        secure = local.start_node(model_path, "0:4", name="secure")
        plain = local.start_node(model_path, "0:4", "--no-tls", name="plain")
        address, pin = secure.info["grpc_address"], secure.info["tls_cert_sha256"]
        assert plain.info["tls_cert_sha256"] is None
        assert tls.certificate_sha256(tls.fetch_certificate(address, timeout=10)) == pin
        with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as anyone:
            expected = anyone.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
            records = run_sync(fetch_records(anyone.dht, anyone.model_name, [0]))[0]
        assert {r.peer_id: r.tls_cert_sha256 for r in records} == {
            secure.info["peer_id"]: pin,
            plain.info["peer_id"]: None,
        }
        strict = ClientConfig(require_tls=True)
        with (
            DistributedModelForCausalLM.from_pretrained(
                model_path, local.initial_peers, client_config=strict
            ) as client,
            client.inference_session(max_length=prompt.shape[1] + new_tokens) as session,
        ):

            def step(ids: torch.Tensor, start: int) -> torch.Tensor:
                with torch.inference_mode():
                    return client.next_token_logits(session, client.parts.embed(ids))

            got = generate_tokens(step, prompt, SamplingConfig(max_new_tokens=new_tokens))
            route = [s.hop.peer_id for s in session.streams]
        assert route == [secure.info["peer_id"]]
        assert got.tolist() == expected.tolist()

        stale = next(r for r in records if r.peer_id == secure.info["peer_id"])
        local.stop(secure, signal.SIGKILL)
        local.start_node(model_path, "0:4", "--port", address.rpartition(":")[2], name="squatter")
        pool = ChannelPool(ClientConfig())
        try:
            with pytest.raises(CertificateMismatch, match=secure.info["peer_id"]):
                run_sync(pool.stub(stale))
        finally:
            run_sync(pool.close())
