"""DHT record schema, keys and identities; announce/fetch/withdraw over real hivemind DHTs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
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
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from swarm import tls
from swarm.dht import dht_call, start_dht, visible_maddrs
from swarm.errors import ConfigError, DHTError
from swarm.records import (
    MODELS_KEY,
    SCHEMA_VERSION,
    NodeIdentity,
    ServerRecord,
    ServerState,
    announce,
    block_key,
    fetch_models,
    fetch_records,
    meta_key,
    owner_peer_id,
    withdraw,
)
from swarm.training.export import _reported_epochs
from swarm.training.peers import DHTMembership, membership_key
from swarm.training.stages import run_id

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

    def record(self, name: str, **overrides: Any) -> ServerRecord:
        """A record of peer `name`, naming its own (key-bound) peer id."""
        return make_record(peer_id=self.ids[name].peer_id, **overrides)

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
    record = swarm.record("A", model="m-fetch", start=1, end=3)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + TTL)
    for name in "BC":
        found = await fetch_records(swarm.dhts[name], "m-fetch", [0, 1, 2, 3])
        assert found == {0: [], 1: [record], 2: [record], 3: []}


async def test_records_expire(swarm: Swarm) -> None:
    record = swarm.record("A", model="m-expiry", start=0, end=1)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + 1.5)
    assert (await fetch_records(swarm.dhts["B"], "m-expiry", [0]))[0] == [record]

    async def gone() -> bool:
        return (await fetch_records(swarm.dhts["B"], "m-expiry", [0]))[0] == []

    await eventually(gone)


async def test_several_servers_per_block_and_bad_values_are_skipped(swarm: Swarm) -> None:
    model, exp = "m-many", get_dht_time() + TTL
    a = swarm.record("A", model=model, start=0, end=2)
    b = swarm.record("B", model=model, start=1, end=3, grpc_address="127.0.0.1:50052")
    await announce(swarm.dhts["A"], swarm.ids["A"], a, expiration_time=exp)
    await announce(swarm.dhts["B"], swarm.ids["B"], b, expiration_time=exp)
    # C publishes junk under its own (valid) subkey: malformed, another model, a span that does not
    # hold the block, a schema from the future; and a fine record under an unowned (unsigned) subkey.
    good = swarm.record("C", model=model, start=0, end=4).model_dump(mode="json")
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
    assert found == {0: [a], 1: sorted([a, b], key=lambda r: r.peer_id), 2: [b], 3: []}


async def test_withdraw_marks_the_records_offline(swarm: Swarm) -> None:
    record = swarm.record("A", model="m-withdraw", start=0, end=2)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=get_dht_time() + TTL)
    await withdraw(swarm.dhts["A"], swarm.ids["A"], record)
    found = await fetch_records(swarm.dhts["C"], "m-withdraw", [0, 1])
    assert [r.state for rs in found.values() for r in rs] == [ServerState.OFFLINE] * 2


async def test_peer_cannot_store_under_another_peers_subkey(swarm: Swarm) -> None:
    model, exp = "m-forge", get_dht_time() + TTL
    genuine = swarm.record("A", model=model, start=0, end=1)
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
    genuine = swarm.record("A", model=model, start=0, end=1)
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


# ------------------------------------------------------------------ identities bound to keys ---


def test_a_peer_id_is_the_identity_of_its_key(swarm: Swarm) -> None:
    for name in "ABC":
        identity = swarm.ids[name]
        assert identity.peer_id == PeerID.from_identity(identity.libp2p_key()).to_base58()
        assert str(swarm.dhts[name].peer_id) == identity.peer_id == owner_peer_id(identity.subkey)
    assert owner_peer_id(b"anonymous") is None and owner_peer_id(b"[owner:ssh-rsa AAAA]") is None


async def test_a_record_under_another_peers_id_is_rejected_by_every_reader(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    """B signs, with its own key, a newer record that claims to be A: it would replace A's record in
    every swarm map (one record per peer id, the newest) and send A's clients to B."""
    model, exp = "m-impostor", get_dht_time() + TTL
    genuine = swarm.record("A", model=model, start=0, end=2, announced_at=time.time())
    await announce(swarm.dhts["A"], swarm.ids["A"], genuine, expiration_time=exp)
    impostor = genuine.model_copy(update={"grpc_address": "6.6.6.6:666", "announced_at": time.time() + 60})
    await announce(swarm.dhts["B"], swarm.ids["B"], impostor, expiration_time=exp)  # the DHT takes it
    with caplog.at_level(logging.WARNING, logger="swarm.records"):
        for name in "ABC":
            found = await fetch_records(swarm.dhts[name], model, [0, 1])
            assert found == {0: [genuine], 1: [genuine]}, name
    claims = [r.getMessage() for r in caplog.records if swarm.ids["A"].peer_id in r.getMessage()]
    assert claims and all(swarm.ids["B"].peer_id in c for c in claims)


