"""DHT record schema, keys and identities; announce/fetch/withdraw over real hivemind DHTs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from swarm.dht import dht_call, start_dht, visible_maddrs
from swarm.errors import ConfigError, DHTError
from swarm.records import (
    SCHEMA_VERSION,
    NodeIdentity,
    ServerRecord,
    ServerState,
    announce,
    block_key,
    fetch_records,
    meta_key,
    withdraw,
)

TTL = 60.0


def make_record(**overrides: Any) -> ServerRecord:
    fields: dict[str, Any] = {
        "state": ServerState.ONLINE,
        "peer_id": "QmPeerA",
        "grpc_address": "127.0.0.1:50051",
        "model": "tiny-llama",
        "start": 0,
        "end": 4,
        "compute_throughput": 1500.0,
        "software_version": "0.1.0",
    }
    fields.update(overrides)
    return ServerRecord(**fields)


# --------------------------------------------------------------------------------------- schema ---


def test_keys() -> None:
    assert block_key("bigscience/bloom", 7) == "bigscience/bloom.7"
    assert meta_key("bigscience/bloom") == "bigscience/bloom.meta"


def test_record_round_trips_through_json_and_ignores_unknown_fields() -> None:
    record = make_record(trainable_stage=2, quant="int8")
    value = record.model_dump(mode="json")
    assert value["state"] == "online" and value["schema_version"] == SCHEMA_VERSION
    assert ServerRecord.model_validate(value) == record
    newer = {**value, "gpu_name": "H100", "schema_version": SCHEMA_VERSION}
    assert ServerRecord.model_validate(newer) == record
    assert record.blocks == range(0, 4)
    with pytest.raises(pydantic.ValidationError):
        record.start = 3  # frozen


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"start": 4, "end": 4}, "span .* is empty"),
        ({"start": -1}, "greater than or equal to 0"),
        ({"compute_throughput": -1.0}, "greater than or equal to 0"),
        ({"network_throughput": float("nan")}, "finite number"),
        ({"free_cache_tokens": -5}, "greater than or equal to 0"),
        ({"grpc_address": "localhost"}, "host:port"),
        ({"grpc_address": "host:0"}, "host:port"),
        ({"grpc_address": "host:70000"}, "host:port"),
        ({"grpc_address": ":80"}, "host:port"),
        ({"grpc_address": "::1:80"}, "host:port"),
        ({"state": "sleeping"}, "state"),
        ({"model": ""}, "at least 1 character"),
    ],
)
def test_record_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        make_record(**overrides)


def test_ipv6_address_in_brackets_is_fine() -> None:
    assert make_record(grpc_address="[::1]:8080").grpc_address == "[::1]:8080"


# ------------------------------------------------------------------------------------- identity ---


def test_identity_persists_and_still_owns_its_records(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = NodeIdentity.load_or_create(path)
    again = NodeIdentity.load_or_create(path)
    assert first.subkey == again.subkey and first.subkey.startswith(b"[owner:ssh-rsa ")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert NodeIdentity.generate().subkey != first.subkey
    # A value signed by the reloaded key passes another node's validator; the same value under
    # another owner's subkey does not.
    record = DHTRecord(b"key", MSGPackSerializer.dumps(first.subkey), b"value", get_dht_time() + 10)
    signed = DHTRecord(record.key, record.subkey, again.validator.sign_value(record), record.expiration_time)
    other = RSASignatureValidator(RSAPrivateKey())
    assert other.validate(signed)
    stolen = DHTRecord(
        b"key", MSGPackSerializer.dumps(other.local_public_key), signed.value, signed.expiration_time
    )
    assert not other.validate(stolen)


def test_corrupt_identity_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=f"{path} is not an RSA private key"):
        NodeIdentity.load_or_create(path)


# ------------------------------------------------------------------------------------------ DHT ---


class Swarm:
    """Three full DHT peers, each in its own process, with its own key."""

    def __init__(self) -> None:
        self.ids = {name: NodeIdentity.generate() for name in "ABC"}
        self.dhts: dict[str, DHT] = {}
        self.dhts["A"] = start_dht(identity=self.ids["A"], startup_timeout=60)
        peers = visible_maddrs(self.dhts["A"])
        for name in "BC":
            self.dhts[name] = start_dht(initial_peers=peers, identity=self.ids[name], startup_timeout=60)

    def shutdown(self) -> None:
        for dht in self.dhts.values():
            dht.shutdown()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    s = Swarm()
    yield s
    s.shutdown()


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = 15.0) -> None:
    """Poll `check` until it is true; fail after `deadline` seconds (DHT propagation is asynchronous)."""
    stop = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < stop, "condition not reached before the deadline"
        await asyncio.sleep(0.1)


async def test_announce_then_fetch_from_other_peers(swarm: Swarm) -> None:
    record = make_record(model="m-fetch", start=1, end=3)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + TTL)
    for name in "BC":
        found = await fetch_records(swarm.dhts[name], "m-fetch", [0, 1, 2, 3])
        assert found == {0: [], 1: [record], 2: [record], 3: []}


async def test_records_expire(swarm: Swarm) -> None:
    record = make_record(model="m-expiry", start=0, end=1)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + 1.5)
    assert (await fetch_records(swarm.dhts["B"], "m-expiry", [0]))[0] == [record]

    async def gone() -> bool:
        return (await fetch_records(swarm.dhts["B"], "m-expiry", [0]))[0] == []

    await eventually(gone)


async def test_several_servers_per_block_and_bad_values_are_skipped(swarm: Swarm) -> None:
    model, exp = "m-many", get_dht_time() + TTL
    a = make_record(model=model, start=0, end=2)
    b = make_record(model=model, start=1, end=3, peer_id="QmPeerB", grpc_address="127.0.0.1:50052")
    await announce(swarm.dhts["A"], swarm.ids["A"], a, expiration_time=exp)
    await announce(swarm.dhts["B"], swarm.ids["B"], b, expiration_time=exp)
    # C publishes junk under its own (valid) subkey: malformed, another model, a span that does not
    # hold the block, a schema from the future; and a fine record under an unowned (unsigned) subkey.
    good = make_record(model=model, start=0, end=4).model_dump(mode="json")
    junk = [
        (0, {"hello": "world"}, swarm.ids["C"].subkey),
        (1, {**good, "model": "other"}, swarm.ids["C"].subkey),
        (2, {**good, "start": 5, "end": 6}, swarm.ids["C"].subkey),
        (3, {**good, "schema_version": SCHEMA_VERSION + 1}, swarm.ids["C"].subkey),
        (1, good, b"anonymous"),
    ]
    for block, value, subkey in junk:
        future = swarm.dhts["C"].store(block_key(model, block), value, exp, subkey=subkey, return_future=True)
        assert await dht_call(future)
    found = await fetch_records(swarm.dhts["A"], model, [0, 1, 2, 3])
    assert found == {0: [a], 1: [a, b], 2: [b], 3: []}


async def test_withdraw_marks_the_records_offline(swarm: Swarm) -> None:
    record = make_record(model="m-withdraw", start=0, end=2)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + TTL)
    await withdraw(swarm.dhts["A"], swarm.ids["A"], record)
    found = await fetch_records(swarm.dhts["C"], "m-withdraw", [0, 1])
    assert [r.state for rs in found.values() for r in rs] == [ServerState.OFFLINE] * 2


async def test_peer_cannot_store_under_another_peers_subkey(swarm: Swarm) -> None:
    model, exp = "m-forge", get_dht_time() + TTL
    genuine = make_record(model=model, start=0, end=1)
    await announce(swarm.dhts["A"], swarm.ids["A"], genuine, expiration_time=exp)
    forged = genuine.model_copy(update={"grpc_address": "6.6.6.6:666"}).model_dump(mode="json")
    stored = await dht_call(
        swarm.dhts["B"].store(
            block_key(model, 0), forged, exp + 10, subkey=swarm.ids["A"].subkey, return_future=True
        )
    )
    assert stored is False
    for name in "ABC":
        assert (await fetch_records(swarm.dhts[name], model, [0]))[0] == [genuine]


async def test_tampered_signed_values_are_rejected_by_every_honest_peer(swarm: Swarm) -> None:
    model, exp = "m-tamper", get_dht_time() + TTL
    genuine = make_record(model=model, start=0, end=1)
    await announce(swarm.dhts["A"], swarm.ids["A"], genuine, expiration_time=exp)
    key, subkey = block_key(model, 0), swarm.ids["A"].subkey
    value = MSGPackSerializer.dumps(genuine.model_dump(mode="json"))
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), value, exp)
    signed = swarm.ids["A"].validator.sign_value(record)
    evil = MSGPackSerializer.dumps(
        genuine.model_copy(update={"grpc_address": "6.6.6.6:666"}).model_dump(mode="json")
    )
    attacks = [
        (evil + signed[len(value) :], exp + 10),  # A's signature on other content
        (signed, exp + 1000),  # A's exact bytes, replayed with a later expiration
    ]
    for raw, expiration in attacks:
        # B (malicious) poisons its own storage and pushes the bytes straight to every peer it knows.
        push = functools.partial(_push_raw, key=key, subkey=subkey, raw=raw, expiration=expiration)
        replies = await dht_call(swarm.dhts["B"].run_coroutine(push, return_future=True), timeout=30)
        assert replies and all(reply == [False] for reply in replies), replies
    for name in "AC":
        assert (await fetch_records(swarm.dhts[name], model, [0]))[0] == [genuine]


async def _push_raw(
    _dht: DHT, node: DHTNode, *, key: str, subkey: bytes, raw: bytes, expiration: float
) -> list[Any]:
    """Runs inside B's DHT process, bypassing its signing: what a modified client could do."""
    key_id = DHTID.generate(source=key)
    node.protocol.storage.store_subkey(key_id, subkey, raw, expiration)
    peers = list(node.protocol.routing_table.peer_id_to_uid)
    replies = [
        await node.protocol.call_store(p, [key_id], [raw], expiration, subkeys=[subkey]) for p in peers
    ]
    return [None if r is None else list(r) for r in replies]  # protobuf containers do not pickle


