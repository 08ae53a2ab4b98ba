"""gRPC calls to one node: unary Forward/Backward and the Inference stream.

gRPC failures are translated here, once, into the exception hierarchy: a status that
means "this peer failed" (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED,
INTERNAL, UNKNOWN) becomes a retryable error, so the retry policy may go elsewhere;
INVALID_ARGUMENT and friends mean our request is wrong and are raised as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

import swarm
from swarm import tls, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.adapters import AdapterPayload, decode_named
from swarm.client.config import ClientConfig
from swarm.coordinator.routing import Hop
from swarm.errors import PeerUnavailable, ProtocolError, RemoteError
from swarm.records import ServerRecord

T = TypeVar("T")
PUSH_ID_BYTES = 16  # as swarm.node.push (the client never imports node)

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
    """One channel per node (address and pinned certificate), reused by every call of this client.

    Every call to a node goes through `stub`, so every one runs over TLS pinned to the certificate
    hash of the node's signed record (swarm.tls), or in plaintext where the record pins none.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channels: dict[tls.Endpoint, grpc.aio.Channel] = {}
        self._opening: dict[tls.Endpoint, asyncio.Task[grpc.aio.Channel]] = {}
        # (address, adapter hash) pairs this client has sent; a node may still have dropped one.
        self._adapters_sent: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def stub(self, server: ServerRecord) -> swarm_pb2_grpc.BlockServiceStub:
        """A stub for `server`; the first call per node takes its certificate (one TLS handshake)
        and raises CertificateMismatch, a PeerUnavailable, if it is not the one the record pins."""
        endpoint = tls.Endpoint(server.grpc_address, server.tls_cert_sha256)
        channel = self._channels.get(endpoint)
        if channel is None:
            opening = self._opening.get(endpoint)
            if opening is None:  # concurrent hops to one node share one dial
                opening = self._opening[endpoint] = asyncio.ensure_future(
                    self._open(endpoint, server.peer_id)
                )
            try:
                channel = await asyncio.shield(opening)
            finally:
                if opening.done():
                    self._opening.pop(endpoint, None)
            self._channels[endpoint] = channel
        return swarm_pb2_grpc.BlockServiceStub(channel)

    async def _open(self, endpoint: tls.Endpoint, peer: str) -> grpc.aio.Channel:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        return await tls.open_channel(
            endpoint.address,
            endpoint.cert_sha256,
            peer=peer,
            options=options,
            timeout=self.config.connect_timeout,
            require_tls=self.config.require_tls,
        )

    async def ensure_adapter(
        self, model: str, hop: Hop, payload: AdapterPayload, *, again: bool = False
    ) -> None:
        """Send `payload` to hop's server unless this client did already (`again`: send anyway)."""
        key = (hop.server.grpc_address, payload.hash)
        if key in self._adapters_sent and not again:
            self._adapters_sent.move_to_end(key)
            return
        request = payload.to_request(swarm.PROTOCOL_VERSION, model)
        stub = await self.stub(hop.server)
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
        opening, self._opening = self._opening, {}
        for task in opening.values():  # a dial still taking a certificate: its channel is not wanted
            task.cancel()
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
    epoch: int | None = None  # training nodes: the stage epoch of the weights used (BackwardResponse)


def forward_request(
    model: str,
    hop: Hop,
    hidden: torch.Tensor,
    config: ClientConfig,
    tuning: Tuning = NO_TUNING,
    min_epoch: int = 0,
) -> swarm_pb2.ForwardRequest:
    request = swarm_pb2.ForwardRequest(
        header=request_header(model, hop, config.codec, tuning.adapter, min_epoch),
        hidden_states=wire.encode_tensor(hidden, config.codec),
    )
    if tuning.prompts is not None:
        request.prompts.CopyFrom(wire.encode_tensor(tuning.prompts, config.codec))
    return request


async def call_forward(
    pool: ChannelPool,
    model: str,
    hop: Hop,
    request: swarm_pb2.ForwardRequest,
    config: ClientConfig,
    adapter: AdapterPayload | None = None,
) -> swarm_pb2.ForwardResponse:
    """Send a built ForwardRequest to hop's server (its adapter loaded there first)."""
    stub = await pool.stub(hop.server)

    async def call() -> swarm_pb2.ForwardResponse:
        return await _unary(hop, stub.Forward(request, timeout=config.request_timeout))

    return await pool.with_adapter(model, hop, adapter, call)


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
    request = forward_request(model, hop, hidden, config, tuning, min_epoch)
    response = await call_forward(pool, model, hop, request, config, tuning.adapter)
    return wire.decode_tensor(response.hidden_states)


