"""DHT keys and the record a node announces for every block it serves.

Layout: key ``"{model}.{block}"`` -> subkey = the node's owner marker -> value = `ServerRecord` as a
JSON-compatible dict. The subkey embeds the node's RSA public key, so hivemind's
RSASignatureValidator lets only the holder of the matching private key write under it: nobody can
announce (or withdraw) on another node's behalf, and honest peers drop tampered copies.

Identities are bound to keys: a node's peer id IS its key's libp2p peer id (the multihash of the
public key; the node's DHT runs with that key, so `dht.peer_id` is the same id). A signature alone
does not stop a node from signing a record that *claims* another node's peer id, so readers also
check `signed_by(subkey, record.peer_id)`: the key in the subkey must hash to the claimed id.

Model registry: key ``"swarm.models"`` -> subkey = the node's owner marker -> value = `ModelEntry`
(its peer id, model, number of blocks), stored with the node's records and expiring with them, so
that a monitor can list the swarm's models without being told them (`fetch_models`).

Compatibility: readers ignore unknown fields, so adding an optional field needs no version bump.
`SCHEMA_VERSION` changes only for incompatible changes, and readers skip records of a newer version.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

import pydantic
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.dht import dht_call
from swarm.errors import ConfigError, DHTError

T = TypeVar("T")

__all__ = [
    "MODELS_KEY",
    "SCHEMA_VERSION",
    "ModelEntry",
    "NodeIdentity",
    "ServerRecord",
    "ServerState",
    "announce",
    "block_key",
    "fetch_models",
    "fetch_records",
    "latest_per_peer",
    "meta_key",
    "owner_peer_id",
    "signed_by",
    "withdraw",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
_OWNER_PREFIX: Final = RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")[0]  # b"[owner:"
_OWNER_RE: Final = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)
OFFLINE_TTL: Final = 60.0  # seconds an OFFLINE record outlives the record it replaces
# A DHT whose process died never answers; bound every call. Lookups normally take well under a second.
DHT_TIMEOUT: Final = 60.0


def block_key(model: str, block: int) -> str:
    return f"{model}.{block}"


def meta_key(model: str) -> str:
    return f"{model}.meta"


# The model registry: one key for the whole swarm, one entry per node (its subkey). No model name
# can collide with it: block keys always end in ".{block}" or ".meta".
MODELS_KEY: Final = "swarm.models"
# Bounds what one (possibly hostile) entry can make a reader do: a monitor reads every block.
MAX_BLOCKS: Final = 4096


class ServerState(StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class ServerRecord(pydantic.BaseModel):
    """What a node announces under every block of its span [start, end)."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    schema_version: int = pydantic.Field(default=SCHEMA_VERSION, ge=1)
    state: ServerState
    peer_id: str = pydantic.Field(min_length=1)
    grpc_address: str  # "host:port"; IPv6 hosts in brackets: "[::1]:8080"
    model: str = pydantic.Field(min_length=1)
    start: int = pydantic.Field(ge=0)
    end: int
    # Measured per block: forward tokens/s (compute_throughput) and single-token inference
    # steps/s (inference_rps); network_throughput is bytes/s. `throughput` is what routing and
    # block selection use: tokens/s this node can push through its WHOLE span, the min of the
    # compute bound (compute_throughput / span length) and the network bound.
    compute_throughput: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    network_throughput: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    inference_rps: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    throughput: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    free_cache_tokens: int = pydantic.Field(default=0, ge=0)
    dtype: str = "float32"
    quant: str = "none"
    trainable_stage: int | None = pydantic.Field(default=None, ge=0)
    software_version: str
    # Wall-clock time of the announcement. A node that moved still has records under its old
    # blocks until they expire; readers keep each peer's newest record (see `latest_per_peer`).
    announced_at: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    # SHA-256 (lowercase hex) of the DER certificate the node serves gRPC TLS with: clients refuse
    # any other certificate at this address (swarm.tls). None: the node serves plaintext.
    tls_cert_sha256: str | None = pydantic.Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @pydantic.model_validator(mode="after")
    def _span_not_empty(self) -> ServerRecord:
        if self.end <= self.start:
            raise ValueError(f"span [start={self.start}, end={self.end}) is empty; need start < end")
        return self

    @pydantic.field_validator("grpc_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        ipv6_unbracketed = ":" in host and not (host.startswith("[") and host.endswith("]"))
        if not sep or not host or ipv6_unbracketed or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"grpc_address must be 'host:port' with port 1-65535 (IPv6: '[::1]:port'), got {value!r}"
            )
        return value

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)


