"""Which push targets a node dials: only the next hop that the swarm's signed records announce
(the matching rules, pure), the gate's cache and its one log line per refused target, and a link
to a target that is refused never opening a connection."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from swarm._proto import swarm_pb2
from swarm.errors import DHTError
from swarm.node.push import (
    PushChannels,
    PushGate,
    PushLink,
    record_mismatch,
    refuse_all,
    target_refusal,
)
from swarm.records import ServerRecord, ServerState
from tests.servers import accepted
from tests.servers import listener as listener  # the fixture

PIN = "ab" * 32
NEXT = 4  # the session ends at block 4: the next hop's span starts there


def record(**changes: object) -> ServerRecord:
    fields: dict[str, object] = {
        "state": ServerState.ONLINE,
        "peer_id": "peer-b",
        "grpc_address": "10.0.0.2:31337",
        "model": "m",
        "start": NEXT,
        "end": 8,
        "software_version": "test",
        "tls_cert_sha256": PIN,
        "announced_at": 100.0,
    }
    return ServerRecord.model_validate({**fields, **changes})


def target(**changes: object) -> swarm_pb2.PushTarget:
    fields: dict[str, object] = {
        "address": "10.0.0.2:31337",
        "tls_cert_sha256": PIN,
        "peer_id": "peer-b",
        "push_id": b"p" * 16,
        "step_id": 1,
    }
    return swarm_pb2.PushTarget(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_record_of_the_next_hop_vouches_for_its_exact_target() -> None:
    assert record_mismatch(record(), target(), NEXT) is None
    entered_mid_span = record(start=2)  # a route may use a node of blocks 2:8 from block 4 on
    assert record_mismatch(entered_mid_span, target(), NEXT) is None
    plain = record(tls_cert_sha256=None)  # a --no-tls node: an empty pin is its exact target
    assert record_mismatch(plain, target(tls_cert_sha256=""), NEXT) is None


@pytest.mark.parametrize(
    ("rec", "tgt", "why"),
    [
        (record(), target(peer_id="peer-x"), "record is of peer peer-b, not peer-x"),
        (record(), target(address="127.0.0.1:22"), "announces address 10.0.0.2:31337, not 127.0.0.1:22"),
        (record(), target(tls_cert_sha256="cd" * 32), f"pins certificate {PIN}, not {'cd' * 32}"),
        (record(), target(tls_cert_sha256=""), f"pins certificate {PIN}, not none (plaintext)"),
        (record(tls_cert_sha256=None), target(), f"pins certificate none (plaintext), not {PIN}"),
        (record(start=5), target(), "serves blocks 5:8, not block 4"),
        (record(start=0, end=4), target(), "serves blocks 0:4, not block 4"),
        (record(state=ServerState.OFFLINE), target(), "is offline, not online"),
        (record(state=ServerState.DRAINING), target(), "is draining, not online"),
        (record(state=ServerState.JOINING), target(), "is joining, not online"),
    ],
)
def test_a_record_that_differs_in_any_field_does_not_vouch(
    rec: ServerRecord, tgt: swarm_pb2.PushTarget, why: str
) -> None:
    got = record_mismatch(rec, tgt, NEXT)
    assert got is not None and why in got


def test_the_peers_newest_record_decides_and_other_peers_records_do_not_count() -> None:
    assert target_refusal([record(peer_id="peer-c")], target(), NEXT) == (
        "no signed record of peer peer-b serves block 4"
    )
    assert target_refusal([], target(peer_id=""), NEXT) == "no signed record of peer (none) serves block 4"
    left = [record(), record(state=ServerState.OFFLINE, announced_at=200.0), record(peer_id="peer-c")]
    assert "is offline" in (target_refusal(left, target(), NEXT) or "")
    back = [record(state=ServerState.OFFLINE), record(announced_at=200.0)]
    assert target_refusal(back, target(), NEXT) is None


class Lookups:
    """A record source that counts its lookups (the DHT's place in these unit tests)."""

    def __init__(self, records: list[ServerRecord], fail: bool = False) -> None:
        self.records, self.fail, self.calls = records, fail, 0
        self.release, self.started = asyncio.Event(), asyncio.Event()
        self.release.set()

    async def __call__(self, block: int) -> list[ServerRecord]:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise DHTError("the DHT did not answer within 5.0 s")
        return [r for r in self.records if block in r.blocks]


async def test_answers_are_cached_for_the_ttl_and_concurrent_checks_share_one_lookup() -> None:
    now = [0.0]
    lookups = Lookups([record()])
    gate = PushGate(lookups, ttl=30.0, clock=lambda: now[0])
    lookups.release.clear()
    first = [asyncio.ensure_future(gate.allowed(target(), NEXT)) for _ in range(5)]
    await lookups.started.wait()  # the first one's lookup runs: all five asked by now (tasks run in order)
    lookups.release.set()
    assert await asyncio.gather(*first) == [True] * 5
    assert lookups.calls == 1
    assert await gate.allowed(target(push_id=b"q" * 16, step_id=7), NEXT)  # another session, same node
    assert await gate.allowed(target(address="10.0.0.9:1"), NEXT) is False
    assert lookups.calls == 2
    now[0] = 29.0
    assert await gate.allowed(target(address="10.0.0.9:1"), NEXT) is False  # a refusal is cached too
    assert lookups.calls == 2
    now[0] = 31.0
    assert await gate.allowed(target(), NEXT)
    assert lookups.calls == 3


async def test_the_cache_is_bounded() -> None:
    lookups = Lookups([record()])
    gate = PushGate(lookups, max_entries=2)
    for port in (1, 2, 3):
        await gate.allowed(target(address=f"10.0.0.9:{port}"), NEXT)
    await gate.allowed(target(address="10.0.0.9:3"), NEXT)  # still cached
    assert lookups.calls == 3
    await gate.allowed(target(address="10.0.0.9:1"), NEXT)  # the oldest went out
    assert lookups.calls == 4


async def test_a_refused_target_is_logged_once_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    gate = PushGate(Lookups([record()]), ttl=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="swarm.node.push"):
        for step in range(5):
            now[0] = float(step * 2)  # past the ttl every time: looked up again, not logged again
            assert await gate.allowed(target(tls_cert_sha256="cd" * 32), NEXT) is False
    lines = [r for r in caplog.records if r.name == "swarm.node.push"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, caplog.text
    assert "not pushing to 10.0.0.2:31337 (peer peer-b)" in lines[0].getMessage()
    assert f"pins certificate {PIN}" in lines[0].getMessage()


async def test_a_dht_that_does_not_answer_refuses_the_target(caplog: pytest.LogCaptureFixture) -> None:
    gate = PushGate(Lookups([record()], fail=True))
    with caplog.at_level(logging.INFO, logger="swarm.node.push"):
        assert await gate.allowed(target(), NEXT) is False
    assert "could not be read from the DHT (the DHT did not answer within 5.0 s)" in caplog.text


async def test_a_refused_target_is_never_dialled(listener: socket.socket) -> None:
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    forged = target(address=address, tls_cert_sha256="")  # plaintext, to anywhere: the old hole
    gate = PushGate(Lookups([record()]))
    for allowed in (gate.allowed, refuse_all):
        channels = PushChannels(allowed)
        link = PushLink(channels, NEXT)
        try:
            link.prepare(forged)
            assert link._opening is not None
            await asyncio.wait({link._opening}, timeout=10)
            assert await link.send(forged, swarm_pb2.Tensor(data=b"x", shape=[1, 1, 1])) is False
            assert link.refused
        finally:
            link.close()
            await channels.close()
    assert accepted(listener) == 0