def backward_request(
    model: str,
    hop: Hop,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    config: ClientConfig,
    tuning: Tuning = NO_TUNING,
    min_epoch: int = 0,
    step: int | None = None,
) -> swarm_pb2.BackwardRequest:
    request = swarm_pb2.BackwardRequest(
        header=request_header(model, hop, config.codec, tuning.adapter, min_epoch, step),
        hidden_states=wire.encode_tensor(hidden, config.codec),
        grad_outputs=wire.encode_tensor(grad_outputs, config.codec),
    )
    if tuning.prompts is not None:
        request.prompts.CopyFrom(wire.encode_tensor(tuning.prompts, config.codec))
    return request


async def call_backward(
    pool: ChannelPool,
    model: str,
    hop: Hop,
    request: swarm_pb2.BackwardRequest,
    config: ClientConfig,
    tuning: Tuning = NO_TUNING,
) -> BackwardReply:
    """Send a built BackwardRequest to hop's server; its reply, checked for shape."""
    stub = await pool.stub(hop.server)

    async def call() -> swarm_pb2.BackwardResponse:
        return await _unary(hop, stub.Backward(request, timeout=config.request_timeout))

    response = await pool.with_adapter(model, hop, tuning.adapter, call)
    grad_prompts = wire.decode_tensor(response.grad_prompts) if response.HasField("grad_prompts") else None
    adapter_grads = decode_named(response.adapter_grads) if tuning.adapter is not None else {}
    if tuning.adapter is not None and set(adapter_grads) != set(tuning.adapter.tensors):
        raise ProtocolError(f"{hop.peer_id} returned gradients for other adapter tensors than it was sent")
    if tuning.prompts is not None and (grad_prompts is None or grad_prompts.shape != tuning.prompts.shape):
        raise ProtocolError(f"{hop.peer_id} returned no (or misshapen) prompt gradients")
    epoch = response.epoch if response.HasField("epoch") else None
    return BackwardReply(wire.decode_tensor(response.grad_inputs), grad_prompts, adapter_grads, epoch)


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
    request = backward_request(model, hop, hidden, grad_outputs, config, tuning, min_epoch, step)
    return await call_backward(pool, model, hop, request, config, tuning)


