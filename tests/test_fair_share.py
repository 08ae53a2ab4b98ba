"""One client connection cannot take a node's whole KV cache or adapter store: a greedy client that
opens sessions in a loop is refused at its share, and a second client still gets served (real gRPC
on 127.0.0.1); one that loads adapters in a loop evicts its own, not the other clients'."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import torch

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import LimitExceeded
from swarm.models.llama import LayerCache, LlamaBlock, LlamaConfig
from swarm.node.adapters import Adapter, AdapterCache
from swarm.node.backend import BlockBackend, CacheBudget
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server

CONFIG = LlamaConfig.from_hf_dict(
    {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
)
SESSION_LENGTH = 16
SESSION_BYTES = 2 * LayerCache.bytes_needed(CONFIG, 1, SESSION_LENGTH, torch.float32)
BUDGET_SESSIONS = 8
TIMEOUT = 30.0
# Separate channels must be separate connections: gRPC would otherwise share one between them.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def test_budget_caps_an_owner_beyond_its_first_session() -> None:
    budget = CacheBudget(100, share=0.5)
    budget.reserve(80, "greedy")  # a first session may be large
    with pytest.raises(LimitExceeded, match=re.escape("at most 50 (50%) beyond its first session")):
        budget.reserve(10, "greedy")
    budget.reserve(20, "other")
    budget.release(80, "greedy")
    budget.reserve(30, "greedy")
    budget.reserve(20, "greedy")
    assert budget.held == {"greedy": 50, "other": 20} and budget.used == 70
    budget.release(50, "greedy")
    assert budget.held == {"other": 20}


def test_a_greedy_client_evicts_its_own_adapters_not_the_others() -> None:
    store = AdapterCache(budget_bytes=100, share=0.5)
    store._keep(Adapter("theirs", {}, 30), owner="polite")
    for i in range(10):  # a client loading adapters in a loop through one connection
        store._keep(Adapter(f"mine-{i}", {}, 20), owner="greedy")
        assert store.get("theirs").nbytes == 30
        assert store.used <= 30 + 50
    assert store.get("mine-9") and len(store) == 3  # its two newest, within its half


@pytest.fixture
async def node() -> AsyncIterator[str]:
    torch.manual_seed(0)
    blocks = [LlamaBlock(CONFIG) for _ in range(CONFIG.num_hidden_layers)]
    backend = BlockBackend(
        CONFIG,
        blocks,
        0,
        dtype=torch.float32,
        device=torch.device("cpu"),
        cache_bytes=BUDGET_SESSIONS * SESSION_BYTES,
        cache_share=0.5,
    )
    limits = ServerLimits(
        max_batch=4, max_tokens=256, max_session_length=64, max_message_bytes=1 << 22, session_idle_timeout=30
    )
    server, port, _ = await start_grpc_server(
        BlockServicer(backend, "tiny", "peer", limits), "127.0.0.1", 0, limits.max_message_bytes
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        backend.shutdown()


async def open_session(channel: grpc.aio.Channel) -> Any:
    """Open an Inference session and run its first step; the open call (raises if refused)."""
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION, model="tiny", span=swarm_pb2.Span(start=0, end=2)
    )
    first = swarm_pb2.InferenceRequest(
        header=header,
        open=swarm_pb2.InferenceOpen(max_length=SESSION_LENGTH, batch_size=1),
        step=swarm_pb2.InferenceStep(hidden_states=wire.encode_tensor(torch.randn(1, 2, CONFIG.hidden_size))),
    )
    call: Any = channel.stream_stream(
        "/swarm.v1.BlockService/Inference",
        request_serializer=swarm_pb2.InferenceRequest.SerializeToString,
        response_deserializer=swarm_pb2.InferenceResponse.FromString,
    )(timeout=TIMEOUT)
    await call.write(first)
    reply = await call.read()
    assert reply.length == 2
    return call


async def test_a_greedy_client_does_not_lock_out_the_next(node: str) -> None:
    async with (
        grpc.aio.insecure_channel(node, options=OWN_CONNECTION) as greedy,
        grpc.aio.insecure_channel(node, options=OWN_CONNECTION) as polite,
    ):
        held = []
        for _ in range(3 * BUDGET_SESSIONS):  # bounded: it must be refused long before this
            try:
                held.append(await open_session(greedy))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "one connection may hold at most" in (e.details() or ""), e.details()
                break
        assert len(held) == BUDGET_SESSIONS // 2  # its share: half the cache
        # Another client is served while the greedy one keeps every session it got.
        others = [await open_session(polite) for _ in range(BUDGET_SESSIONS // 2)]
        for call in held + others:
            call.cancel()


class Gate:
    """on_batch hook: records each batch's tokens and holds the worker in the first batch."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, kind: str, n_requests: int, tokens: int, queue_wait_s: float) -> None:
        self.tokens.append(tokens)
        if len(self.tokens) == 1:
            self.entered.set()
            self.opened.wait(timeout=30)  # bounded: a broken test fails instead of hanging


async def test_a_burst_from_one_client_does_not_queue_the_next_behind_it() -> None:
    """The compute queue serves clients in turn: a request of a second connection runs right
    after the batch in progress, not after the greedy connection's whole burst."""
    torch.manual_seed(0)
    gate = Gate()
    blocks = [LlamaBlock(CONFIG) for _ in range(CONFIG.num_hidden_layers)]
    backend = BlockBackend(
        CONFIG,
        blocks,
        0,
        dtype=torch.float32,
        device=torch.device("cpu"),
        cache_bytes=1 << 20,
        batching=False,
        on_batch=gate,
    )
    limits = ServerLimits(
        max_batch=4, max_tokens=256, max_session_length=64, max_message_bytes=1 << 22, session_idle_timeout=30
    )
    server, port, _ = await start_grpc_server(
        BlockServicer(backend, "tiny", "peer", limits), "127.0.0.1", 0, limits.max_message_bytes
    )
    address, burst = f"127.0.0.1:{port}", 10
    try:
        async with (
            grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as greedy,
            grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as polite,
        ):
            flood = [asyncio.create_task(forward(greedy, length=2)) for _ in range(burst)]
            await asyncio.to_thread(gate.entered.wait, TIMEOUT)
            await until(lambda: backend.worker.depth()["forward"] == burst - 1)
            mine = asyncio.create_task(forward(polite, length=3))
            await until(lambda: backend.worker.depth()["forward"] == burst)
            gate.opened.set()
            await asyncio.gather(mine, *flood)
        assert gate.tokens == [2, 3] + [2] * (burst - 1)  # served second, not last
    finally:
        gate.opened.set()
        await server.stop(None)
        backend.shutdown()


async def forward(channel: grpc.aio.Channel, length: int) -> None:
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION, model="tiny", span=swarm_pb2.Span(start=0, end=2)
    )
    request = swarm_pb2.ForwardRequest(
        header=header, hidden_states=wire.encode_tensor(torch.randn(1, length, CONFIG.hidden_size))
    )
    await swarm_pb2_grpc.BlockServiceStub(channel).Forward(request, timeout=TIMEOUT)


async def until(condition: Callable[[], bool]) -> None:
    """Poll until `condition` holds; fail after TIMEOUT seconds."""
    stop = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < stop, "condition not reached before the deadline"
        await asyncio.sleep(0.01)
