"""The node's compute worker: priorities, dynamic batching, deadlines, cancellation, shutdown.

Ordering is controlled, never timed: the `Gate` hook holds the worker inside its first batch
(on_batch runs just before compute), the test queues work behind it, then opens the gate.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from torch import Tensor

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import DeadlineExceeded
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node.backend import BackendClosed, BlockBackend
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server

CONFIG = LlamaConfig.from_hf_dict(
    {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
)
RTOL = ATOL = 1e-5  # float32: a batched matmul may round a few ulps differently


class Gate:
    """on_batch hook: records (kind, requests, tokens) and holds the worker in the first batch."""

    def __init__(self, hold: bool = True) -> None:
        self.batches: list[tuple[str, int, int]] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        self._hold = hold

    def __call__(self, kind: str, n_requests: int, tokens: int, queue_wait_s: float) -> None:
        assert queue_wait_s >= 0
        self.batches.append((kind, n_requests, tokens))
        if self._hold:
            self._hold = False
            self.entered.set()
            self.opened.wait(timeout=30)  # bounded: a broken test fails instead of hanging

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the worker never started a batch"

    def open(self) -> None:
        self.opened.set()


MakeBackend = Callable[..., BlockBackend]


@pytest.fixture
def make_backend() -> Iterator[MakeBackend]:
    backends: list[BlockBackend] = []

    def make(**options: Any) -> BlockBackend:
        torch.manual_seed(0)
        blocks = [LlamaBlock(CONFIG) for _ in range(CONFIG.num_hidden_layers)]
        backend = BlockBackend(
            CONFIG, blocks, 0, dtype=torch.float32, device=torch.device("cpu"), cache_bytes=1 << 24, **options
        )
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.shutdown()


def hidden(batch: int, length: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, length, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed))


def reference_forward(blocks: list[LlamaBlock], h: Tensor) -> Tensor:
    with torch.inference_mode():
        for block in blocks:
            h = block(h)
    return h


def reference_backward(blocks: list[LlamaBlock], h: Tensor, grad_out: Tensor) -> Tensor:
    h_in = h.clone().requires_grad_(True)
    out = h_in
    for block in blocks:
        out = block(out)
    (grad,) = torch.autograd.grad(out, h_in, grad_out)
    return grad


async def until_queued(backend: BlockBackend, **expected: int) -> None:
    """Let the created tasks run up to their first await, i.e. until they are queued."""
    want = {"inference": 0, "forward": 0, "backward": 0, **expected}
    for _ in range(100):
        if backend.queue_depth() == want:
            return
        await asyncio.sleep(0)  # a yield to the loop, not a timed wait
    raise AssertionError(f"queue is {backend.queue_depth()}, expected {want}")


async def until_drained(backend: BlockBackend, timeout: float = 10.0) -> None:
    """Wait for work queued by another party (a gRPC handler) to leave the queue."""
    give_up = time.monotonic() + timeout
    while any(backend.queue_depth().values()):
        assert time.monotonic() < give_up, f"still queued: {backend.queue_depth()}"
        await asyncio.sleep(0.001)  # polls a condition; the outcome does not depend on timing


async def occupy(backend: BlockBackend, gate: Gate) -> asyncio.Task[Tensor]:
    """Start a small forward and return once the worker is held inside it."""
    task = asyncio.create_task(backend.forward(hidden(1, 2, seed=99), 0, 4))
    await gate.wait_entered()
    return task


def recorded(done: list[str], name: str, coro: Awaitable[Tensor]) -> asyncio.Task[Tensor]:
    async def run() -> Tensor:
        result = await coro
        done.append(name)
        return result

    return asyncio.create_task(run())


# ----------------------------------------------------------------------------- priorities


async def test_inference_step_overtakes_a_queued_large_forward(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    done: list[str] = []
    big = recorded(done, "forward", backend.forward(hidden(8, 64), 0, 4))
    session = backend.open_session(0, 4, batch_size=1, max_length=8)
    step = recorded(done, "step", backend.step(session, hidden(1, 1), 0))
    await until_queued(backend, forward=1, inference=1)  # the step was submitted last
    gate.open()
    await asyncio.gather(first, big, step)
    assert done == ["step", "forward"]
    assert [kind for kind, _, _ in gate.batches] == ["forward", "inference", "forward"]


async def test_a_step_on_an_idle_device_runs_inline_and_equals_the_worker_path(
    make_backend: MakeBackend,
) -> None:
    """Idle: the step runs on the event loop's thread (no hand-offs). Busy: it queues for the worker.
    Both give the same outputs, and never two computations at once."""
    threads: list[str] = []
    backend = make_backend(on_batch=lambda *_: threads.append(threading.current_thread().name))
    inline_session = backend.open_session(0, 4, batch_size=1, max_length=8)
    queued_session = backend.open_session(0, 4, batch_size=1, max_length=8)
    x = hidden(1, 3)
    inline = await backend.step(inline_session, x, 0)
    assert threads == [threading.current_thread().name]

    gate = Gate()
    backend.worker.on_batch = gate
    first = await occupy(backend, gate)
    step = asyncio.create_task(backend.step(queued_session, x, 0))
    await until_queued(backend, inference=1)  # the worker is busy: no inline run beside it
    gate.open()
    await first
    torch.testing.assert_close(await step, inline, rtol=0, atol=0)
    assert [kind for kind, _, _ in gate.batches] == ["forward", "inference"]


async def test_priority_order_inference_forward_backward(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    session = backend.open_session(0, 4, batch_size=1, max_length=8)
    x = hidden(1, 3)
    tasks = [  # queued in the reverse of the order they must run
        asyncio.create_task(backend.backward(x, torch.ones_like(x), 0, 4)),
        asyncio.create_task(backend.forward(x, 1, 3)),
        asyncio.create_task(backend.forward(x, 0, 2)),
        asyncio.create_task(backend.step(session, hidden(1, 1), 0)),
    ]
    await until_queued(backend, inference=1, forward=2, backward=1)
    gate.open()
    await asyncio.gather(first, *tasks)
    kinds = [kind for kind, _, _ in gate.batches]
    assert kinds == ["forward", "inference", "forward", "forward", "backward"]  # FIFO within forward
    assert gate.batches[2][2] == gate.batches[3][2] == 3  # different spans: not merged


# ----------------------------------------------------------------------------- batching


async def test_compatible_forwards_run_as_one_exact_batch(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    inputs = [hidden(b, 5, seed=i) for i, b in enumerate((1, 2, 1, 3))]
    merged = [asyncio.create_task(backend.forward(x, 0, 4)) for x in inputs]
    other_length = asyncio.create_task(backend.forward(hidden(1, 6), 0, 4))
    other_span = asyncio.create_task(backend.forward(hidden(1, 5), 1, 3))
    await until_queued(backend, forward=6)
    gate.open()
    outputs = await asyncio.gather(*merged)
    await asyncio.gather(first, other_length, other_span)
    assert gate.batches == [("forward", 1, 2), ("forward", 4, 35), ("forward", 1, 6), ("forward", 1, 5)]
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape == x.shape
        torch.testing.assert_close(out, reference_forward(backend.blocks, x), rtol=RTOL, atol=ATOL)


async def test_token_budget_limits_a_batch(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate, batch_tokens=10)
    first = await occupy(backend, gate)
    sizes = [(1, 4), (1, 4), (4, 4), (1, 4)]  # the third (16 tokens) exceeds the budget on its own
    tasks = [asyncio.create_task(backend.forward(hidden(b, t), 0, 4)) for b, t in sizes]
    await until_queued(backend, forward=4)
    gate.open()
    await asyncio.gather(first, *tasks)
    assert gate.batches[1:] == [("forward", 2, 8), ("forward", 1, 16), ("forward", 1, 4)]


async def test_batching_disabled_runs_one_request_at_a_time(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate, batching=False)
    first = await occupy(backend, gate)
    tasks = [asyncio.create_task(backend.forward(hidden(1, 5, seed=i), 0, 4)) for i in range(3)]
    await until_queued(backend, forward=3)
    gate.open()
    await asyncio.gather(first, *tasks)
    assert gate.batches[1:] == [("forward", 1, 5)] * 3


async def test_compatible_backwards_run_as_one_exact_batch(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    inputs = [(hidden(b, 4, seed=i), hidden(b, 4, seed=10 + i)) for i, b in enumerate((2, 1, 1))]
    tasks = [asyncio.create_task(backend.backward(x, g, 0, 4)) for x, g in inputs]
    await until_queued(backend, backward=3)
    gate.open()
    grads = await asyncio.gather(*tasks)
    await first
    assert gate.batches[1:] == [("backward", 3, 16)]
    for (x, g), grad in zip(inputs, grads, strict=True):
        expected = reference_backward(backend.blocks, x, g)
        torch.testing.assert_close(grad.grad_inputs, expected, rtol=RTOL, atol=ATOL)


async def test_weights_are_frozen(make_backend: MakeBackend) -> None:
    backend = make_backend()
    x = hidden(1, 3)
    await backend.backward(x, torch.ones_like(x), 0, 4)
    params = [p for block in backend.blocks for p in block.parameters()]
    assert params and all(not p.requires_grad and p.grad is None for p in params)


# ----------------------------------------------------------------------------- deadlines, cancellation


async def test_expired_deadline_fails_without_computing(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    late = asyncio.create_task(backend.forward(hidden(1, 5), 0, 4, deadline=time.monotonic() - 1))
    in_time = asyncio.create_task(backend.forward(hidden(1, 5), 0, 4, deadline=time.monotonic() + 3600))
    await until_queued(backend, forward=2)
    gate.open()
    with pytest.raises(DeadlineExceeded):
        await late
    await asyncio.gather(first, in_time)
    assert gate.batches == [("forward", 1, 2), ("forward", 1, 5)]  # the late one was not merged in


async def test_cancelled_request_is_not_computed(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    abandoned = asyncio.create_task(backend.forward(hidden(1, 7), 0, 4))
    await until_queued(backend, forward=1)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    await until_queued(backend)  # cancelling unqueued it
    gate.open()
    await first
    await backend.forward(hidden(1, 3), 0, 4)  # the worker has passed the abandoned one's slot
    assert gate.batches == [("forward", 1, 2), ("forward", 1, 3)]


async def test_shutdown_fails_queued_requests_and_stops_the_worker(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    first = await occupy(backend, gate)
    session = backend.open_session(0, 4, batch_size=1, max_length=8)
    queued = [
        asyncio.create_task(backend.forward(hidden(1, 5), 0, 4)),
        asyncio.create_task(backend.step(session, hidden(1, 1), 0)),
    ]
    await until_queued(backend, forward=1, inference=1)
    stopping = asyncio.create_task(asyncio.to_thread(backend.shutdown, 10.0))
    for task in queued:
        with pytest.raises(BackendClosed):
            await task
    gate.open()  # the running batch finishes, then the worker exits
    await stopping
    assert (await first).shape == (1, 2, CONFIG.hidden_size)
    assert not backend.worker.alive
    with pytest.raises(BackendClosed):
        await backend.forward(hidden(1, 2), 0, 4)
    assert gate.batches == [("forward", 1, 2)]


def test_idle_shutdown_is_prompt(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.shutdown(timeout=10)
    assert not backend.worker.alive


# ----------------------------------------------------------------------------- through gRPC


async def test_grpc_deadline_while_the_worker_is_busy(make_backend: MakeBackend) -> None:
    gate = Gate()
    backend = make_backend(on_batch=gate)
    limits = ServerLimits(
        max_batch=8, max_tokens=512, max_session_length=64, max_message_bytes=1 << 22, session_idle_timeout=60
    )
    servicer = BlockServicer(backend, "tiny", "peer", limits)
    servicer.state = "online"
    server, port, _ = await start_grpc_server(servicer, "127.0.0.1", 0, limits.max_message_bytes)
    try:
        first = await occupy(backend, gate)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = swarm_pb2_grpc.BlockServiceStub(channel)
            header = swarm_pb2.RequestHeader(
                protocol_version=swarm.PROTOCOL_VERSION, model="tiny", span=swarm_pb2.Span(start=0, end=4)
            )
            request = swarm_pb2.ForwardRequest(header=header, hidden_states=wire.encode_tensor(hidden(1, 5)))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Forward(request, timeout=0.3)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server's clock for the call starts when the request arrives, a little after the
            # client's: wait until gRPC has cancelled the handler, which unqueues its task.
            await until_drained(backend)
            gate.open()
            await first
            request.hidden_states.CopyFrom(wire.encode_tensor(hidden(1, 3)))
            await stub.Forward(request, timeout=30)
        assert gate.batches == [("forward", 1, 2), ("forward", 1, 3)]  # the expired one never ran
    finally:
        gate.open()
        await server.stop(None)


async def test_a_step_with_keep_drops_the_rejected_tokens_first(make_backend: MakeBackend) -> None:
    """Speculative decoding: after keep, the session computes as if the dropped tokens never came."""
    backend = make_backend()
    prompt, kept, junk, after = (
        hidden(1, 3, seed=1),
        hidden(1, 1, seed=2),
        hidden(1, 3, seed=3),
        hidden(1, 1, seed=4),
    )
    clean = backend.open_session(0, 4, batch_size=1, max_length=12)
    await backend.step(clean, prompt, 0)
    await backend.step(clean, kept, 3)
    expected = await backend.step(clean, after, 4)

    spec = backend.open_session(0, 4, batch_size=1, max_length=12)
    await backend.step(spec, prompt, 0)
    await backend.step(spec, torch.cat([kept, junk], dim=1), 3)  # a draft step: 1 kept + 3 rejected
    assert spec.length == 7
    with pytest.raises(swarm.errors.ProtocolError, match="keep 8 tokens, but this session holds 7"):
        await backend.step(spec, after, 8, keep=8)
    got = await backend.step(spec, after, 4, keep=4)
    assert spec.length == 5
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    leaked = backend.open_session(0, 4, batch_size=1, max_length=12)  # the same without the rollback
    await backend.step(leaked, prompt, 0)
    await backend.step(leaked, torch.cat([kept, junk], dim=1), 3)
    assert (await backend.step(leaked, after, 7) - expected).abs().max() > 1e-3