async def _unary(hop: Hop, call: Awaitable[T]) -> T:
    """Await one unary RPC, translating its gRPC failure into our exception hierarchy."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise translate_rpc_error(hop.peer_id, e) from None


class InferenceStream:
    """One Inference stream = one KV-cache session on one node for blocks [hop.start, hop.end).

    With `push`, the session is opened with a random push id, so the previous node of the route may
    push this stream's inputs (swarm.node.push); `send`/`receive` then run a step in two halves.
    """

    def __init__(
        self,
        pool: ChannelPool,
        model: str,
        hop: Hop,
        config: ClientConfig,
        batch_size: int,
        max_length: int,
        tuning: Tuning = NO_TUNING,
        *,
        push: bool = False,
    ):
        self.pool, self.model, self.hop, self.config = pool, model, hop, config
        self.batch_size, self.max_length = batch_size, max_length
        self.tuning = tuning
        self.position = 0
        self._keep: int | None = None  # a rollback the next step tells the node (speculative decoding)
        self._call: Any = None
        self._step_id = 0
        self._tokens = 0  # tokens of the step in flight
        self.push_id = os.urandom(PUSH_ID_BYTES) if push else b""
        self.accepts_push = False  # the node said so in its last answer (older nodes never do)

    def rollback(self, keep: int) -> None:
        """Forget every token from position `keep` on. Costs no round trip: the next step carries it."""
        if not 0 <= keep <= self.position:
            raise ValueError(f"cannot keep {keep} tokens of a stream holding {self.position}")
        if keep < self.position:
            self.position = keep
            self._keep = keep

    def push_target(self, dial_only: bool = False) -> swarm_pb2.PushTarget:
        """Where the previous node sends this stream's next input (before that step is sent);
        `dial_only`: the previous node only opens its link (step_id 0), pushing nothing yet."""
        return swarm_pb2.PushTarget(
            address=self.hop.server.grpc_address,
            tls_cert_sha256=self.hop.server.tls_cert_sha256 or "",
            peer_id=self.hop.peer_id,
            push_id=self.push_id,
            step_id=0 if dial_only else self._step_id + 1,
        )

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send new hidden states [batch, new_tokens, hidden]; get the span's outputs for them."""
        return wire.decode_tensor((await self.step_reply(hidden)).hidden_states)

    async def step_reply(
        self, hidden: torch.Tensor, push: swarm_pb2.PushTarget | None = None
    ) -> swarm_pb2.InferenceResponse:
        """`step`, returning the node's whole answer (`push`: as in `send`)."""
        if self._call is not None or self.tuning.adapter is None:
            return await self._step(hidden, push)
        # Opening with an adapter: send it first; if the node dropped it meanwhile, once more.
        await self.pool.ensure_adapter(self.model, self.hop, self.tuning.adapter)
        try:
            return await self._step(hidden, push)
        except RemoteError as e:
            if e.code != grpc.StatusCode.NOT_FOUND.name:
                raise
        self._call = None
        await self.pool.ensure_adapter(self.model, self.hop, self.tuning.adapter, again=True)
        return await self._step(hidden, push)

    async def _step(
        self, hidden: torch.Tensor, push: swarm_pb2.PushTarget | None
    ) -> swarm_pb2.InferenceResponse:
        await self.send(wire.encode_tensor(hidden, self.config.codec), hidden.shape[1], push)
        return await self.receive()

    async def send(
        self, hidden: swarm_pb2.Tensor | None, tokens: int, push: swarm_pb2.PushTarget | None = None
    ) -> None:
        """First half of a step: its inputs (None: the previous node pushes them), and where to push
        its outputs (`push`: the next stream's target)."""
        self._step_id += 1
        step = swarm_pb2.InferenceStep(position=self.position, step_id=self._step_id)
        if hidden is not None:
            step.hidden_states.CopyFrom(hidden)
        else:
            step.pushed = True
        if self._keep is not None:
            step.keep = self._keep
        if push is not None:
            step.push.CopyFrom(push)
        prompts = self.tuning.prompts
        if prompts is not None and self.position < prompts.shape[2]:  # this step reaches into the prefix
            step.prompts.CopyFrom(wire.encode_tensor(prompts, self.config.codec))
        self._tokens = tokens
        await self._write(swarm_pb2.InferenceRequest(step=step))

    async def send_copy(self, hidden: swarm_pb2.Tensor) -> None:
        """The client's own copy of the input of the step in flight, whose push did not happen."""
        step = swarm_pb2.InferenceStep(position=self.position, step_id=self._step_id)
        step.hidden_states.CopyFrom(hidden)
        await self._write(swarm_pb2.InferenceRequest(step=step))

    async def _write(self, request: swarm_pb2.InferenceRequest) -> None:
        if self._call is None:
            # PeerUnavailable if the node shows another certificate than its record pins
            self._call = (await self.pool.stub(self.hop.server)).Inference()
            request.header.CopyFrom(
                request_header(self.model, self.hop, self.config.codec, self.tuning.adapter)
            )
            request.open.CopyFrom(
                swarm_pb2.InferenceOpen(
                    max_length=self.max_length, batch_size=self.batch_size, push_id=self.push_id
                )
            )
        try:
            # The first write opens the stream (and maybe the connection): connect_timeout bounds it.
            opening = request.HasField("open")
            write_timeout = self.config.connect_timeout if opening else self.config.request_timeout
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps every await in a new task
            async with asyncio.timeout(write_timeout):
                await self._call.write(request)
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(self.hop.peer_id, e) from None
        except asyncio.InvalidStateError:  # the stream already ended (peer died): report why
            raise await self._stream_error() from None
        except TimeoutError:
            raise PeerUnavailable(
                f"{self.hop.peer_id} did not take an inference step within {write_timeout} s"
            ) from None

    async def receive(self) -> swarm_pb2.InferenceResponse:
        """Second half of a step: the node's answer."""
        try:
            async with asyncio.timeout(self.config.request_timeout):
                response = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(self.hop.peer_id, e) from None
        except asyncio.InvalidStateError:
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
        self.position += self._tokens
        self.accepts_push = response.accepts_push and bool(self.push_id)
        return response

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