class ModelEntry(pydantic.BaseModel):
    """A node's entry in the model registry: which model it serves, and how many blocks it has."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    peer_id: str = pydantic.Field(min_length=1)
    model: str = pydantic.Field(min_length=1, max_length=256)
    num_blocks: int = pydantic.Field(ge=1, le=MAX_BLOCKS)


class NodeIdentity:
    """A node's RSA key: it signs the node's DHT records, and its public half marks their owner.

    Persist it (`load_or_create`) so that a restarted node still owns, and can replace or withdraw,
    the records it announced before.
    """

    def __init__(self, private_key: RSAPrivateKey) -> None:
        self.private_key = private_key
        # Built with THIS key: RSASignatureValidator() would use hivemind's process-wide key, shared
        # by every node in the process, and then one node could sign as another.
        self.validator = RSASignatureValidator(private_key)

    @property
    def subkey(self) -> bytes:
        """The owner marker to store records under (contains the public key)."""
        return self.validator.local_public_key

    @functools.cached_property
    def peer_id(self) -> str:
        """This key's libp2p peer id: the id of a DHT started with it, and the only `peer_id` that
        readers accept in records signed with it."""
        peer_id = owner_peer_id(self.subkey)
        if peer_id is None:  # cannot happen: our own marker always holds our RSA key
            raise ConfigError("this node's owner marker holds no RSA public key")
        return peer_id

    def libp2p_key(self) -> bytes:
        """The private key as libp2p's serialized `PrivateKey` message (what p2pd's -id file holds)."""
        return _libp2p_key_message(self.private_key.to_bytes())  # DER PKCS#1, as hivemind's own identities

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(RSAPrivateKey())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        """Load the key at `path` (DER), or create it there, readable by the owner only."""
        path = Path(path)
        if path.exists():
            return cls(_load_key(path))
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_key.to_bytes())
        os.replace(tmp, path)  # atomic: a crash never leaves half a key behind
        return identity


def _load_key(path: Path) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        # hivemind's own (un)pickling hook: DER bytes -> key, without unpickling anything.
        key.__setstate__({"_private_key": path.read_bytes()})
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"node identity file {path} is not an RSA private key ({e}); move it away to start afresh"
        ) from e
    return key


def _libp2p_key_message(data: bytes) -> bytes:
    """libp2p's `PublicKey`/`PrivateKey` protobuf: {1: key_type = RSA (0), 2: data}, encoded by hand
    (two fields) rather than through hivemind's generated module."""
    length = bytearray()
    n = len(data)
    while True:  # varint
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x08\x00\x12" + bytes(length) + data


def owner_peer_id(subkey: object) -> str | None:
    """The peer id of the RSA key in an owner-marker subkey (`[owner:ssh-rsa ...]`), or None when
    the subkey is no marker (so no signature protects what is stored under it).

    The libp2p peer id of an RSA key is the sha2-256 multihash of its serialized `PublicKey`
    (DER SubjectPublicKeyInfo inside), in base58: the id p2pd derives from the same key.
    """
    return _owner_peer_id(subkey) if isinstance(subkey, bytes) else None


@functools.lru_cache(maxsize=4096)  # readers check the same few subkeys on every refresh
def _owner_peer_id(subkey: bytes) -> str | None:
    match = _OWNER_RE.fullmatch(subkey)
    if match is None:
        return None
    try:
        key = serialization.load_ssh_public_key(match.group(1))
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(_libp2p_key_message(der)).digest()
    return PeerID(b"\x12\x20" + digest).to_base58()  # multihash: sha2-256 (0x12), 32 bytes


_reported: set[tuple[str, str, str]] = set()


def signed_by(subkey: object, peer_id: object, what: str) -> bool:
    """Whether a DHT value stored under `subkey` may speak for `peer_id`: the subkey is an owner
    marker (hivemind checked the value's signature against its key) whose key hashes to `peer_id`.

    A signed value claiming another peer's id is a forgery: logged once (WARNING) per claim.
    """
    signer = owner_peer_id(subkey)
    if signer is None or signer == peer_id:
        return signer is not None
    claim = (what, str(peer_id), signer)
    if claim not in _reported:
        if len(_reported) > 1024:  # bounded: a flood of forgeries must not grow memory
            _reported.clear()
        _reported.add(claim)
        logger.warning("ignoring %s signed by peer %s that claims to be peer %s", what, signer, peer_id)
    return False


