"""TLS on the data plane, with each node's certificate pinned by its signed DHT record.

A node makes a fresh self-signed certificate (ECDSA P-256) when it starts, serves gRPC over TLS
with it, and announces the certificate's SHA-256 (of the DER bytes, lowercase hex) in the
`tls_cert_sha256` field of the records it signs with its node key. There is no certificate
authority: the signed record IS the trust anchor. A dialler (`open_channel`, the one place that
dials a node) first takes the certificate the node shows in a TLS handshake, refuses the node
unless its hash equals the announced one, and then gives gRPC exactly that certificate as the only
root it trusts. gRPC's own handshake then proves that the other end holds the certificate's private
key, on every connection and reconnection of the channel, so nobody on the path can read or alter
activations, and nobody but the announcing node can answer.

Certificates name `SERVER_NAME`, not a host: nodes move between addresses, and the hash, not a
name, says which node is which. A record without a hash is a plaintext node (`--no-tls`, or older
software); clients dial it in plaintext unless they require TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.errors import CertificateMismatch, PeerUnavailable

__all__ = [
    "SERVER_NAME",
    "SHA256_RE",
    "Endpoint",
    "NodeCertificate",
    "certificate_sha256",
    "fetch_certificate",
    "open_channel",
    "pinned_credentials",
    "sync_channel",
]

SERVER_NAME: Final = "swarm-node"  # the DNS name in every node certificate (gRPC checks it)
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# Far longer than any node runs: the pin, not the validity period, decides whether it is trusted.
VALIDITY: Final = datetime.timedelta(days=3650)
Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    """Where a peer serves gRPC, and the certificate hash its signed DHT entry pins (None: plaintext)."""

    address: str
    cert_sha256: str | None = None


def certificate_sha256(der: bytes) -> str:
    """What records carry: SHA-256 of the certificate's DER bytes, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class NodeCertificate:
    """A node's TLS certificate and key (PEM), made at start and announced by hash."""

    cert_pem: bytes
    key_pem: bytes
    sha256: str

    @classmethod
    def generate(cls, peer_id: str) -> NodeCertificate:
        """A fresh self-signed certificate; its common name is the node's peer id (informative:
        the hash in the signed record is what binds it to the node)."""
        key = ec.generate_private_key(ec.SECP256R1())  # P-256: fast handshakes, small certificates
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id[:64])])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clocks a little behind
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem, certificate_sha256(der))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def fetch_certificate(address: str, timeout: float) -> bytes:
    """The certificate (DER) the node at `address` ("host:port") shows in a TLS handshake.

    Blocking (async callers run it in a thread). Nothing is verified here: the caller compares the
    hash with the signed record. Raises PeerUnavailable when there is no TLS server to ask.
    """
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed by design; the pin decides below
    context.set_alpn_protocols(["h2"])  # what gRPC speaks, so the node sees an ordinary client
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: e.g. a plaintext node
        raise PeerUnavailable(f"no TLS handshake with {address}: {e}") from e
    if not der:
        raise PeerUnavailable(f"{address} showed no TLS certificate")
    return der


def pinned_credentials(
    address: str, expected_sha256: str, peer: str, timeout: float
) -> grpc.ChannelCredentials:
    """Credentials that trust only the certificate `address` shows, if its hash is `expected_sha256`;
    CertificateMismatch (a PeerUnavailable: the peer counts as failed) if it is not. Blocking."""
    der = fetch_certificate(address, timeout)
    shown = certificate_sha256(der)
    if shown != expected_sha256:
        raise CertificateMismatch(
            f"peer {peer} at {address} showed TLS certificate sha256 {shown[:16]}..., but its signed "
            f"record pins {expected_sha256[:16]}...: refusing it (another process on its address, or "
            "someone on the path)"
        )
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _tls_options(options: Options) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", SERVER_NAME)]


def _refuse_plaintext(address: str, peer: str) -> None:
    raise PeerUnavailable(
        f"peer {peer} at {address} announces no TLS certificate and this client requires TLS "
        "(require_tls); it is skipped"
    )


async def open_channel(
    address: str,
    cert_sha256: str | None,
    *,
    peer: str = "",
    options: Options = (),
    timeout: float = 10.0,
    require_tls: bool = False,
) -> grpc.aio.Channel:
    """THE way to dial a node (asyncio): TLS pinned to `cert_sha256` (from the node's signed
    record), or plaintext when the record announces none (unless `require_tls`)."""
    if not cert_sha256:
        if require_tls:
            _refuse_plaintext(address, peer or address)
        return grpc.aio.insecure_channel(address, options=list(options))
    credentials = await asyncio.to_thread(pinned_credentials, address, cert_sha256, peer or address, timeout)
    return grpc.aio.secure_channel(address, credentials, options=_tls_options(options))


def sync_channel(
    address: str, cert_sha256: str | None, *, peer: str = "", options: Options = (), timeout: float = 10.0
) -> grpc.Channel:
    """`open_channel` for blocking code (benchmarks, scripts): the same pinning."""
    if not cert_sha256:
        return grpc.insecure_channel(address, options=list(options))
    credentials = pinned_credentials(address, cert_sha256, peer or address, timeout)
    return grpc.secure_channel(address, credentials, options=_tls_options(options))
