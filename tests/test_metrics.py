"""NodeMetrics over a real HTTP /metrics endpoint on port 0."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from swarm.node.metrics import STATES, NodeMetrics, start_metrics_server


def scrape(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return {line for line in body.decode().splitlines() if line and not line.startswith("#")}


@pytest.fixture
def served() -> Iterator[tuple[NodeMetrics, int]]:
    metrics = NodeMetrics()
    port, stop = start_metrics_server(metrics, "127.0.0.1", 0)
    yield metrics, port
    stop()


def test_counters_histograms_and_gauges_are_served(served: tuple[NodeMetrics, int]) -> None:
    metrics, port = served
    metrics.observe_request("Forward", "OK", 0.003)
    metrics.observe_request("Forward", "OK", 0.2)
    metrics.observe_request("Inference", "INVALID_ARGUMENT", 0.0005)
    metrics.tokens.labels(rpc="Forward").inc(2 * 128)
    metrics.observe_wire("received", raw_bytes=4096, compressed_bytes=1024)
    metrics.set_cache(used_bytes=256, total_bytes=1024)
    metrics.set_span(3, 7)
    metrics.queue_depth.labels(priority="inference").set(2)
    metrics.batch_size.observe(3)
    metrics.rebalances.inc()
    metrics.adapter_bytes.set(65536)
    metrics.set_info(
        version="0.1.0", model="tiny", device="cpu", dtype="float32", quant="none", peer_id="Qm1"
    )

    lines = scrape(port)

    expected = {
        'swarm_node_requests_total{code="OK",rpc="Forward"} 2.0',
        'swarm_node_requests_total{code="INVALID_ARGUMENT",rpc="Inference"} 1.0',
        'swarm_node_request_seconds_count{rpc="Forward"} 2.0',
        'swarm_node_request_seconds_bucket{le="0.001",rpc="Forward"} 0.0',
        'swarm_node_request_seconds_bucket{le="0.005",rpc="Forward"} 1.0',
        'swarm_node_request_seconds_bucket{le="0.25",rpc="Forward"} 2.0',
        'swarm_node_request_seconds_bucket{le="+Inf",rpc="Forward"} 2.0',
        'swarm_node_request_seconds_bucket{le="0.001",rpc="Inference"} 1.0',
        'swarm_node_tokens_total{rpc="Forward"} 256.0',
        'swarm_node_wire_bytes_total{direction="received",encoding="raw"} 4096.0',
        'swarm_node_wire_bytes_total{direction="received",encoding="compressed"} 1024.0',
        'swarm_node_wire_bytes_total{direction="sent",encoding="raw"} 0.0',
        "swarm_node_cache_used_bytes 256.0",
        "swarm_node_cache_total_bytes 1024.0",
        "swarm_node_adapter_bytes 65536.0",
        "swarm_node_span_start 3.0",
        "swarm_node_span_end 7.0",
        'swarm_node_queue_depth{priority="inference"} 2.0',
        'swarm_node_queue_depth{priority="backward"} 0.0',
        'swarm_node_batch_requests_bucket{le="2.0"} 0.0',
        'swarm_node_batch_requests_bucket{le="4.0"} 1.0',
        "swarm_node_rebalances_total 1.0",
        'swarm_node_info{device="cpu",dtype="float32",model="tiny",peer_id="Qm1",quant="none",'
        'version="0.1.0"} 1.0',
    }
    assert expected <= lines, sorted(expected - lines)


def test_two_nodes_in_one_process_do_not_clash() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    port_a, stop_a = start_metrics_server(a, "127.0.0.1", 0)
    port_b, stop_b = start_metrics_server(b, "127.0.0.1", 0)
    try:
        assert port_a != port_b
        a.set_span(0, 4)
        b.set_span(4, 8)
        a.dht_peers.set(5)
        assert {"swarm_node_span_start 0.0", "swarm_node_span_end 4.0", "swarm_node_dht_peers 5.0"} <= scrape(
            port_a
        )
        assert {"swarm_node_span_start 4.0", "swarm_node_span_end 8.0", "swarm_node_dht_peers 0.0"} <= scrape(
            port_b
        )
    finally:
        stop_a()
        stop_b()


def test_set_state_leaves_exactly_one_state_at_one(served: tuple[NodeMetrics, int]) -> None:
    metrics, port = served
    for current in ("joining", "online", "draining"):
        metrics.set_state(current)
        lines = scrape(port)
        for state in STATES:
            value = "1.0" if state == current else "0.0"
            assert f'swarm_node_state{{state="{state}"}} {value}' in lines
    with pytest.raises(ValueError, match="unknown node state"):
        metrics.set_state("sleeping")


def test_set_span_rejects_inverted_span() -> None:
    with pytest.raises(ValueError, match=r"\[5, 2\)"):
        NodeMetrics().set_span(5, 2)


def test_stop_closes_the_port() -> None:
    metrics = NodeMetrics()
    port, stop = start_metrics_server(metrics, "127.0.0.1", 0)
    assert "swarm_node_dht_peers 0.0" in scrape(port)
    stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_track_request_codes(served: tuple[NodeMetrics, int]) -> None:
    metrics, port = served
    with metrics.track_request("Ping"):
        pass
    with pytest.raises(RuntimeError), metrics.track_request("Forward"):
        raise RuntimeError("boom")
    with metrics.track_request("Info") as outcome:
        outcome.code = "NOT_FOUND"
    lines = scrape(port)
    assert 'swarm_node_requests_total{code="OK",rpc="Ping"} 1.0' in lines
    assert 'swarm_node_requests_total{code="UNKNOWN",rpc="Forward"} 1.0' in lines
    assert 'swarm_node_requests_total{code="NOT_FOUND",rpc="Info"} 1.0' in lines
    assert 'swarm_node_request_seconds_count{rpc="Forward"} 1.0' in lines


async def test_track_request_records_code_set_by_grpc_abort() -> None:
    metrics = NodeMetrics()

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with metrics.track_request("Forward", context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad shape")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "test.Node", {"Forward": grpc.unary_unary_rpc_method_handler(forward)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Node/Forward")(b"")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)
    sample = metrics.registry.get_sample_value(
        "swarm_node_requests_total", {"rpc": "Forward", "code": "INVALID_ARGUMENT"}
    )
    assert sample == 1.0