async def test_the_model_registry_lists_only_entries_signed_by_their_peer(swarm: Swarm) -> None:
    """What `swarm monitor` discovers models by: A's announcement lists its model; B's entry that
    claims to be A, C's malformed entry and an unsigned one list nothing."""
    exp = get_dht_time() + TTL
    record = swarm.record("A", model="m-registry", start=0, end=2)
    await announce(swarm.dhts["A"], swarm.ids["A"], record, expiration_time=exp, num_blocks=6)
    bad = [
        (
            "B",
            swarm.ids["B"].subkey,
            {"peer_id": swarm.ids["A"].peer_id, "model": "m-forged", "num_blocks": 3},
        ),
        ("C", swarm.ids["C"].subkey, {"peer_id": swarm.ids["C"].peer_id, "model": "m-bad", "num_blocks": 0}),
        ("C", b"anonymous", {"peer_id": swarm.ids["C"].peer_id, "model": "m-unsigned", "num_blocks": 3}),
    ]
    for writer, subkey, value in bad:
        future = swarm.dhts[writer].store(MODELS_KEY, value, exp, subkey=subkey, return_future=True)
        assert await dht_call(future) is True  # the DHT takes them; readers must not
    for name in "ABC":
        assert await fetch_models(swarm.dhts[name], timeout=30) == {"m-registry": 6}, name


async def test_forged_membership_entries_are_rejected_by_every_reader(swarm: Swarm) -> None:
    """Training membership (who averages with whom, and at which epoch): C cannot add, move or
    withdraw A, nor report an epoch for it; an unsigned entry counts for nobody."""
    model, stage = "m-members", 0
    run = run_id(model, stage)
    pin = "ab" * 32  # A serves TLS: its signed entry pins its certificate
    a = DHTMembership(swarm.dhts["A"], swarm.ids["A"], run, swarm.ids["A"].peer_id, "127.0.0.1:1001", pin)
    a.epoch = 3
    await a.publish(ttl=TTL)
    b = DHTMembership(swarm.dhts["B"], swarm.ids["B"], run, swarm.ids["B"].peer_id, "127.0.0.1:1002")
    await b.publish(ttl=TTL)
    # C, with its own valid key, writes an entry that claims A's id: moved elsewhere, far ahead, left.
    forged = DHTMembership(swarm.dhts["C"], swarm.ids["C"], run, swarm.ids["A"].peer_id, "6.6.6.6:666")
    forged.epoch = 99
    await forged.publish(ttl=TTL + 5, left=True)
    ghost = {"peer_id": "QmGhost", "address": "6.6.6.6:667", "epoch": 100, "left": False}
    key = membership_key(run)
    stored = swarm.dhts["C"].store(key, ghost, exp_in(TTL), subkey=b"ghost", return_future=True)
    assert await dht_call(stored)
    for name in "ABC":
        me = swarm.ids[name].peer_id
        reader = DHTMembership(swarm.dhts[name], swarm.ids[name], run, me, "127.0.0.1:1")
        expected = {
            swarm.ids["A"].peer_id: tls.Endpoint("127.0.0.1:1001", pin),
            swarm.ids["B"].peer_id: tls.Endpoint("127.0.0.1:1002"),
        }
        assert await reader.members() == {p: e for p, e in expected.items() if p != me}, name
        epochs = await _reported_epochs(swarm.dhts[name], model, stage, timeout=30)
        assert epochs == {swarm.ids["A"].peer_id: 3, swarm.ids["B"].peer_id: 0}, name


def exp_in(seconds: float) -> float:
    return get_dht_time() + seconds


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


async def test_a_caller_that_stops_waiting_leaves_the_dht_request_to_finish() -> None:
    # hivemind's DHT process logs an ERROR with tracebacks when it answers a cancelled future
    pending: concurrent.futures.Future[int] = concurrent.futures.Future()
    waiter = asyncio.ensure_future(dht_call(pending))
    await asyncio.wait([waiter], timeout=0)  # let it start waiting
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not pending.cancelled()
    timed_out: concurrent.futures.Future[int] = concurrent.futures.Future()
    with pytest.raises(DHTError):
        await dht_call(timed_out, timeout=0.01)
    assert not timed_out.cancelled()
    pending.set_result(1)  # the DHT answers later: dropped without complaint
    timed_out.set_exception(RuntimeError("late failure"))
