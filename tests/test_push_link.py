"""Server-to-server push, piece by piece: which copy of an input a session computes on (pure
bookkeeping), and a node's push link to a real TLS gRPC server, pinned like every other dial."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import pytest

from swarm import tls
from swarm._proto import swarm_pb2
from swarm.errors import LimitExceeded, ProtocolError
from swarm.node.push import MAX_QUEUED_PUSHES, PUSH_ID_BYTES, PushChannels, PushInputs, PushLink, SessionInbox
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server


def tensor(tag: int) -> swarm_pb2.Tensor:
    return swarm_pb2.Tensor(data=bytes([tag]), shape=[1, 1, 1])


def pushed(step_id: int) -> swarm_pb2.InferenceStep:
    return swarm_pb2.InferenceStep(step_id=step_id, position=step_id, pushed=True)


def push(step_id: int, tag: int) -> swarm_pb2.PushMessage:
    return swarm_pb2.PushMessage(push_id=b"p" * PUSH_ID_BYTES, step_id=step_id, hidden_states=tensor(tag))


def test_a_push_after_its_step_feeds_it_and_the_clients_late_copy_is_dropped() -> None:
    inputs = PushInputs()
    assert inputs.on_step(pushed(1)) == (None, False)  # wait for the push
    assert inputs.on_push(push(1, 7)) == tensor(7)
    inputs.computed(1)
    copy = swarm_pb2.InferenceStep(step_id=1, position=1, hidden_states=tensor(7))
    assert inputs.is_late_copy(copy)


def test_a_push_before_its_step_is_kept_until_the_step_comes() -> None:
    inputs = PushInputs()
    assert inputs.on_push(push(2, 5)) is None  # no step yet
    assert inputs.on_step(pushed(2)) == (tensor(5), True)


def test_the_clients_copy_first_makes_the_push_stale() -> None:
    inputs = PushInputs()
    inputs.on_step(pushed(3))
    copy = swarm_pb2.InferenceStep(step_id=3, position=3, hidden_states=tensor(9))
    assert inputs.on_step(copy) == (tensor(9), False)
    inputs.computed(3)
    assert inputs.on_push(push(3, 9)) is None  # computed already: dropped
    assert inputs.on_step(pushed(4)) == (None, False)  # and not taken for a later step


def test_a_new_step_while_one_waits_for_its_input_is_refused() -> None:
    inputs = PushInputs()
    inputs.on_step(pushed(1))
    with pytest.raises(ProtocolError, match="step 2 sent while step 1 still waits"):
        inputs.on_step(pushed(2))


def test_early_pushes_are_bounded() -> None:
    inputs = PushInputs()
    for step in range(1, MAX_QUEUED_PUSHES + 3):
        inputs.on_push(push(step, step))
    assert inputs.on_step(pushed(1)) == (None, False)  # the oldest went first


async def allow_all(target: swarm_pb2.PushTarget, next_block: int) -> bool:
    return True


async def never() -> AsyncIterator[swarm_pb2.InferenceRequest]:
    await asyncio.Event().wait()
    yield swarm_pb2.InferenceRequest()  # pragma: no cover


async def test_a_session_inbox_bounds_the_pushes_waiting_for_it() -> None:
    inbox = SessionInbox(never())
    try:
        for step in range(MAX_QUEUED_PUSHES):
            inbox.deliver(push(step + 1, 0))
        with pytest.raises(LimitExceeded, match=f"at most {MAX_QUEUED_PUSHES}"):
            inbox.deliver(push(99, 0))
        assert (await inbox.get()) == push(1, 0)
    finally:
        await inbox.close()


async def test_a_push_link_delivers_over_pinned_tls_and_refuses_another_certificate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert = tls.NodeCertificate.generate("peer-b")
    servicer = BlockServicer(None, "m", "peer-b", ServerLimits(1, 1, 1, 1 << 20, 1.0))
    server, port, _ = await start_grpc_server(servicer, "127.0.0.1", 0, 1 << 20, certificate=cert)
    push_id = os.urandom(PUSH_ID_BYTES)
    inbox = servicer._push_inboxes[push_id] = SessionInbox(never())  # as an open session registers
    channels = PushChannels(allow_all)  # what is dialled is checked in the tests below; here: the dial
    target = swarm_pb2.PushTarget(
        address=f"127.0.0.1:{port}", tls_cert_sha256=cert.sha256, peer_id="peer-b", push_id=push_id, step_id=1
    )
    wrong = swarm_pb2.PushTarget()
    wrong.CopyFrom(target)
    wrong.tls_cert_sha256 = tls.NodeCertificate.generate("peer-b").sha256
    right_link, wrong_link = PushLink(channels, 3), PushLink(channels, 3)
    try:
        right_link.prepare(target)
        wrong_link.prepare(wrong)
        for link in (right_link, wrong_link):  # the dials run beside the step: wait for them here
            assert link._opening is not None
            await asyncio.wait({link._opening}, timeout=10)
        assert await right_link.send(target, tensor(0)) is True
        got = await asyncio.wait_for(inbox.get(), timeout=10)
        assert isinstance(got, swarm_pb2.PushMessage) and got.step_id == 1 and got.hidden_states == tensor(0)
        with caplog.at_level(logging.INFO, logger="swarm.node.push"):
            assert await wrong_link.send(wrong, tensor(0)) is False  # the pin does not match: no push
        assert "could not open a push stream to peer-b" in caplog.text
        assert "refusing it" in caplog.text
    finally:
        right_link.close()
        wrong_link.close()
        await inbox.close()
        await channels.close()
        await server.stop(grace=None)