# ---------------------------------------------------------------------------------------- DHT I/O ---


async def announce(
    dht: DHT,
    identity: NodeIdentity,
    record: ServerRecord,
    *,
    expiration_time: float,
    timeout: float | None = DHT_TIMEOUT,
    supersede: bool = False,
    num_blocks: int | None = None,
) -> None:
    """Store `record` under every block of its span, signed by `identity`, in one batched DHT call.

    With `num_blocks` (the model's), the node's model registry entry is stored in the same call,
    with the same expiration, so the registry lists the model exactly while its records live.

    `expiration_time` is absolute DHT time (`hivemind.utils.get_dht_time()` + TTL). The DHT keeps, per
    subkey, the value that expires last; with `supersede`, the record is stored to expire just after
    any value this node stored there before (an OFFLINE record of an earlier run, say), so a state
    change always takes. Raises DHTError if the DHT refused or failed to store it for some block.
    """
    value = record.model_dump(mode="json")
    items = {block_key(record.model, b): value for b in record.blocks}
    if num_blocks is not None:
        entry = ModelEntry(peer_id=identity.peer_id, model=record.model, num_blocks=num_blocks)
        items[MODELS_KEY] = entry.model_dump(mode="json")
    keys = list(items)
    store = functools.partial(
        _store_many,
        items=items,
        subkey=identity.subkey,
        expiration=expiration_time,
        supersede=supersede,
    )
    stored = await _run(dht, store, timeout)
    failed = [k for k in keys if not stored.get(k)]
    if failed:
        raise DHTError(f"could not announce {len(failed)} of {len(keys)} blocks ({', '.join(failed[:5])}...)")


async def withdraw(dht: DHT, identity: NodeIdentity, record: ServerRecord) -> None:
    """Best effort: replace our records for `record`'s span with OFFLINE ones; never raises.

    The DHT keeps, per subkey, the value that expires LAST, so the OFFLINE record must expire after
    the one it replaces: it is stored for OFFLINE_TTL past the latest expiration found (or now).
    """
    offline = record.model_copy(update={"state": ServerState.OFFLINE})
    keys = [block_key(record.model, b) for b in record.blocks]
    try:
        replace = functools.partial(
            _replace_own, keys=keys, value=offline.model_dump(mode="json"), subkey=identity.subkey
        )
        await _run(dht, replace, DHT_TIMEOUT)
    except Exception as e:  # leaving must not fail; the old record expires on its own anyway
        logger.warning(
            "could not withdraw %s blocks %d:%d from the DHT: %s", record.model, record.start, record.end, e
        )


async def fetch_records(
    dht: DHT, model: str, blocks: Sequence[int], *, timeout: float | None = DHT_TIMEOUT
) -> dict[int, list[ServerRecord]]:
    """Latest record of every server of each block, in one batched DHT lookup.

    Expired, unsigned, malformed, newer-schema, other-model and other-span values are skipped (logged
    at debug);
    OFFLINE/DRAINING records are returned so that callers see who left. Lists are sorted by peer_id.
    """
    keys = {block_key(model, b): b for b in blocks}
    found = await _run(dht, functools.partial(_get_many, keys=list(keys)), timeout)
    now = get_dht_time()
    return {block: _parse_entries(found.get(key), model, block, now) for key, block in keys.items()}


async def fetch_models(dht: DHT, *, timeout: float | None = DHT_TIMEOUT) -> dict[str, int]:
    """Every model the swarm's nodes announce, with its number of blocks, in one DHT lookup.

    Expired, unsigned, malformed and forged entries (signed by another key than the peer id they
    name) are skipped. Should nodes disagree on a model's block count, the count most of them
    announce wins (ties: the larger), so one wrong entry cannot shrink a model on the page.
    """
    found = await _run(dht, functools.partial(_get_many, keys=[MODELS_KEY]), timeout)
    entry, now = found.get(MODELS_KEY), get_dht_time()
    votes: dict[str, dict[int, int]] = {}
    if entry is not None and isinstance(entry.value, dict):
        for subkey, item in entry.value.items():
            model = _parse_model_entry(subkey, item, now)
            if model is not None:
                counts = votes.setdefault(model.model, {})
                counts[model.num_blocks] = counts.get(model.num_blocks, 0) + 1
    return {m: max(counts, key=lambda n: (counts[n], n)) for m, counts in sorted(votes.items())}


