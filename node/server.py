"""The gRPC face of a node: BlockService, health and reflection on grpc.aio.

Every request is checked before anything is allocated: protocol version, model name and
span, tensor size against the node's limits. Refusals carry a status a client can act on:
INVALID_ARGUMENT for a malformed request, RESOURCE_EXHAUSTED for one over a limit, and
never an unhandled exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import swarm
from swarm import receipts, tls, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.adapters import encode_named
from swarm.errors import (
    AdapterNotLoaded,
    ConfigError,
    DeadlineExceeded,
    LimitExceeded,
    PeerUnavailable,
    ProtocolError,
    SwarmError,
)
from swarm.node.adapters import Adapter
from swarm.node.backend import BackendClosed, BlockBackend, InferenceSession, deadline_after
from swarm.node.metrics import NodeMetrics, RequestOutcome
from swarm.node.push import (
    PUSH_ID_BYTES,
    Allowed,
    PushChannels,
    PushInputs,
    PushLink,
    SessionInbox,
    refuse_all,
)
from swarm.request_parsing import ParseRequests

log = logging.getLogger(__name__)
SERVICE_NAME = swarm_pb2.DESCRIPTOR.services_by_name["BlockService"].full_name
R = TypeVar("R", swarm_pb2.ForwardResponse, swarm_pb2.BackwardResponse, swarm_pb2.InferenceResponse)
AVERAGING_SERVICE_NAME = swarm_pb2.DESCRIPTOR.services_by_name["AveragingService"].full_name
MAX_PING_BYTES = 16 << 20  # a bandwidth probe needs a few MiB, not the whole message limit
REACHABILITY_TIMEOUT = 5.0  # seconds to dial a joining node back


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int
    max_tokens: int
    max_session_length: int
    max_message_bytes: int
    session_idle_timeout: float


class BlockServicer(swarm_pb2_grpc.BlockServiceServicer):
    def __init__(
        self,
        backend: BlockBackend | None,
        model: str,
        peer_id: str,
        limits: ServerLimits,
        quant: str = "none",
        metrics: NodeMetrics | None = None,
        *,
        signer: receipts.ReceiptSigner | None = None,
        corrupt_rate: float = 0.0,
        push: bool = True,
        push_allowed: Allowed = refuse_all,
    ) -> None:
        self.backend = backend
        self.model = model
        self.peer_id = peer_id
        self.limits = limits
        self.quant = quant
        self.metrics = metrics or NodeMetrics()
        # The node key signs every answer (a Receipt), so a client can prove to others what it got.
        self.signer = signer
        # Fault injection (--corrupt-rate, tests and benchmarks): perturb this fraction of answers.
        self.corrupt_rate = corrupt_rate
        self._corrupt_rng = random.Random()
        # Set by the runtime as the node's life goes on; reported by Info. A servicer built
        # around a ready backend (tests, benchmarks) is online from the start.
        self.state = "online" if backend is not None else "joining"
        self.compute_throughput = 0.0
        # A training node's optimizer epoch (steps of its stage's collaboration) and recent epochs'
        # weight fingerprints, for GetState; read on the compute thread along with the weights.
        self.training_status: Callable[[], tuple[int, dict[int, list[float]]]] = lambda: (0, {})
        # Training nodes: wait (bounded) until the stage has reached an epoch (RequestHeader.min_epoch).
        # The second argument is the caller's time left (None: no deadline): the wait leaves half of
        # it for the computation, so a stage that lags makes a request stale, never late.
        self.await_epoch: Callable[[int, float | None], Awaitable[None]] | None = None
        # Training nodes: the epoch of the stage's common weights held now (None: own weights), so
        # a spot check compares stage peers only on answers from the same weights.
        self.shared_epoch: Callable[[], int | None] | None = None
        # Server-to-server push: sessions that take pushed inputs, by push id, and the channels
        # this node pushes its sessions' outputs over, to targets `push_allowed` vouches for (the
        # runtime's PushGate checks them against the swarm's signed records; by default none is).
        self.push = push  # False (--no-push): ignore push ids and targets, as a node that predates push
        self._push_inboxes: dict[bytes, SessionInbox] = {}
        self._push_channels = PushChannels(push_allowed)
        # Requests and sessions in progress; draining waits for `idle`.
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.contextmanager
    def _track(self, rpc: str, context: grpc.aio.ServicerContext) -> Iterator[RequestOutcome]:
        """Count the request as in flight (for draining) and record its latency and status."""
        self.active += 1
        self.idle.clear()
        try:
            with self.metrics.track_request(rpc, context) as outcome:
                yield outcome
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def close(self) -> None:
        """Close the channels this node pushed over (at shutdown, after the gRPC server stopped)."""
        await self._push_channels.close()

    # ---- validation -------------------------------------------------------------------------

    def _backend(self) -> BlockBackend:
        """The backend, or NotServing while the node loads or moves to another span."""
        if self.backend is None:
            raise NotServing(f"this node is {self.state} and serves no blocks right now; use another server")
        return self.backend

    def _check_header(self, header: swarm_pb2.RequestHeader) -> tuple[int, int]:
        backend = self._backend()
        if self.state != "online":
            raise NotServing(f"this node is {self.state} and takes no new requests; use another server")
        if header.protocol_version != swarm.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {header.protocol_version} is not supported; "
                f"this node speaks version {swarm.PROTOCOL_VERSION}"
            )
        if header.model != self.model:
            raise ProtocolError(f"this node serves model {self.model!r}, the request names {header.model!r}")
        start, end = header.span.start, header.span.end
        if not (backend.start <= start < end <= backend.end):
            raise ProtocolError(
                f"this node serves blocks {backend.start}:{backend.end}, the request asks for {start}:{end}"
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
        max_elements = self.limits.max_tokens * self._backend().config.hidden_size
        tensor = wire.decode_tensor(msg, max_elements=max_elements)
        self.metrics.observe_wire("received", wire.raw_nbytes(tensor), wire.encoded_nbytes(msg))
        return tensor

    def _adapter(self, header: swarm_pb2.RequestHeader) -> Adapter | None:
        """The adapter the header names (NOT_FOUND if this node does not hold it), or None."""
        return self._backend().adapters.get(header.adapter) if header.adapter else None

    def _decode_prompts(
        self,
        request: swarm_pb2.ForwardRequest | swarm_pb2.BackwardRequest | swarm_pb2.InferenceStep,
        span: tuple[int, int],
    ) -> torch.Tensor | None:
        """The request's deep prompts [span blocks, batch or 1, prefix, hidden], bounded like hidden
        states; None when it has none."""
        if not request.HasField("prompts"):
            return None
        max_elements = (span[1] - span[0]) * self.limits.max_tokens * self._backend().config.hidden_size
        prompts = wire.decode_tensor(request.prompts, max_elements=max_elements)
        self.metrics.observe_wire("received", wire.raw_nbytes(prompts), wire.encoded_nbytes(request.prompts))
        return prompts

    def _count_tokens(self, rpc: str, hidden: torch.Tensor) -> None:
        self.metrics.tokens.labels(rpc=rpc).inc(hidden.shape[0] * hidden.shape[1])

    def _encode(self, t: torch.Tensor, header: swarm_pb2.RequestHeader) -> swarm_pb2.Tensor:
        if self.corrupt_rate and self._corrupt_rng.random() < self.corrupt_rate:
            t = corrupt(t)
        msg = wire.encode_tensor(t, header.response_codec)
        self.metrics.observe_wire("sent", wire.raw_nbytes(t), wire.encoded_nbytes(msg))
        return msg

    def _shared_epoch(self) -> int | None:
        # Read on the event loop: optimizer steps run on the compute thread, exclusively of any
        # computation, so the same value before and after a computation is the one it used.
        return None if self.shared_epoch is None else self.shared_epoch()

    def _sign(self, method: str, request: Message | bytes, response: R) -> R:
        """Attach the node's receipt; `request`: the request, or the stream's chained digest."""
        if self.signer is not None:
            digest = request if isinstance(request, bytes) else receipts.message_digest(request)
            receipts.sign_response(self.signer, method, digest, response)
        return response

    # ---- RPCs -------------------------------------------------------------------------------

    async def Info(
        self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.InfoResponse:
        self.metrics.requests.labels(rpc="Info", code="OK").inc()
        return swarm_pb2.InfoResponse(
            protocol_version=swarm.PROTOCOL_VERSION,
            model=self.model,
            span=swarm_pb2.Span(start=self.backend.start, end=self.backend.end) if self.backend else None,
            peer_id=self.peer_id,
            version=swarm.__version__,
            dtype=str(self.backend.dtype).removeprefix("torch.") if self.backend else "",
            device=str(self.backend.device) if self.backend else "",
            max_message_bytes=self.limits.max_message_bytes,
            max_batch=self.limits.max_batch,
            max_tokens=self.limits.max_tokens,
            max_session_length=self.limits.max_session_length,
            compute_throughput=self.compute_throughput,
            state=self.state,
            quant=self.quant,
        )

    async def Ping(
        self, request: swarm_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.PingResponse:
        self.metrics.requests.labels(rpc="Ping", code="OK").inc()
        reply_bytes = min(request.reply_bytes, MAX_PING_BYTES, self.limits.max_message_bytes - 1024)
        return swarm_pb2.PingResponse(payload=bytes(max(0, reply_bytes)))

    async def CheckReachability(
        self, request: swarm_pb2.ReachabilityRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ReachabilityResponse:
        self.metrics.requests.labels(rpc="CheckReachability", code="OK").inc()
        error = await dial_back(
            request.address, request.expected_peer_id, request.tls_cert_sha256, REACHABILITY_TIMEOUT
        )
        return swarm_pb2.ReachabilityResponse(reachable=error is None, error=error or "")

    async def Forward(
        self, request: swarm_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.ForwardResponse:
        with self._track("Forward", context):
            try:
                start, end = self._check_header(request.header)
                adapter = self._adapter(request.header)
                hidden = self._decode_hidden(request.hidden_states)
                prompts = self._decode_prompts(request, (start, end))
                if request.header.min_epoch and self.await_epoch is not None:
                    await self.await_epoch(request.header.min_epoch, context.time_remaining())
                deadline = deadline_after(context.time_remaining())
                before = self._shared_epoch()
                out = await self._backend().forward(
                    hidden, start, end, adapter=adapter, prompts=prompts, deadline=deadline
                )
                self._count_tokens("Forward", hidden)
                response = swarm_pb2.ForwardResponse(hidden_states=self._encode(out, request.header))
                if before is not None and before == self._shared_epoch():
                    response.epoch = before
                return self._sign("Forward", request, response)
            except Exception as e:
                await _abort(context, e)
                raise  # unreachable: abort raises

    async def Backward(
        self, request: swarm_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.BackwardResponse:
        with self._track("Backward", context):
            try:
                start, end = self._check_header(request.header)
                adapter = self._adapter(request.header)
                hidden = self._decode_hidden(request.hidden_states)
                grad_out = self._decode_hidden(request.grad_outputs, "grad_outputs")
                prompts = self._decode_prompts(request, (start, end))
                if request.header.min_epoch and self.await_epoch is not None:
                    await self.await_epoch(request.header.min_epoch, context.time_remaining())
                deadline = deadline_after(context.time_remaining())
                step = request.header.step if request.header.HasField("step") else None
                before = self._shared_epoch()
                result = await self._backend().backward(
                    hidden,
                    grad_out,
                    start,
                    end,
                    adapter=adapter,
                    prompts=prompts,
                    deadline=deadline,
                    step=step,
                    accumulate=not request.header.check,
                )
                self._count_tokens("Backward", hidden)
                response = swarm_pb2.BackwardResponse(
                    grad_inputs=self._encode(result.grad_inputs, request.header),
                    adapter_grads=encode_named(result.adapter_grads),
                )
                if result.grad_prompts is not None:
                    response.grad_prompts.CopyFrom(self._encode(result.grad_prompts, request.header))
                if before is not None and before == self._shared_epoch():
                    response.epoch = before
                return self._sign("Backward", request, response)
            except Exception as e:
                await _abort(context, e)
                raise

    async def Inference(
        self, request_iterator: AsyncIterator[swarm_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.InferenceResponse]:
        with self._track("Inference", context):
            async for response in self._inference(request_iterator, context):
                yield response

    async def _inference(
        self, request_iterator: AsyncIterator[swarm_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.InferenceResponse]:
        session: InferenceSession | None = None
        header = swarm_pb2.RequestHeader()
        requests = aiter(request_iterator)
        chain = receipts.CHAIN_START  # digest of every request of the stream so far (Receipt)
        # Server-to-server push (node/push.py): set up when the client opens with a push_id.
        inbox: SessionInbox | None = None
        inputs = PushInputs()
        link: PushLink | None = None
        push_id = b""
        try:
            while True:
                try:  # a client that stops sending must not pin its KV cache forever
                    # asyncio.timeout, not wait_for: no extra task per step (Python 3.11)
                    async with asyncio.timeout(self.limits.session_idle_timeout):
                        item = await (anext(requests, None) if inbox is None else inbox.get())
                except TimeoutError:
                    raise SessionIdle(
                        f"inference session idle for more than {self.limits.session_idle_timeout} s; "
                        "its KV cache was released"
                    ) from None
                if item is None:
                    break
                if isinstance(item, swarm_pb2.PushMessage):
                    data = inputs.on_push(item)
                    if data is None or inputs.waiting is None:
                        continue
                    step, by_push = inputs.waiting, True
                else:
                    request = item
                    if self.signer is not None:
                        chain = receipts.chain_digest(chain, request)
                    if session is None:
                        header = request.header
                        backend = self._backend()  # the session stays on it even if the node moves
                        session = self._open_session(request, context.peer())
                        push_id = self._register_push(request.open.push_id, requests)
                        if push_id:
                            inbox = self._push_inboxes[push_id]
                    if not request.HasField("step"):
                        continue
                    step = request.step
                    if step.pushed and inbox is None:
                        raise ProtocolError("a `pushed` step in a session opened without a push_id")
                    if inputs.is_late_copy(step):
                        continue  # the push delivered this input first; the step is computed
                    waited = inputs.waiting
                    data, by_push = inputs.on_step(step)
                    if data is None:
                        continue  # wait for the push (or the client's copy)
                    if waited is not None:  # the client's copy of a pushed input came first
                        step = waited
                        self.metrics.push_fallbacks.inc()
                assert session is not None  # pushes reach only an open session's inbox
                if step.HasField("push") and self.push:
                    link = link or PushLink(self._push_channels, session.end)
                    link.prepare(step.push)  # checks, then dials, beside the computation: once per target
                deadline = deadline_after(context.time_remaining())
                response = await self._inference_step(backend, session, header, step, data, deadline)
                if step.pushed:
                    inputs.computed(step.step_id)
                    response.input_sha256 = receipts.message_digest(data)
                    if by_push:
                        self.metrics.pushes_received.inc()
                response.accepts_push = inbox is not None
                if link is not None and step.push.step_id:  # step_id 0: only dial (the first step)
                    # Before answering: the next node starts while this answer travels.
                    response.pushed = await link.send(step.push, response.hidden_states)
                    if response.pushed:
                        counter = self.metrics.pushes_sent
                    else:
                        counter = self.metrics.push_refusals if link.refused else self.metrics.push_failures
                    counter.inc()
                yield self._sign("Inference", chain, response)
        except Exception as e:
            await _abort(context, e)
        finally:
            if link is not None:
                link.close()
            if inbox is not None:
                self._push_inboxes.pop(push_id, None)
                await inbox.close()
            if session is not None:
                backend.close_session(session)

    async def _inference_step(
        self,
        backend: BlockBackend,
        session: InferenceSession,
        header: swarm_pb2.RequestHeader,
        step: swarm_pb2.InferenceStep,
        data: swarm_pb2.Tensor,
        deadline: float | None,
    ) -> swarm_pb2.InferenceResponse:
        hidden = self._decode_hidden(data)
        prompts = self._decode_prompts(step, (session.start, session.end))
        started = time.perf_counter()
        keep = step.keep if step.HasField("keep") else None
        position = step.position
        out = await backend.step(session, hidden, position, prompts=prompts, deadline=deadline, keep=keep)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self._count_tokens("Inference", hidden)
        return swarm_pb2.InferenceResponse(
            hidden_states=self._encode(out, header), step_id=step.step_id, length=session.length
        )

    def _register_push(self, push_id: bytes, requests: AsyncIterator[swarm_pb2.InferenceRequest]) -> bytes:
        """Make the session reachable by Push under the client's id (b"": the client wants no push)."""
        if not push_id or not self.push:
            return b""
        if len(push_id) != PUSH_ID_BYTES:
            raise ProtocolError(f"push_id must be {PUSH_ID_BYTES} random bytes, got {len(push_id)}")
        if push_id in self._push_inboxes:
            raise ProtocolError("push_id already names another session here; make a fresh random one")
        self._push_inboxes[push_id] = SessionInbox(requests)
        return push_id

    async def Push(
        self, request_iterator: AsyncIterator[swarm_pb2.PushMessage], context: grpc.aio.ServicerContext
    ) -> swarm_pb2.PushSummary:
        """Deliver pushed inputs to this node's sessions (NOT_FOUND once the session is gone)."""
        accepted = 0
        with self.metrics.track_request("Push", context):
            try:
                async for message in request_iterator:
                    if len(message.push_id) != PUSH_ID_BYTES:
                        raise ProtocolError(
                            f"push_id must be {PUSH_ID_BYTES} bytes, got {len(message.push_id)}"
                        )
                    inbox = self._push_inboxes.get(message.push_id)
                    if inbox is None:
                        raise SessionGone("no inference session here has this push_id (closed?)")
                    inbox.deliver(message)
                    accepted += 1
            except Exception as e:
                await _abort(context, e)
        return swarm_pb2.PushSummary(accepted=accepted)

    def _open_session(self, request: swarm_pb2.InferenceRequest, owner: str) -> InferenceSession:
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
        adapter = self._adapter(request.header)
        # owner: the client's connection, which gets a fair share of the KV cache (CacheBudget)
        return self._backend().open_session(start, end, batch, max_length, adapter, owner=owner)

    async def GetState(
        self, request: swarm_pb2.StateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.StateChunk]:
        with self._track("GetState", context):
            try:
                backend = self._backend()
                header = swarm_pb2.RequestHeader(
                    protocol_version=request.protocol_version, model=request.model
                )
                header.span.start, header.span.end = backend.start, backend.end
                self._check_header(header)
                state, (epoch, fingerprints) = await backend.state(self.training_status)
            except Exception as e:
                await _abort(context, e)
                raise
            span = swarm_pb2.Span(start=backend.start, end=backend.end)
            for i in range(backend.start, backend.end):  # one block per message
                prefix = f"model.layers.{i}."
                tensors = [
                    swarm_pb2.NamedTensor(name=name, tensor=wire.encode_tensor(t, "none"))
                    for name, t in state.items()
                    if name.startswith(prefix)
                ]
                chunk = swarm_pb2.StateChunk(tensors=tensors, epoch=epoch, span=span)
                if i == backend.end - 1:
                    chunk.fingerprints.extend(
                        swarm_pb2.EpochFingerprint(epoch=e, sum_of_squares=f) for e, f in fingerprints.items()
                    )
                yield chunk

    async def LoadAdapter(
        self, request: swarm_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> swarm_pb2.LoadAdapterResponse:
        with self._track("LoadAdapter", context):
            try:
                header = swarm_pb2.RequestHeader(
                    protocol_version=request.protocol_version, model=request.model
                )
                backend = self._backend()
                header.span.start, header.span.end = backend.start, backend.end
                self._check_header(header)
                span = (backend.start, backend.end)
                # Hashing and copying a large adapter takes a while: keep the event loop free.
                await asyncio.to_thread(
                    backend.adapters.load, request, backend.config, span, backend.device, context.peer()
                )
                return swarm_pb2.LoadAdapterResponse(
                    cached_bytes=backend.adapters.used, budget_bytes=backend.adapters.budget
                )
            except Exception as e:
                await _abort(context, e)
                raise


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Turn an exception into a gRPC status; unexpected ones are logged with their traceback."""
    if isinstance(error, NotServing | PeerUnavailable):  # PeerUnavailable: a training peer behind its stage
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(error, SessionIdle | DeadlineExceeded):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, BackendClosed):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(error, AdapterNotLoaded | SessionGone):
        code = grpc.StatusCode.NOT_FOUND
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


async def dial_back(address: str, expected_peer_id: str, cert_sha256: str, timeout: float) -> str | None:
    """Call Info at `address` (over TLS pinned to `cert_sha256`, when given); None when it answers
    as `expected_peer_id`, else why not."""
    try:
        channel = await tls.open_channel(address, cert_sha256, peer=expected_peer_id, timeout=timeout)
        async with channel:
            stub = swarm_pb2_grpc.BlockServiceStub(channel)
            info = await stub.Info(
                swarm_pb2.InfoRequest(protocol_version=swarm.PROTOCOL_VERSION), timeout=timeout
            )
    except grpc.aio.AioRpcError as e:
        return f"dialling {address} failed: {e.code().name} {e.details() or ''}".strip()
    except SwarmError as e:  # no TLS there, or another certificate than the one to be announced
        return f"dialling {address} failed: {e}"
    except Exception as e:  # a malformed address, say; the joining node gets the reason
        return f"dialling {address} failed: {e}"
    if expected_peer_id and info.peer_id != expected_peer_id:
        return f"{address} answered as peer {info.peer_id}, not {expected_peer_id} (another node's port?)"
    return None


class SessionIdle(SwarmError):
    """The client sent nothing on an open Inference stream for too long."""


class SessionGone(SwarmError):
    """A push names a session this node does not hold (closed, or never opened here)."""


def corrupt(t: torch.Tensor) -> torch.Tensor:
    """A dishonest answer for fault injection: noise as large as the values themselves, far above
    any numeric noise (a client's spot checks must catch it)."""
    scale = t.detach().float().std().clamp_min(1e-3)
    return (t.float() + torch.randn(t.shape) * scale).to(t.dtype)


class NotServing(SwarmError):
    """The node is loading, moving or draining: the client should go to another server."""


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
    servicer: BlockServicer,
    host: str,
    port: int,
    max_message_bytes: int,
    *,
    averaging: swarm_pb2_grpc.AveragingServiceServicer | None = None,
    certificate: tls.NodeCertificate | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start BlockService (+ AveragingService for a training node) + health + reflection, over TLS
    with `certificate` (plaintext without); returns (server, bound port, health servicer)."""
    # ParseRequests: bytes that are no protobuf get INVALID_ARGUMENT, on every service below.
    server = grpc.aio.server(options=grpc_options(max_message_bytes), interceptors=[ParseRequests()])
    swarm_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
    services = [SERVICE_NAME]
    if averaging is not None:
        swarm_pb2_grpc.add_AveragingServiceServicer_to_server(averaging, server)
        services.append(AVERAGING_SERVICE_NAME)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if certificate is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", certificate.server_credentials())
    if bound == 0:
        raise ConfigError(f"could not bind the gRPC server to {host}:{port}: is the port in use? (--port)")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
