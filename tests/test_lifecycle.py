"""A node's life as a volunteer sees it: KV-cache budget, draining on SIGTERM, reachability,
metrics, and refusals at start-up. Real DHT, real node processes, real signals."""

from __future__ import annotations

import queue
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

import swarm
from swarm import checkpoint, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.client.loop import run_sync
from swarm.coordinator.swarm_map import fetch_swarm_map
from swarm.dht import start_dht
from swarm.errors import SwarmError
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.models.llama import LayerCache
from swarm.records import ServerState
from tests.checkpoints import make_checkpoint

SESSION_LENGTH = 16
SPAN = (0, 2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "life-llama", "llama", num_layers=4)


@pytest.fixture(scope="module")
def one_session_bytes(model_path: Path) -> int:
    config = checkpoint.open_checkpoint(model_path).config
    per_block = LayerCache.bytes_needed(config, 1, SESSION_LENGTH, torch.float32)
    return per_block * (SPAN[1] - SPAN[0])


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        yield local


@pytest.fixture(scope="module")
def small_node(local_swarm: LocalSwarm, model_path: Path, one_session_bytes: int) -> NodeProcess:
    """Blocks 0:2 with a KV-cache budget of exactly one session, and metrics on."""
    budget = ("--cache-bytes", str(one_session_bytes), "--metrics-port", "0", "--throughput", "50")
    return local_swarm.start_node(model_path, f"{SPAN[0]}:{SPAN[1]}", *budget, name="small")


def header(start: int = SPAN[0], end: int = SPAN[1]) -> swarm_pb2.RequestHeader:
    return swarm_pb2.RequestHeader(
        protocol_version=swarm.PROTOCOL_VERSION, model="life-llama", span=swarm_pb2.Span(start=start, end=end)
    )


class Session:
    """An Inference stream kept open between steps, driven from the test thread."""

    def __init__(self, channel: grpc.Channel, max_length: int = SESSION_LENGTH) -> None:
        self._requests: queue.Queue[swarm_pb2.InferenceRequest | None] = queue.Queue()
        self._open = swarm_pb2.InferenceRequest(
            header=header(), open=swarm_pb2.InferenceOpen(max_length=max_length, batch_size=1)
        )
        self._responses = swarm_pb2_grpc.BlockServiceStub(channel).Inference(
            iter(self._requests.get, None), timeout=60
        )
        self.position = 0

    def step(self, tokens: int = 1) -> torch.Tensor:
        request = self._open if self.position == 0 else swarm_pb2.InferenceRequest()
        hidden = torch.randn(1, tokens, 64)
        request.step.CopyFrom(
            swarm_pb2.InferenceStep(hidden_states=wire.encode_tensor(hidden), position=self.position)
        )
        self._requests.put(request)
        out = wire.decode_tensor(next(self._responses).hidden_states)
        self.position += tokens
        return out

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._responses:  # drain until the node ends the stream
            pass


def forward(channel: grpc.Channel) -> torch.Tensor:
    response = swarm_pb2_grpc.BlockServiceStub(channel).Forward(
        swarm_pb2.ForwardRequest(header=header(), hidden_states=wire.encode_tensor(torch.randn(1, 3, 64))),
        timeout=30,
    )
    return wire.decode_tensor(response.hidden_states)


def scrape(node: NodeProcess) -> str:
    url = f"http://127.0.0.1:{node.info['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_cache_budget_refuses_a_second_session_until_the_first_closes(small_node: NodeProcess) -> None:
    with small_node.channel() as channel:
        first = Session(channel)
        first.step(4)
        second = Session(channel)
        with pytest.raises(grpc.RpcError) as info:
            second.step()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache full" in (info.value.details() or "")
        assert "0 of" in (info.value.details() or "")  # names the free and total bytes
        first.close()
        third = Session(channel)
        assert third.step(2).shape == (1, 2, 64)
        third.close()


def test_metrics_endpoint_reports_requests_span_state_and_cache(
    small_node: NodeProcess, one_session_bytes: int
) -> None:
    with small_node.channel() as channel:
        before = scrape(small_node)
        forward(channel)
        forward(channel)
    text = scrape(small_node)

    def value(sample: str, page: str) -> float:
        line = next((x for x in page.splitlines() if x.startswith(sample + " ")), None)
        return float(line.split()[-1]) if line else 0.0

    ok = 'swarm_node_requests_total{code="OK",rpc="Forward"}'
    assert value(ok, text) - value(ok, before) == 2
    assert value('swarm_node_tokens_total{rpc="Forward"}', text) >= 6
    assert value('swarm_node_state{state="online"}', text) == 1
    assert value('swarm_node_state{state="joining"}', text) == 0
    assert value("swarm_node_span_start", text) == SPAN[0]
    assert value("swarm_node_span_end", text) == SPAN[1]
    assert value("swarm_node_cache_total_bytes", text) == one_session_bytes
    assert value('swarm_node_throughput_tokens_per_second{kind="announced"}', text) == 50
    received = 'swarm_node_wire_bytes_total{direction="received",encoding="compressed"}'
    assert value(received, text) > value(received, before)


def test_free_cache_and_throughput_are_announced(local_swarm: LocalSwarm, small_node: NodeProcess) -> None:
    dht = start_dht(initial_peers=local_swarm.initial_peers, client_mode=True)
    try:
        swarm_map = run_sync(fetch_swarm_map(dht, "life-llama", 4))
    finally:
        dht.shutdown()
    mine = next(r for r in swarm_map.servers if r.peer_id == small_node.info["peer_id"])
    assert mine.state == ServerState.ONLINE
    assert mine.free_cache_tokens == SESSION_LENGTH
    assert mine.throughput == 50


def test_sigterm_drains_open_sessions_then_exits(local_swarm: LocalSwarm, model_path: Path) -> None:
    node = local_swarm.start_node(
        model_path, "0:2", "--drain-timeout", "60", "--announce-period", "2", name="draining"
    )
    with node.channel() as channel:
        session = Session(channel)
        session.step(3)
        node.proc.send_signal(signal.SIGTERM)
        # The open session keeps being served while the node drains...
        assert session.step(1).shape == (1, 1, 64)
        # ...but new work is sent elsewhere.
        with pytest.raises(grpc.RpcError) as info:
            forward(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (info.value.details() or "")
        assert node.proc.poll() is None
        session.close()
    assert local_swarm.stop(node, timeout=30) == 0
    log = node.log_path.read_text()
    assert "Traceback" not in log


def test_unreachable_announced_address_is_refused_with_the_fix(
    local_swarm: LocalSwarm, model_path: Path, small_node: NodeProcess
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(SwarmError) as info:
        local_swarm.start_node(model_path, "2:4", "--announce-port", str(closed_port), name="behind-nat")
    message = str(info.value)
    assert "exited with code 2" in message
    assert f"127.0.0.1:{closed_port}" in message
    assert "--announce-host" in message


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--quant", "int8", "--device", "cpu"), "--quant int8 needs a CUDA device"),
        (("--cache-bytes", str(1 << 50)), "do not fit"),
        (("--blocks", "2:9"), "the model has 4 blocks"),
    ],
)
def test_impossible_configurations_fail_at_start_with_the_reason(
    local_swarm: LocalSwarm, model_path: Path, flags: tuple[str, ...], expected: str
) -> None:
    span = () if "--blocks" in flags else ("--blocks", "0:2")
    with pytest.raises(SwarmError) as info:
        local_swarm.start_node(model_path, None, *span, *flags, name="impossible")
    assert "exited with code 2" in str(info.value)
    assert expected in str(info.value)
