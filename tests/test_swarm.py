"""End to end: a real DHT and two real node processes on 127.0.0.1, driven by the client."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import swarm
from swarm import checkpoint, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.model import DistributedModelForCausalLM
from swarm.errors import ConfigError, MissingBlocksError
from swarm.localswarm import LocalSwarm, NodeProcess
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", num_layers=8, eos_token_id=[]
    )


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        local.start_node(model_path, "0:4", name="node-a")
        local.start_node(model_path, "4:8", name="node-b")
        yield local


@pytest.fixture(scope="module")
def client(local_swarm: LocalSwarm, model_path: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        yield model


def node(local_swarm: LocalSwarm, name: str) -> NodeProcess:
    return next(p for p in local_swarm.processes if p.name == name)


def test_greedy_generation_matches_transformers(
    client: DistributedModelForCausalLM, model_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    input_ids = torch.tensor([[3, 17, 42, 99, 5, 64]])
    with torch.no_grad():
        expected = reference.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24, do_sample=False
        )
    got = client.generate(input_ids, max_new_tokens=24)
    assert got.shape == expected.shape
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 6:].tolist())) > 3  # a real continuation, not one token repeated


def test_batch_generation_matches_local_model(client: DistributedModelForCausalLM, model_path: Path) -> None:
    local = checkpoint.load_model(checkpoint.open_checkpoint(model_path))
    input_ids = torch.tensor([[3, 17, 42, 99], [7, 8, 9, 10]])
    caches = local.new_caches(2, 4 + 10)
    expected, new, start = input_ids, input_ids, 0
    with torch.no_grad():
        for _ in range(10):
            token = local(new, start=start, caches=caches)[:, -1].argmax(-1)
            start += new.shape[1]
            new = token[:, None]
            expected = torch.cat([expected, new], dim=1)
    assert client.generate(input_ids, max_new_tokens=10).tolist() == expected.tolist()


def test_generate_streams_like_transformers(client: DistributedModelForCausalLM) -> None:
    class Collect:
        def __init__(self) -> None:
            self.puts: list[list[int]] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended += 1

    streamer = Collect()
    prompt = torch.tensor([[3, 17, 42]])
    out = client.generate(prompt, max_new_tokens=6, streamer=streamer)
    assert streamer.puts[0] == [3, 17, 42]  # the prompt first, as transformers does
    streamed = [token for put in streamer.puts[1:] for token in put]
    assert streamed == out[0, 3:].tolist()  # then every new token, in order
    assert streamer.ended == 1


def test_client_in_bfloat16_generates(local_swarm: LocalSwarm, model_path: Path) -> None:
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        assert model.to(torch.bfloat16) is model
        assert model.parts.lm_head.weight.dtype == torch.bfloat16
        out = model.generate(torch.tensor([[3, 17, 42]]), max_new_tokens=5)
    assert out.shape == (1, 8)


def test_throughput_weighted_routing_gives_the_same_logits(
    local_swarm: LocalSwarm, model_path: Path, client: DistributedModelForCausalLM
) -> None:
    spread = swarm.ClientConfig(routing="throughput_weighted")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with (
        DistributedModelForCausalLM.from_pretrained(
            model_path, local_swarm.initial_peers, client_config=spread
        ) as model,
        torch.no_grad(),
    ):
        torch.testing.assert_close(model(input_ids), client(input_ids), rtol=1e-5, atol=1e-5)


def test_forward_matches_local_logits(client: DistributedModelForCausalLM, model_path: Path) -> None:
    local = checkpoint.load_model(checkpoint.open_checkpoint(model_path))
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = local(input_ids)
    assert torch.allclose(client.forward(input_ids), expected, atol=1e-5)


def test_uncovered_model_fails_fast_with_missing_blocks(local_swarm: LocalSwarm, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "nobody-serves-this", "llama", num_layers=4)
    started = time.monotonic()
    with pytest.raises(MissingBlocksError) as info:
        DistributedModelForCausalLM.from_pretrained(other, local_swarm.initial_peers)
    assert info.value.blocks == [0, 1, 2, 3]
    assert "0:4" in str(info.value)
    assert time.monotonic() - started < 60


# ---- the node's gRPC surface, called directly ---------------------------------------------------


@pytest.fixture(scope="module")
def channel(local_swarm: LocalSwarm) -> Iterator[grpc.Channel]:
    with node(local_swarm, "node-a").channel() as ch:
        yield ch


def header(model: str = "tiny-llama", start: int = 0, end: int = 4, version: int = swarm.PROTOCOL_VERSION):
    return swarm_pb2.RequestHeader(
        protocol_version=version, model=model, span=swarm_pb2.Span(start=start, end=end)
    )


def forward(channel: grpc.Channel, hidden: torch.Tensor, **kw: Any) -> torch.Tensor:
    stub = swarm_pb2_grpc.BlockServiceStub(channel)
    response = stub.Forward(
        swarm_pb2.ForwardRequest(header=header(**kw), hidden_states=wire.encode_tensor(hidden))
    )
    return wire.decode_tensor(response.hidden_states)


def test_info_health_and_reflection(channel: grpc.Channel) -> None:
    info = swarm_pb2_grpc.BlockServiceStub(channel).Info(swarm_pb2.InfoRequest(protocol_version=1))
    assert (info.model, info.span.start, info.span.end) == ("tiny-llama", 0, 4)
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="swarm.v1.BlockService")
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "swarm.v1.BlockService" in names


def test_sub_span_forward_matches_local_blocks(channel: grpc.Channel, model_path: Path) -> None:
    blocks = checkpoint.load_blocks(checkpoint.open_checkpoint(model_path), 1, 3)
    hidden = torch.randn(1, 5, 64)
    expected = hidden
    with torch.no_grad():
        for block in blocks:
            expected = block(expected)
    assert torch.allclose(forward(channel, hidden, start=1, end=3), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kw", "hidden_shape", "needle"),
    [
        ({"start": 4, "end": 8}, (1, 3, 64), "serves blocks 0:4"),
        ({"model": "other-model"}, (1, 3, 64), "serves model 'tiny-llama'"),
        ({"version": 99}, (1, 3, 64), "protocol version 99"),
        ({}, (1, 3, 32), "[batch, length, 64]"),
        ({}, (3, 64), "[batch, length, hidden]"),
    ],
)
def test_bad_requests_get_invalid_argument(
    channel: grpc.Channel, kw: dict[str, object], hidden_shape: tuple[int, ...], needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        forward(channel, torch.zeros(hidden_shape), **kw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_corrupt_tensor_gets_invalid_argument(channel: grpc.Channel) -> None:
    msg = wire.encode_tensor(torch.zeros(1, 3, 64))
    msg.data = msg.data[:-4]
    stub = swarm_pb2_grpc.BlockServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(swarm_pb2.ForwardRequest(header=header(), hidden_states=msg))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_requests_get_resource_exhausted(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:  # over max_tokens (8192 by default)
        forward(channel, torch.zeros(1, 9000, 64))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_tokens" in info.value.details()


def inference(
    channel: grpc.Channel, requests: list[swarm_pb2.InferenceRequest]
) -> list[swarm_pb2.InferenceResponse]:
    return list(swarm_pb2_grpc.BlockServiceStub(channel).Inference(iter(requests)))


def step(hidden: torch.Tensor, position: int, step_id: int = 1) -> swarm_pb2.InferenceStep:
    return swarm_pb2.InferenceStep(
        hidden_states=wire.encode_tensor(hidden), position=position, step_id=step_id
    )


def test_inference_stream_matches_forward_and_checks_positions(channel: grpc.Channel) -> None:
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(6))
    first = swarm_pb2.InferenceRequest(
        header=header(), open=swarm_pb2.InferenceOpen(max_length=8, batch_size=1), step=step(hidden[:, :5], 0)
    )
    responses = inference(channel, [first, swarm_pb2.InferenceRequest(step=step(hidden[:, 5:], 5, 2))])
    outputs = torch.cat([wire.decode_tensor(r.hidden_states) for r in responses], dim=1)
    assert [r.length for r in responses] == [5, 6]
    # Cached and uncached attention add in different orders: equal up to float32 rounding,
    # which grows with the activations' magnitude (~10 after four random blocks).
    torch.testing.assert_close(outputs, forward(channel, hidden), rtol=1e-4, atol=1e-4)

    with pytest.raises(grpc.RpcError) as info:  # a step at the wrong position
        inference(channel, [first, swarm_pb2.InferenceRequest(step=step(hidden[:, 5:], 3, 2))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "position 3" in info.value.details()


def test_generate_refuses_bad_prompts_and_says_why_nodes_refused_a_session(
    local_swarm: LocalSwarm, model_path: Path
) -> None:
    # a client of its own: a refused session must not ban the nodes for this client's next work
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        vocab = model.config.vocab_size
        for bad, words in [
            (torch.tensor([[1, vocab]]), f"token ids must be in [0, {vocab})"),
            (torch.tensor([[-1, 2]]), "got ids from -1 to 2"),
            (torch.tensor([[1.0, 2.0]]), "integer token ids"),
            (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
        ]:
            with pytest.raises(ConfigError, match=re.escape(words)):
                model.generate(bad, max_new_tokens=2)
        # longer than any node takes: every node of 0:4 refuses, and the error names their limit
        with pytest.raises(MissingBlocksError, match="max_session_length") as info:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=10**6)
        assert "RESOURCE_EXHAUSTED" in str(info.value)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)  # at once: nobody was banned
        assert out.shape == (1, 6)


def test_inference_limits(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:  # no session opened: unknown session
        inference(channel, [swarm_pb2.InferenceRequest(step=step(torch.zeros(1, 1, 64), 0))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        inference(
            channel,
            [
                swarm_pb2.InferenceRequest(
                    header=header(), open=swarm_pb2.InferenceOpen(max_length=10**6, batch_size=1)
                )
            ],
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_session_length" in info.value.details()
    open_ = swarm_pb2.InferenceOpen(max_length=4, batch_size=1)
    with pytest.raises(grpc.RpcError) as info:  # more tokens than the session was opened for
        inference(
            channel,
            [swarm_pb2.InferenceRequest(header=header(), open=open_, step=step(torch.zeros(1, 5, 64), 0))],
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_backward_matches_local_autograd(channel: grpc.Channel, model_path: Path) -> None:
    blocks = checkpoint.load_blocks(checkpoint.open_checkpoint(model_path), 0, 4)
    hidden = torch.randn(2, 4, 64, requires_grad=True)
    out = hidden
    for block in blocks:
        out = block(out)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, hidden, grad_out)
    request = swarm_pb2.BackwardRequest(
        header=header(),
        hidden_states=wire.encode_tensor(hidden.detach()),
        grad_outputs=wire.encode_tensor(grad_out),
    )
    got = wire.decode_tensor(swarm_pb2_grpc.BlockServiceStub(channel).Backward(request).grad_inputs)
    assert (got - expected).norm() / expected.norm() <= 1e-5


# ---- command line and lifecycle -----------------------------------------------------------------


def test_cli_generate_prints_the_client_tokens(
    local_swarm: LocalSwarm, client: DistributedModelForCausalLM, model_path: Path
) -> None:
    prompt = [3, 17, 42]
    expected = client.generate(torch.tensor([prompt]), max_new_tokens=6)[0, 3:].tolist()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli",
            "generate",
            "--model",
            str(model_path),
            "--initial-peers",
            *local_swarm.initial_peers,
            "--prompt-ids",
            *map(str, prompt),
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert [int(t) for t in result.stdout.split()] == expected


def test_sigterm_stops_a_node_cleanly(local_swarm: LocalSwarm, model_path: Path) -> None:
    extra = local_swarm.start_node(model_path, "2:6", name="node-extra")
    assert "swarm-node ready:" in extra.log_path.read_text()
    assert local_swarm.stop(extra, signal.SIGTERM) == 0
    log = extra.log_path.read_text()
    assert "Traceback" not in log


def test_cli_generate_takes_text_when_the_model_has_a_tokenizer(
    local_swarm: LocalSwarm, client: DistributedModelForCausalLM, model_path: Path
) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(model_path / "tokenizer.json"))
    expected = client.generate(torch.tensor([[3, 17, 42]]), max_new_tokens=5)[0, 3:].tolist()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "swarm.cli", "generate", "--model", str(model_path)),
            *(
                "--initial-peers",
                *local_swarm.initial_peers,
                "--prompt",
                "w3 w17 w42",
                "--max-new-tokens",
                "5",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert result.stdout.strip() == "".join(f"w{t}" for t in expected)


def test_idle_inference_session_is_closed(local_swarm: LocalSwarm, model_path: Path) -> None:
    strict = local_swarm.start_node(model_path, "0:4", "--session-idle-timeout", "0.5", name="node-strict")
    try:
        with strict.channel() as ch:
            stub = swarm_pb2_grpc.BlockServiceStub(ch)
            first = swarm_pb2.InferenceRequest(
                header=header(), open=swarm_pb2.InferenceOpen(max_length=8, batch_size=1)
            )
            # The request stream never ends after the open: the node must give up, not wait forever.
            stall = threading.Event()

            def requests() -> Iterator[swarm_pb2.InferenceRequest]:
                yield first
                stall.wait(30)

            with pytest.raises(grpc.RpcError) as info:
                list(stub.Inference(requests(), timeout=30))
            stall.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle for more than 0.5 s" in (info.value.details() or "")
    finally:
        local_swarm.stop(strict)