def _parse_model_entry(subkey: Any, item: Any, now: float) -> ModelEntry | None:
    if item.expiration_time < now:
        return None
    try:
        entry = ModelEntry.model_validate(item.value)
    except pydantic.ValidationError:
        logger.debug("skipping malformed model registry entry under %r: %r", subkey, item.value)
        return None
    return entry if signed_by(subkey, entry.peer_id, "model registry entry") else None


async def _run(dht: DHT, fn: Callable[[Any, Any], Awaitable[T]], timeout: float | None) -> T:
    """Run `fn(dht, node)` in the DHT process; every failure, a DHT already shut down too, is a DHTError."""
    try:
        future = dht.run_coroutine(fn, return_future=True)
    except OSError as e:  # the pipe to the DHT process is closed: it was shut down
        raise DHTError(f"the DHT is not running: {e}") from e
    return await dht_call(future, timeout=timeout)


def latest_per_peer(records: Iterable[ServerRecord]) -> list[ServerRecord]:
    """One record per peer: its newest announcement (a node that moved left older ones behind)."""
    latest: dict[str, ServerRecord] = {}
    for record in records:
        seen = latest.get(record.peer_id)
        if seen is None or record.announced_at > seen.announced_at:
            latest[record.peer_id] = record
    return sorted(latest.values(), key=lambda r: (r.start, r.peer_id))


def _parse_entries(entry: Any, model: str, block: int, now: float) -> list[ServerRecord]:
    if entry is None or not isinstance(entry.value, dict):
        return []
    records = []
    for subkey, item in entry.value.items():
        # Unowned subkeys carry no signature, so anyone could have written them: skip those too.
        owned = isinstance(subkey, bytes) and subkey.startswith(_OWNER_PREFIX)
        record = _parse_record(item.value, model, block) if owned and item.expiration_time >= now else None
        if record is not None and not signed_by(subkey, record.peer_id, f"records of {model}"):
            record = None  # signed, but by another key than the peer id it names: a forgery
        if record is None:
            logger.debug("skipping DHT value for %s.%d under %r: %r", model, block, subkey, item)
        else:
            records.append(record)
    return sorted(records, key=lambda r: r.peer_id)


def _parse_record(value: Any, model: str, block: int) -> ServerRecord | None:
    try:
        record = ServerRecord.model_validate(value)
    except pydantic.ValidationError:
        return None
    if record.schema_version > SCHEMA_VERSION or record.model != model or block not in record.blocks:
        return None
    return record


# These run inside the DHT process (DHT.run_coroutine pickles them by reference): one pipe round trip
# and one DHT traversal for a whole span instead of one per block. What they return must pickle:
# if it does not, hivemind never resolves the future.


async def _store_many(
    _dht: DHT,
    node: DHTNode,
    *,
    items: dict[str, dict[str, Any]],
    subkey: bytes,
    expiration: float,
    supersede: bool,
) -> dict[str, bool]:
    keys = list(items)
    if supersede:
        expiration = max(expiration, await _own_latest_expiration(node, keys, subkey) + 1.0)
    # store_many answers per (key, subkey) when subkeys are given
    stored = await node.store_many(keys, list(items.values()), expiration, subkeys=[subkey] * len(keys))
    return {key: bool(stored.get((key, subkey))) for key in keys}


async def _get_many(_dht: DHT, node: DHTNode, *, keys: list[str]) -> dict[str, Any]:
    return dict(await node.get_many(keys, sufficient_expiration_time=float("inf")))


async def _replace_own(
    _dht: DHT, node: DHTNode, *, keys: list[str], value: dict[str, Any], subkey: bytes
) -> None:
    latest = await _own_latest_expiration(node, keys, subkey)
    await node.store_many(keys, [value] * len(keys), latest + OFFLINE_TTL, subkeys=[subkey] * len(keys))


async def _own_latest_expiration(node: DHTNode, keys: list[str], subkey: bytes) -> float:
    """The latest expiration of this node's values under `keys`, or now when it has none."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    latest = get_dht_time()
    for entry in found.values():
        own = entry.value.get(subkey) if entry is not None and isinstance(entry.value, dict) else None
        if own is not None:
            latest = max(latest, own.expiration_time)
    return latest
