"""gRPC calls to one node: unary Forward/Backward and the Inference stream.

gRPC failures are translated here, once, into the exception hierarchy: a status that
means "this peer failed" (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED,
INTERNAL, UNKNOWN) becomes a retryable error, so the retry policy may go elsewhere;
INVALID_ARGUMENT and friends mean our request is wrong and are raised as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.adapters import AdapterPayload, decode_named
from swarm.client.config import ClientConfig
from swarm.coordinator.routing import Hop
from swarm.errors import PeerUnavailable, ProtocolError, RemoteError

T = TypeVar("T")

RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


def translate_rpc_error(peer: str, error: grpc.aio.AioRpcError) -> RemoteError:
    code = error.code()
    return RemoteError(peer, code.name, error.details() or "", retryable=code in RETRYABLE_CODES)


class ChannelPool:
    """One channel per node address, reused by every call of this client."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        # (address, adapter hash) pairs this client has sent; a node may still have dropped one.
        self._adapters_sent: OrderedDict[tuple[str, str], None] = OrderedDict()

    def stub(self, address: str) -> swarm_pb2_grpc.BlockServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ]
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=options)
        return swarm_pb2_grpc.BlockServiceStub(channel)

    async def ensure_adapter(
        self, model: str, hop: Hop, payload: AdapterPayload, *, again: bool = False
    ) -> None:
        """Send `payload` to hop's server unless this client did already (`again`: send anyway)."""
        key = (hop.server.grpc_address, payload.hash)
        if key in self._adapters_sent and not again:
            self._adapters_sent.move_to_end(key)
            return
        request = payload.to_request(swarm.PROTOCOL_VERSION, model)
        stub = self.stub(hop.server.grpc_address)
        await _unary(hop, stub.LoadAdapter(request, timeout=self.config.request_timeout))
        self._adapters_sent[key] = None
        if len(self._adapters_sent) > 4096:  # training makes a new adapter every step
            self._adapters_sent.popitem(last=False)

    async def with_adapter(
        self, model: str, hop: Hop, payload: AdapterPayload | None, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `call` against hop's server with `payload` loaded there; resend it once if the node
        dropped it (its adapter store is bounded)."""
        if payload is None:
            return await call()
        await self.ensure_adapter(model, hop, payload)
        try:
            return await call()
        except RemoteError as e:
            if e.code != grpc.StatusCode.NOT_FOUND.name:
                raise
        await self.ensure_adapter(model, hop, payload, again=True)
        return await call()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


def request_header(
    model: str,
    hop: Hop,
    codec: str,
    adapter: AdapterPayload | None = None,
    min_epoch: int = 0,
    step: int | None = None,
) -> swarm_pb2.RequestHeader:
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION,
        model=model,
        span=swarm_pb2.Span(start=hop.start, end=hop.end),
        response_codec=wire.parse_codec(codec),  # type: ignore[arg-type]
        adapter=adapter.hash if adapter is not None else "",
        min_epoch=min_epoch,
    )
    if step is not None:
        header.step = step
    return header


@dataclass(frozen=True)
class Tuning:
    """What one hop applies on top of the plain blocks: a LoRA adapter and/or deep prompts."""

    adapter: AdapterPayload | None = None
    prompts: torch.Tensor | None = None  # [hop blocks, batch or 1, prefix, hidden]


NO_TUNING = Tuning()


@dataclass(frozen=True)
class BackwardReply:
    grad_inputs: torch.Tensor
    grad_prompts: torch.Tensor | None = None
    adapter_grads: dict[str, torch.Tensor] = field(default_factory=dict)


async def remote_forward(
    pool: ChannelPool,
    model: str,
    hop: Hop,
    hidden: torch.Tensor,
    config: ClientConfig,
    tuning: Tuning = NO_TUNING,
    min_epoch: int = 0,
) -> torch.Tensor:
    """Outputs of blocks [hop.start, hop.end) on hop's server for `hidden` [batch, tokens, hidden]
    (training: with the stage's weights of at least `min_epoch`)."""
    request = swarm_pb2.ForwardRequest(
        header=request_header(model, hop, config.codec, tuning.adapter, min_epoch),
        hidden_states=wire.encode_tensor(hidden, config.codec),
    )
    if tuning.prompts is not None:
        request.prompts.CopyFrom(wire.encode_tensor(tuning.prompts, config.codec))
    stub = pool.stub(hop.server.grpc_address)

    async def call() -> swarm_pb2.ForwardResponse:
        return await _unary(hop, stub.Forward(request, timeout=config.request_timeout))

    response = await pool.with_adapter(model, hop, tuning.adapter, call)
    return wire.decode_tensor(response.hidden_states)


async def remote_backward(
    pool: ChannelPool,
    model: str,
    hop: Hop,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    config: ClientConfig,
    tuning: Tuning = NO_TUNING,
    min_epoch: int = 0,
    step: int | None = None,
) -> BackwardReply:
    """d(loss)/d(hidden) for the span's inputs `hidden`, given d(loss)/d(its outputs), and the
    gradients of the hop's prompts and adapter tensors when it has them.

    Backward is stateless: the node recomputes the span's forward from `hidden`, so any server
    of the span can answer, not only the one that ran the forward pass.
    """
    request = swarm_pb2.BackwardRequest(
        header=request_header(model, hop, config.codec, tuning.adapter, min_epoch, step),
        hidden_states=wire.encode_tensor(hidden, config.codec),
        grad_outputs=wire.encode_tensor(grad_outputs, config.codec),
    )
    if tuning.prompts is not None:
        request.prompts.CopyFrom(wire.encode_tensor(tuning.prompts, config.codec))
    stub = pool.stub(hop.server.grpc_address)

    async def call() -> swarm_pb2.BackwardResponse:
        return await _unary(hop, stub.Backward(request, timeout=config.request_timeout))

    response = await pool.with_adapter(model, hop, tuning.adapter, call)
    grad_prompts = wire.decode_tensor(response.grad_prompts) if response.HasField("grad_prompts") else None
    adapter_grads = decode_named(response.adapter_grads) if tuning.adapter is not None else {}
    if tuning.adapter is not None and set(adapter_grads) != set(tuning.adapter.tensors):
        raise ProtocolError(f"{hop.peer_id} returned gradients for other adapter tensors than it was sent")
    if tuning.prompts is not None and (grad_prompts is None or grad_prompts.shape != tuning.prompts.shape):
        raise ProtocolError(f"{hop.peer_id} returned no (or misshapen) prompt gradients")
    return BackwardReply(wire.decode_tensor(response.grad_inputs), grad_prompts, adapter_grads)


async def _unary(hop: Hop, call: Awaitable[T]) -> T:
    """Await one unary RPC, translating its gRPC failure into our exception hierarchy."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise translate_rpc_error(hop.peer_id, e) from None


class InferenceStream:
    """One Inference stream = one KV-cache session on one node for blocks [hop.start, hop.end)."""

    def __init__(
        self,
        pool: ChannelPool,
        model: str,
        hop: Hop,
        config: ClientConfig,
        batch_size: int,
        max_length: int,
        tuning: Tuning = NO_TUNING,
    ):
        self.pool, self.model, self.hop, self.config = pool, model, hop, config
        self.batch_size, self.max_length = batch_size, max_length
        self.tuning = tuning
        self.position = 0
        self._keep: int | None = None  # a rollback the next step tells the node (speculative decoding)
        self._call: Any = None
        self._step_id = 0

    def rollback(self, keep: int) -> None:
        """Forget every token from position `keep` on. Costs no round trip: the next step carries it."""
        if not 0 <= keep <= self.position:
            raise ValueError(f"cannot keep {keep} tokens of a stream holding {self.position}")
        if keep < self.position:
            self.position = keep
            self._keep = keep

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send new hidden states [batch, new_tokens, hidden]; get the span's outputs for them."""
        if self._call is not None or self.tuning.adapter is None:
            return await self._step(hidden)
        # Opening with an adapter: send it first; if the node dropped it meanwhile, once more.
        await self.pool.ensure_adapter(self.model, self.hop, self.tuning.adapter)
        try:
            return await self._step(hidden)
        except RemoteError as e:
            if e.code != grpc.StatusCode.NOT_FOUND.name:
                raise
        self._call = None
        await self.pool.ensure_adapter(self.model, self.hop, self.tuning.adapter, again=True)
        return await self._step(hidden)

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        self._step_id += 1
        request = swarm_pb2.InferenceRequest(
            step=swarm_pb2.InferenceStep(
                hidden_states=wire.encode_tensor(hidden, self.config.codec),
                position=self.position,
                step_id=self._step_id,
            )
        )
        if self._keep is not None:
            request.step.keep = self._keep
        prompts = self.tuning.prompts
        if prompts is not None and self.position < prompts.shape[2]:  # this step reaches into the prefix
            request.step.prompts.CopyFrom(wire.encode_tensor(prompts, self.config.codec))
        if self._call is None:
            self._call = self.pool.stub(self.hop.server.grpc_address).Inference()
            request.header.CopyFrom(
                request_header(self.model, self.hop, self.config.codec, self.tuning.adapter)
            )
            request.open.CopyFrom(
                swarm_pb2.InferenceOpen(max_length=self.max_length, batch_size=self.batch_size)
            )
        try:
            # The first write opens the stream (and maybe the connection): connect_timeout bounds it.
            opening = request.HasField("open")
            write_timeout = self.config.connect_timeout if opening else self.config.request_timeout
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps every await in a new task
            async with asyncio.timeout(write_timeout):
                await self._call.write(request)
            async with asyncio.timeout(self.config.request_timeout):
                response = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(self.hop.peer_id, e) from None
        except asyncio.InvalidStateError:  # the stream already ended (peer died): report why
            raise await self._stream_error() from None
        except TimeoutError:
            raise PeerUnavailable(
                f"{self.hop.peer_id} did not answer an inference step within {self.config.request_timeout} s"
            ) from None
        if response is grpc.aio.EOF:
            raise await self._stream_error()
        if response.step_id != self._step_id:
            raise ProtocolError(
                f"{self.hop.peer_id} answered step {response.step_id}, expected {self._step_id}"
            )
        self._keep = None
        self.position += hidden.shape[1]
        return wire.decode_tensor(response.hidden_states)

    async def _stream_error(self) -> Exception:
        """The server ended the stream: report its status (or that it simply went away)."""
        try:
            code = await self._call.code()
            details = await self._call.details()
        except grpc.aio.AioRpcError as e:
            return translate_rpc_error(self.hop.peer_id, e)
        if code == grpc.StatusCode.OK:
            return PeerUnavailable(f"{self.hop.peer_id} closed the inference stream")
        return RemoteError(self.hop.peer_id, code.name, details or "", retryable=code in RETRYABLE_CODES)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.done_writing()
            call.cancel()
