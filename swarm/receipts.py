"""Signed answers (receipts) and the evidence a client publishes when it catches a node lying.

Every Forward, Backward and Inference answer of a node carries a `Receipt`: the node's RSA public
key and its signature over a digest of the request and of the response. The key's libp2p id is the
node's peer id (records.py binds the two), so a receipt proves which node said what, to anyone.

The answer itself is signed with an Ed25519 *receipt key* that the node draws at start and that its
RSA key endorses once (the endorsement travels in every receipt). An RSA-2048 signature costs about
a millisecond of CPU, and every inference step of every hop would pay it on the token's critical
path; Ed25519 signs in tens of microseconds. A receipt without a receipt key is an RSA signature
over the same bytes (nodes before this change); both verify.

A client whose spot check proves a node wrong (a second and a third server agree, the node does
not) stores `Evidence` in the DHT under ``"{model}.evidence"``: the request bytes and the signed
response bytes. The evidence is not signed by its reporter (anyone may report), so a reader
believes nothing it cannot check: the receipt must verify under a key whose peer id is the accused,
and the reader re-runs the request on another server itself before it bans anyone (client/verify.py).
A dishonest client therefore cannot defame an honest node: it can neither alter a signed response
nor make an honest server disagree with an honest answer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Final

import pydantic
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError, Message
from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm._proto import swarm_pb2
from swarm.records import DHT_TIMEOUT, _run, owner_peer_id

__all__ = [
    "CHAIN_START",
    "MAX_EVIDENCE_BYTES",
    "Evidence",
    "ReceiptSigner",
    "chain_digest",
    "evidence_key",
    "fetch_evidence",
    "key_peer_id",
    "message_digest",
    "publish_evidence",
    "response_digest",
    "sign_response",
    "verify_receipt",
]

logger = logging.getLogger(__name__)

CHAIN_START: Final = bytes(32)  # request digest of an Inference stream before its first message
# A DHT value is copied to several peers and read by every client: evidence larger than this stays
# a local ban (a real model's long prompt would not fit; the tests' and most short requests do).
MAX_EVIDENCE_BYTES: Final = 1 << 20
EVIDENCE_TTL: Final = 24 * 3600.0  # seconds a report stays readable
_DOMAIN: Final = b"swarm.v1.receipt\0"
_ENDORSE_DOMAIN: Final = b"swarm.v1.receipt-key\0"


def message_digest(message: Message) -> bytes:
    """sha256 of a message's deterministic serialization: equal messages, equal digests."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def chain_digest(previous: bytes, request: Message) -> bytes:
    """The request digest of an Inference stream after one more request message."""
    return hashlib.sha256(previous + message_digest(request)).digest()


def response_digest(response: Message) -> bytes:
    """The digest of a response without its receipt (what the receipt signs)."""
    if not response.HasField("receipt"):
        return message_digest(response)
    bare = type(response)()
    bare.CopyFrom(response)
    bare.ClearField("receipt")
    return message_digest(bare)


def _signed_bytes(method: str, request_digest: bytes, answer_digest: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + method.encode() + b"\0" + request_digest + answer_digest).digest()


class ReceiptSigner:
    """A node's receipt key: an Ed25519 key drawn at start, endorsed once by the node's RSA key."""

    def __init__(self, identity: RSAPrivateKey) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.receipt_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = identity.get_public_key().to_bytes()
        self.endorsement = identity.sign(_endorsed_bytes(self.receipt_key))

    def sign(self, method: str, request_digest: bytes, response: Message) -> None:
        """Attach the receipt to `response` (which must not have one yet)."""
        data = _signed_bytes(method, request_digest, message_digest(response))
        receipt = response.receipt  # type: ignore[attr-defined]
        receipt.public_key = self.public_key
        receipt.receipt_key = self.receipt_key
        receipt.receipt_key_signature = self.endorsement
        receipt.signature = self._key.sign(data)


def _endorsed_bytes(receipt_key: bytes) -> bytes:
    return hashlib.sha256(_ENDORSE_DOMAIN + receipt_key).digest()


def sign_response(signer: ReceiptSigner, method: str, request_digest: bytes, response: Message) -> None:
    """Attach `signer`'s receipt to `response` (which must not have one yet)."""
    signer.sign(method, request_digest, response)


