"""The gRPC face of a node: BlockService, health and reflection on grpc.aio.

Every request is checked before anything is allocated: protocol version, model name and
span, tensor size against the node's limits. Refusals carry a status a client can act on:
INVALID_ARGUMENT for a malformed request, RESOURCE_EXHAUSTED for one over a limit, and
never an unhandled exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import LimitExceeded, ProtocolError, SwarmError
from swarm.node.backend import BlockBackend, InferenceSession

log = logging.getLogger(__name__)
SERVICE_NAME = swarm_pb2.DESCRIPTOR.services_by_name["BlockService"].full_name


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int
    max_tokens: int
    max_session_length: int
    max_message_bytes: int
    session_idle_timeout: float


class BlockServicer(swarm_pb2_grpc.BlockServiceServicer):
    def __init__(self, backend: BlockBackend, model: str, peer_id: str, limits: ServerLimits) -> None:
        self.backend = backend
        self.model = model
        self.peer_id = peer_id
        self.limits = limits

    # ---- validation -------------------------------------------------------------------------

    def _check_header(self, header: swarm_pb2.RequestHeader) -> tuple[int, int]:
        if header.protocol_version != swarm.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {header.protocol_version} is not supported; "
                f"this node speaks version {swarm.PROTOCOL_VERSION}"
            )
        if header.model != self.model:
            raise ProtocolError(f"this node serves model {self.model!r}, the request names {header.model!r}")
        start, end = header.span.start, header.span.end
        if not (self.backend.start <= start < end <= self.backend.end):
            raise ProtocolError(
                f"this node serves blocks {self.backend.start}:{self.backend.end}, "
                f"the request asks for {start}:{end}"
            )
        return start, end

    def _decode_hidden(self, msg: swarm_pb2.Tensor, what: str = "hidden_states") -> torch.Tensor:
        shape = list(msg.shape)
        if len(shape) != 3:
            raise ProtocolError(f"{what} must be [batch, length, hidden], got shape {shape}")
        batch, length = shape[0], shape[1]
        if batch > self.limits.max_batch:
            raise LimitExceeded(f"batch {batch} exceeds this node's max_batch {self.limits.max_batch}")
        if batch * length > self.limits.max_tokens:
            raise LimitExceeded(
                f"batch x length = {batch} x {length} = {batch * length} tokens exceeds "
                f"this node's max_tokens {self.limits.max_tokens}"
            )
        max_elements = self.limits.max_tokens * self.backend.config.hidden_size
        return wire.decode_tensor(msg, max_elements=max_elements)

    def _encode(self, t: torch.Tensor, header: swarm_pb2.RequestHeader) -> swarm_pb2.Tensor:
        return wire.encode_tensor(t, header.response_codec)

    # ---- RPCs -------------------------------------------------------------------------------

    async def Info(
        self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.InfoResponse:
        return swarm_pb2.InfoResponse(
            protocol_version=swarm.PROTOCOL_VERSION,
            model=self.model,
            span=swarm_pb2.Span(start=self.backend.start, end=self.backend.end),
            peer_id=self.peer_id,
            version=swarm.__version__,
            dtype=str(self.backend.dtype).removeprefix("torch."),
            device=str(self.backend.device),
            max_message_bytes=self.limits.max_message_bytes,
            max_batch=self.limits.max_batch,
            max_tokens=self.limits.max_tokens,
            max_session_length=self.limits.max_session_length,
        )

    async def Forward(
        self, request: swarm_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ForwardResponse:
        try:
            start, end = self._check_header(request.header)
            hidden = self._decode_hidden(request.hidden_states)
            out = await self.backend.forward(hidden, start, end)
            return swarm_pb2.ForwardResponse(hidden_states=self._encode(out, request.header))
        except Exception as e:
            await _abort(context, e)
            raise  # unreachable: abort raises

    async def Backward(
        self, request: swarm_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.BackwardResponse:
        try:
            start, end = self._check_header(request.header)
            hidden = self._decode_hidden(request.hidden_states)
            grad_out = self._decode_hidden(request.grad_outputs, "grad_outputs")
            grad_in = await self.backend.backward(hidden, grad_out, start, end)
            return swarm_pb2.BackwardResponse(grad_inputs=self._encode(grad_in, request.header))
        except Exception as e:
            await _abort(context, e)
            raise

    async def Inference(
        self, request_iterator: AsyncIterator[swarm_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.InferenceResponse]:
        session: InferenceSession | None = None
        header = swarm_pb2.RequestHeader()
        requests = aiter(request_iterator)
        try:
            while True:
                try:  # a client that stops sending must not pin its KV cache forever
                    request = await asyncio.wait_for(anext(requests), self.limits.session_idle_timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise SessionIdle(
                        f"inference session idle for more than {self.limits.session_idle_timeout} s; "
                        "its KV cache was released"
                    ) from None
                if session is None:
                    header = request.header
                    session = self._open_session(request)
                if not request.HasField("step"):
                    continue
                step = request.step
                hidden = self._decode_hidden(step.hidden_states)
                out = await self.backend.step(session, hidden, step.position)
                yield swarm_pb2.InferenceResponse(
                    hidden_states=self._encode(out, header), step_id=step.step_id, length=session.length
                )
        except Exception as e:
            await _abort(context, e)
        finally:
            if session is not None:
                self.backend.close_session(session)

    def _open_session(self, request: swarm_pb2.InferenceRequest) -> InferenceSession:
        if not request.HasField("header") or not request.HasField("open"):
            raise ProtocolError("the first message of an Inference stream must carry `header` and `open`")
        start, end = self._check_header(request.header)
        max_length, batch = request.open.max_length, request.open.batch_size
        if max_length < 1 or batch < 1:
            raise ProtocolError(f"open needs max_length >= 1 and batch_size >= 1, got {max_length}, {batch}")
        if max_length > self.limits.max_session_length:
            raise LimitExceeded(
                f"max_length {max_length} exceeds this node's "
                f"max_session_length {self.limits.max_session_length}"
            )
        if batch > self.limits.max_batch:
            raise LimitExceeded(f"batch_size {batch} exceeds this node's max_batch {self.limits.max_batch}")
        return self.backend.open_session(start, end, batch, max_length)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Turn an exception into a gRPC status; unexpected ones are logged with their traceback."""
    if isinstance(error, SessionIdle):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, LimitExceeded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(error, ProtocolError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        log.exception("request failed")
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, str(error) or type(error).__name__)


class SessionIdle(SwarmError):
    """The client sent nothing on an open Inference stream for too long."""


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # keepalive lets both sides notice a dead peer quickly instead of waiting on TCP
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def start_grpc_server(
    servicer: BlockServicer, host: str, port: int, max_message_bytes: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start BlockService + health + reflection; returns (server, bound port, health servicer)."""
    server = grpc.aio.server(options=grpc_options(max_message_bytes))
    swarm_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port} (port in use?)")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
