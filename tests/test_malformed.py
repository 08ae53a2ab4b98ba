"""Bytes that are no valid request get INVALID_ARGUMENT on every method of every service a node
serves, and the node keeps serving (real gRPC on 127.0.0.1, a node with BlockService,
AveragingService, health and reflection)."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import swarm
from swarm import wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node.backend import BlockBackend
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server
from swarm.training.peers import AveragingServicer

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
SIZES = [1, 7, 100, 10_000, 1 << 20]
# Methods that check what they are sent: anything that parses but is not a request they can serve
# (an empty message, random fields) is refused by validation, also INVALID_ARGUMENT.
VALIDATING = {"Forward", "Backward", "Inference", "GetState", "LoadAdapter", "Report", "Collect", "Apply"}
VALIDATING |= {"DownloadState", "Push"}
TIMEOUT = 30.0


@pytest.fixture
async def node() -> AsyncIterator[str]:
    torch.manual_seed(0)
    blocks = [LlamaBlock(CONFIG) for _ in range(CONFIG.num_hidden_layers)]
    backend = BlockBackend(
        CONFIG, blocks, 0, dtype=torch.float32, device=torch.device("cpu"), cache_bytes=1 << 22
    )
    limits = ServerLimits(
        max_batch=4, max_tokens=256, max_session_length=64, max_message_bytes=4 << 20, session_idle_timeout=30
    )
    servicer = BlockServicer(backend, "tiny", "peer", limits)
    server, port, _ = await start_grpc_server(
        servicer, "127.0.0.1", 0, limits.max_message_bytes, averaging=AveragingServicer()
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        backend.shutdown()


async def served_methods(channel: grpc.aio.Channel) -> list[MethodDescriptor]:
    """Every method of every service the node lists through its own reflection service."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name for response in [await call.read()] for s in response.list_services_response.service]
    call.cancel()
    pool = descriptor_pool.Default()
    services = [pool.FindServiceByName(name) for name in names]
    return [m for s in services for m in s.methods]


def inputs(method: MethodDescriptor, rng: random.Random) -> list[tuple[bytes, bool]]:
    """(bytes, parses) of each size: random bytes, and random bytes after a tag of wire type 7, which
    never parses. Random bytes that happen to parse are only sent to methods that validate."""
    request_type = message_factory.GetMessageClass(method.input_type)
    out = []
    for size in SIZES:
        noise = rng.randbytes(size)
        for raw in (noise, b"\x0f" + noise[1:]):
            parses = _parses(request_type, raw)
            if not parses or method.name in VALIDATING:
                out.append((raw, parses))
    return out


def _parses(request_type: Any, raw: bytes) -> bool:
    try:
        request_type.FromString(raw)
        return True
    except Exception:
        return False


async def call_raw(channel: grpc.aio.Channel, method: MethodDescriptor, raw: bytes) -> grpc.RpcError | None:
    """Send `raw` as the request (the only one of a request stream); the error, or None if it was served."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[method.client_streaming, method.server_streaming]
    call: Any = kind(path)  # no serializers: the bytes go out as they are
    try:
        request = iter([raw]) if method.client_streaming else raw
        if method.server_streaming:
            async for _ in call(request, timeout=TIMEOUT):
                pass
        else:
            await call(request, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as e:
        return e
    return None


async def test_random_bytes_get_invalid_argument_on_every_method(
    node: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(12)
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(
        node, options=[("grpc.max_send_message_length", 4 << 20)]
    ) as channel:
        methods = await served_methods(channel)
        services = {m.containing_service.full_name for m in methods}
        assert {"swarm.v1.BlockService", "swarm.v1.AveragingService", "grpc.health.v1.Health"} <= services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
        sent = 0
        for method in methods:
            for raw, parses in inputs(method, rng):
                error = await call_raw(channel, method, raw)
                code = error.code() if error is not None else grpc.StatusCode.OK
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, len(raw), parses, error)
                assert error is not None and (error.details() or "")
                if not parses:
                    assert "do not parse as" in (error.details() or ""), error.details()
                sent += 1
        assert sent >= 2 * len(SIZES) * len(methods) - 10  # a few random strings parse, the rest do not
        await still_serves(channel)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_stream_that_turns_malformed_is_refused(node: str) -> None:
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION, model="tiny", span=swarm_pb2.Span(start=0, end=2)
    )
    first = swarm_pb2.InferenceRequest(
        header=header,
        open=swarm_pb2.InferenceOpen(max_length=8, batch_size=1),
        step=swarm_pb2.InferenceStep(hidden_states=wire.encode_tensor(torch.randn(1, 3, CONFIG.hidden_size))),
    )
    async with grpc.aio.insecure_channel(node) as channel:
        call: Any = channel.stream_stream("/swarm.v1.BlockService/Inference")(timeout=TIMEOUT)
        await call.write(first.SerializeToString())
        reply = swarm_pb2.InferenceResponse.FromString(await call.read())
        assert reply.length == 3
        await call.write(b"\x0f" + bytes(50))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "swarm.v1.InferenceRequest" in (error.value.details() or "")
        await still_serves(channel)


async def test_empty_requests_are_valid_messages_and_get_an_answer(
    node: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Zero bytes parse as the empty message: harmless methods answer it, the others refuse it."""
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(node) as channel:
        for method in await served_methods(channel):
            if method.server_streaming and method.name not in VALIDATING:
                continue  # Watch and reflection answer an empty request and keep the stream open
            error = await call_raw(channel, method, b"")
            code = error.code() if error is not None else grpc.StatusCode.OK
            expected = grpc.StatusCode.INVALID_ARGUMENT if method.name in VALIDATING else grpc.StatusCode.OK
            if method.full_name == "grpc.health.v1.Health.List":  # in health.proto, not in grpcio's servicer
                expected = grpc.StatusCode.UNIMPLEMENTED
            assert code == expected, (method.full_name, error)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def still_serves(channel: grpc.aio.Channel) -> None:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    header = swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION, model="tiny", span=swarm_pb2.Span(start=0, end=2)
    )
    request = swarm_pb2.ForwardRequest(
        header=header, hidden_states=wire.encode_tensor(torch.randn(2, 5, CONFIG.hidden_size))
    )
    response = await swarm_pb2_grpc.BlockServiceStub(channel).Forward(request, timeout=TIMEOUT)
    assert list(response.hidden_states.shape) == [2, 5, CONFIG.hidden_size]


async def test_unknown_methods_stay_unimplemented(node: str) -> None:
    async with grpc.aio.insecure_channel(node) as channel:
        for name in ("/swarm.v1.BlockService/Nope", "/no.such.Service/Info"):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await channel.unary_unary(name)(b"\x0f", timeout=TIMEOUT)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await still_serves(channel)