def key_peer_id(public_key: bytes) -> str | None:
    """The libp2p peer id of an OpenSSH RSA public key, or None if it is none."""
    return owner_peer_id(RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key))


def verify_receipt(peer_id: str, method: str, request_digest: bytes, response: Message) -> bool:
    """Whether `response` carries a receipt by `peer_id`'s key over this request and response."""
    if not response.HasField("receipt"):
        return False
    receipt = response.receipt  # type: ignore[attr-defined]
    if key_peer_id(receipt.public_key) != peer_id:
        return False
    data = _signed_bytes(method, request_digest, response_digest(response))
    if not receipt.receipt_key:  # a node before receipt keys: the RSA key signed the answer itself
        return _rsa_verifies(receipt.public_key, data, receipt.signature)
    if not _endorsed(receipt.public_key, receipt.receipt_key, receipt.receipt_key_signature):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(receipt.receipt_key).verify(receipt.signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)  # a node's endorsement is the same in all its receipts
def _endorsed(public_key: bytes, receipt_key: bytes, endorsement: bytes) -> bool:
    return _rsa_verifies(public_key, _endorsed_bytes(receipt_key), endorsement)


def _rsa_verifies(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        key = RSAPublicKey.from_bytes(public_key)
    except (ValueError, TypeError):
        return False
    return bool(key.verify(data, signature))


# ---------------------------------------------------------------------------------------- evidence ---


def evidence_key(model: str) -> str:
    return f"{model}.evidence"


class Evidence(pydantic.BaseModel):
    """A signed wrong answer: what the reporter sent (`request`) and what the accused returned."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    model: str = pydantic.Field(min_length=1, max_length=256)
    accused: str = pydantic.Field(min_length=1, max_length=128)
    method: str = pydantic.Field(pattern="^Forward$")  # the method whose answer is re-run
    request: bytes  # ForwardRequest, serialized
    response: bytes  # ForwardResponse with the accused's receipt, serialized

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.request + self.response).hexdigest()[:32]

    def parsed(self) -> tuple[swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse] | None:
        """The request and response, or None if either does not parse."""
        request, response = swarm_pb2.ForwardRequest(), swarm_pb2.ForwardResponse()
        try:
            request.ParseFromString(self.request)
            response.ParseFromString(self.response)
        except DecodeError:
            return None
        return request, response

    def signed_by_accused(self) -> bool:
        """Whether the response is the accused's own, signed answer to exactly this request."""
        parsed = self.parsed()
        if parsed is None or parsed[0].header.model != self.model:
            return False
        request, response = parsed
        return verify_receipt(self.accused, self.method, message_digest(request), response)


async def publish_evidence(dht: DHT, evidence: Evidence, *, timeout: float | None = DHT_TIMEOUT) -> bool:
    """Store `evidence` under its model's evidence key; False when too large to publish."""
    value = evidence.model_dump(mode="python")
    if len(evidence.request) + len(evidence.response) > MAX_EVIDENCE_BYTES:
        return False
    store = functools.partial(
        _store,
        key=evidence_key(evidence.model),
        subkey=evidence.digest,
        value=value,
        expiration=get_dht_time() + EVIDENCE_TTL,
    )
    return bool(await _run(dht, store, timeout))


async def fetch_evidence(dht: DHT, model: str, *, timeout: float | None = DHT_TIMEOUT) -> list[Evidence]:
    """Every unexpired, well-formed report about `model` (checked by nobody yet: see the module doc)."""
    found = await _run(dht, functools.partial(_get, key=evidence_key(model)), timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    now, reports = get_dht_time(), []
    for subkey, item in found.value.items():
        if item.expiration_time < now:
            continue
        try:
            evidence = Evidence.model_validate(item.value)
        except pydantic.ValidationError:
            logger.debug("skipping malformed evidence under %r", subkey)
            continue
        if evidence.model == model and evidence.digest == subkey:
            reports.append(evidence)
    return reports


# These run inside the DHT process (see records.py: pickled by reference, results must pickle).


async def _store(_dht: DHT, node: DHTNode, *, key: str, subkey: str, value: Any, expiration: float) -> bool:
    return bool(await node.store(key, value, expiration, subkey=subkey))


async def _get(_dht: DHT, node: DHTNode, *, key: str) -> Any:
    return await node.get(key, latest=True)