# ----------------------------------------------------------------------------------- start_dht ---


def test_start_dht_rejects_a_malformed_initial_peer() -> None:
    with pytest.raises(DHTError, match="not a full multiaddr"):
        start_dht(initial_peers=["/ip4/127.0.0.1/tcp/1"])


def test_start_dht_explains_an_unreachable_initial_peer(swarm: Swarm) -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/" + visible_maddrs(swarm.dhts["A"])[0].rsplit("/p2p/", 1)[1]
    with pytest.raises(DHTError, match="initial peers reachable") as info:
        start_dht(initial_peers=[dead], startup_timeout=30)
    assert "p2pd" in str(info.value)


def test_start_dht_explains_a_port_in_use(swarm: Swarm) -> None:
    port = int(visible_maddrs(swarm.dhts["A"])[0].split("/tcp/")[1].split("/")[0])
    with pytest.raises(DHTError, match=f"another node using port {port}"):
        start_dht(port=port, startup_timeout=30).shutdown()  # (shut down should it ever start)


async def test_dht_call_turns_timeouts_and_failures_into_dht_errors() -> None:
    with pytest.raises(DHTError, match=r"did not answer within 0\.05 s"):
        await dht_call(concurrent.futures.Future(), timeout=0.05)
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(RuntimeError("boom"))
    with pytest.raises(DHTError, match="RuntimeError: boom"):
        await dht_call(failed)
