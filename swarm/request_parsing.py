"""Parse every request inside the handler, so that bytes which are no protobuf get INVALID_ARGUMENT.

grpc.aio deserializes a request before the handler runs and answers a deserializer failure with
UNKNOWN (unary requests) or INTERNAL (request streams): a status that tells the caller nothing, and
that clients may even retry. `ParseRequests` is a server interceptor that swaps each method's
handler for one that receives the raw bytes and parses them itself: bytes that do not parse are
refused with INVALID_ARGUMENT and a message naming the method and the message type expected. It
covers every service of the server (swarm.v1, health, reflection) without touching any servicer.

A request stream that turns malformed halfway raises `MalformedRequest` (a `ProtocolError`) from
the servicer's request iterator: servicers that map ProtocolError to INVALID_ARGUMENT themselves
(BlockServicer) keep their own cleanup, and the error that escapes any other servicer is answered
INVALID_ARGUMENT here.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from swarm.errors import MalformedRequest

__all__ = ["ParseRequests", "caller"]

# The peer address (`context.peer()`: one client connection) of the call the current task handles.
# Set by ParseRequests for every call, so that a node's compute queue can serve its clients in turn
# without every layer between the servicer and the queue passing it along.
caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("swarm_caller", default=None)

Parse = Callable[[bytes], Any]


class ParseRequests(grpc.aio.ServerInterceptor):
    """Server interceptor: parse requests in the handler and refuse unparsable bytes with INVALID_ARGUMENT."""

    def __init__(self) -> None:
        # Handlers are fixed once the server starts: wrap each method once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = _wrap(method, await continuation(handler_call_details))
            if wrapped is not None:  # not unknown names: a client could send endless new ones
                self._wrapped[method] = wrapped
        return wrapped  # None for an unknown method: gRPC answers UNIMPLEMENTED


def _wrap(method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.request_deserializer is None:
        return handler  # unknown method, or one that takes raw bytes anyway
    parse = _parser(method, handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_request(handler.unary_unary, parse), response_serializer=serialize
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _unary_request(handler.unary_stream, parse), response_serializer=serialize
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _stream_request(handler.stream_unary, parse), response_serializer=serialize
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream_request(handler.stream_stream, parse), response_serializer=serialize
    )


def _parser(method: str, deserialize: Parse) -> Parse:
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    expected = getattr(message, "full_name", "its request message")

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as e:  # DecodeError, or invalid UTF-8 in a string field: remote input
            raise MalformedRequest(
                f"the {len(raw)} request bytes sent to {method} do not parse as {expected} ({e}); "
                "is the client built from the same swarm.v1 protocol?"
            ) from None

    return parse


def _unary_request(behavior: Callable[..., Any], parse: Parse) -> Callable[..., Any]:
    """Parse first; a malformed request never reaches `behavior`."""
    if inspect.isasyncgenfunction(behavior):  # streams its responses by yielding

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller.set(context.peer())
            request = await _parse_or_abort(parse, raw, context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        caller.set(context.peer())
        request = await _parse_or_abort(parse, raw, context)
        try:
            return await behavior(request, context)
        except NotImplementedError:  # a generated base method (health's List): no traceback per call
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not implement this method")

    return unary


def _stream_request(behavior: Callable[..., Any], parse: Parse) -> Callable[..., Any]:
    """Parse each message as the servicer pulls it; answer a MalformedRequest that escapes it."""

    async def requests(raw_requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            yield parse(raw)

    if inspect.isasyncgenfunction(behavior):

        async def stream(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            caller.set(context.peer())
            try:
                async for response in behavior(requests(raw_requests), context):
                    yield response
            except MalformedRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        return stream

    async def unary(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        caller.set(context.peer())
        try:
            return await behavior(requests(raw_requests), context)
        except MalformedRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return unary


async def _parse_or_abort(parse: Parse, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return parse(raw)
    except MalformedRequest as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
