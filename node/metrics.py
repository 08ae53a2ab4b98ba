"""Prometheus metrics of one node, served over HTTP on `--metrics-port` (see docs/metrics.md)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final, Literal, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

if TYPE_CHECKING:
    from swarm.training.collaboration import RoundStats

RPCS: Final = ("Info", "Forward", "Backward", "Inference", "Ping", "CheckReachability", "Push")
STATES: Final = ("joining", "online", "draining", "offline")
PRIORITIES: Final = ("inference", "forward", "backward")
THROUGHPUT_KINDS: Final = ("announced", "compute", "inference")

# 1 ms .. 60 s at 1-2.5-5 per decade: a LAN RPC takes milliseconds, a long prefill tens of seconds.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Queue waits are often far below a millisecond when the worker is idle.
QUEUE_BUCKETS: Final = (0.0001, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)

Direction = Literal["received", "sent"]


class StatusSource(Protocol):
    """What `track_request` needs from a grpc.aio.ServicerContext: the status code set by abort()."""

    def code(self) -> grpc.StatusCode | None: ...


class RequestOutcome:
    """Handed out by `NodeMetrics.track_request`; set `code` to override the status that gets recorded."""

    def __init__(self) -> None:
        self.code: str | None = None


class NodeMetrics:
    """All metrics of one node, in its own CollectorRegistry (several nodes may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swarm_node_requests", "RPCs handled, by RPC and gRPC status name.", ["rpc", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "swarm_node_request_seconds", "Wall time of an RPC.", ["rpc"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "swarm_node_inference_step_seconds",
            "Time of one inference step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "swarm_node_queue_wait_seconds",
            "Time a task waited for the compute worker.",
            ["priority"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("swarm_node_tokens", "Tokens processed (batch*length).", ["rpc"], registry=r)
        self.wire_bytes = Counter(
            "swarm_node_wire_bytes",
            "Tensor bytes: raw = before the codec, compressed = actually on the wire.",
            ["direction", "encoding"],
            registry=r,
        )
        self.cache_used_bytes = Gauge("swarm_node_cache_used_bytes", "Attention cache allocated.", registry=r)
        self.cache_total_bytes = Gauge(
            "swarm_node_cache_total_bytes", "Attention cache capacity.", registry=r
        )
        self.adapter_bytes = Gauge(
            "swarm_node_adapter_bytes", "Bytes of client LoRA adapters held.", registry=r
        )
        self.adapters = Gauge("swarm_node_adapters", "Client LoRA adapters held.", registry=r)
        self.inference_sessions = Gauge(
            "swarm_node_inference_sessions", "Open inference sessions.", registry=r
        )
        self.span_start = Gauge("swarm_node_span_start", "First block served (inclusive).", registry=r)
        self.span_end = Gauge("swarm_node_span_end", "End of the served span (exclusive).", registry=r)
        self.throughput = Gauge(
            "swarm_node_throughput_tokens_per_second", "Throughput estimates, by kind.", ["kind"], registry=r
        )
        self.network_bytes_per_second = Gauge(
            "swarm_node_network_bytes_per_second", "Measured network bandwidth.", registry=r
        )
        self.queue_depth = Gauge(
            "swarm_node_queue_depth", "Tasks waiting for the compute worker.", ["priority"], registry=r
        )
        self.batch_size = Histogram(
            "swarm_node_batch_requests",
            "Requests the worker merged into one batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.dht_peers = Gauge(
            "swarm_node_dht_peers",
            "Peers serving this model in the last DHT read, this node included.",
            registry=r,
        )
        self.state = Gauge(
            "swarm_node_state", "1 for the node's current state, else 0.", ["state"], registry=r
        )
        self.rebalances = Counter("swarm_node_rebalances", "Span moves.", registry=r)
        self.training_steps = Counter(
            "swarm_node_training_steps", "Optimizer steps of this node's stage (training nodes).", registry=r
        )
        self.averaging_bytes = Counter(
            "swarm_node_averaging_bytes",
            "Bytes of averaging rounds (gradients, or diloco deltas) exchanged with stage-mates (training "
            "nodes); per sample: rate of this over rate of swarm_node_training_samples_total.",
            ["direction"],
            registry=r,
        )
        self.state_transfer_bytes = Counter(
            "swarm_node_state_transfer_bytes",
            "Bytes of whole stage states sent to or loaded from stage-mates (joining, catching up).",
            ["direction"],
            registry=r,
        )
        self.training_samples = Counter(
            "swarm_node_training_samples",
            "Samples of the optimizer steps this training node took with its stage.",
            registry=r,
        )
        # Server-to-server push (inference sessions): outputs sent straight to the next node of a
        # route, steps computed on a pushed input, and the ways a push is not used.
        self.pushes_sent = Counter(
            "swarm_node_pushes_sent", "Inference step outputs pushed to the next node of a route.", registry=r
        )
        self.pushes_received = Counter(
            "swarm_node_pushes_received",
            "Inference steps computed on an input the previous node pushed.",
            registry=r,
        )
        self.push_failures = Counter(
            "swarm_node_push_failures",
            "Step outputs this node was asked to push but could not (link not up yet, or broken); "
            "the client then sends them itself.",
            registry=r,
        )
        self.push_refusals = Counter(
            "swarm_node_push_refusals",
            "Step outputs not pushed because no signed record of the swarm vouches for the target "
            "the client named (never dialled); the client then sends them itself.",
            registry=r,
        )
        self.push_fallbacks = Counter(
            "swarm_node_push_fallbacks",
            "Steps that expected a pushed input but were computed on the client's own copy.",
            registry=r,
        )
        self.info = Info("swarm_node", "Static facts about this node.", registry=r)
        self._averaging_lock = threading.Lock()
        self._initialise_series()

    def _initialise_series(self) -> None:
        for direction in ("sent", "received"):
            self.averaging_bytes.labels(direction=direction)
            self.state_transfer_bytes.labels(direction=direction)
        # Export known label sets at 0 from the start, so rate() and dashboards see the series before traffic.
        # observe_wire runs twice per request: keep its children instead of looking them up each time
        self._wire_children = {
            direction: (
                self.wire_bytes.labels(direction=direction, encoding="raw"),
                self.wire_bytes.labels(direction=direction, encoding="compressed"),
            )
            for direction in ("received", "sent")
        }
        for priority in PRIORITIES:
            self.queue_depth.labels(priority=priority)
        for kind in THROUGHPUT_KINDS:
            self.throughput.labels(kind=kind)
        for state in STATES:
            self.state.labels(state=state)

    def set_state(self, state: str) -> None:
        """Mark `state` as current (1) and every other state 0."""
        if state not in STATES:
            raise ValueError(f"unknown node state {state!r}; expected one of {STATES}")
        for name in STATES:
            self.state.labels(state=name).set(1 if name == state else 0)

    def set_span(self, start: int, end: int) -> None:
        """Record the half-open block span [start, end) this node serves."""
        if not 0 <= start <= end:
            raise ValueError(f"span [{start}, {end}) needs 0 <= start <= end")
        self.span_start.set(start)
        self.span_end.set(end)

    def set_info(
        self, *, version: str, model: str, device: str, dtype: str, quant: str, peer_id: str
    ) -> None:
        self.info.info(
            {
                "version": version,
                "model": model,
                "device": device,
                "dtype": dtype,
                "quant": quant,
                "peer_id": peer_id,
            }
        )

    def count_averaging(self, stats: RoundStats, counted: RoundStats) -> None:
        """Add what a collaboration's `stats` gained since `counted` (then updated) to the counters."""
        with self._averaging_lock:  # the compute thread and the event loop both report
            self._count_averaging(stats, counted)

    def _count_averaging(self, stats: RoundStats, counted: RoundStats) -> None:
        for counter, (sent, received) in (
            (self.averaging_bytes, ("sent_bytes", "received_bytes")),
            (self.state_transfer_bytes, ("state_sent_bytes", "state_received_bytes")),
        ):
            counter.labels(direction="sent").inc(getattr(stats, sent) - getattr(counted, sent))
            counter.labels(direction="received").inc(getattr(stats, received) - getattr(counted, received))
        self.training_samples.inc(stats.samples - counted.samples)
        for name in ("sent_bytes", "received_bytes", "state_sent_bytes", "state_received_bytes", "samples"):
            setattr(counted, name, getattr(stats, name))

    def set_cache(self, used_bytes: int, total_bytes: int) -> None:
        self.cache_used_bytes.set(used_bytes)
        self.cache_total_bytes.set(total_bytes)

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        """Count one finished RPC with its gRPC status name (e.g. "OK") and record its duration."""
        self.requests.labels(rpc=rpc, code=code).inc()
        self.request_seconds.labels(rpc=rpc).observe(seconds)

    def observe_wire(self, direction: Direction, raw_bytes: int, compressed_bytes: int) -> None:
        """Count one tensor message: its float size before the codec and its size on the wire."""
        raw, compressed = self._wire_children[direction]
        raw.inc(raw_bytes)
        compressed.inc(compressed_bytes)

    @contextmanager
    def track_request(self, rpc: str, context: StatusSource | None = None) -> Iterator[RequestOutcome]:
        """Time the enclosed RPC handler and count it under its final status code.

        The code is, in order: `outcome.code` if the handler set it; the code a `context.abort()` set;
        CANCELLED if the task was cancelled; UNKNOWN for any other exception; otherwise OK.
        """
        outcome = RequestOutcome()
        started = time.perf_counter()
        code = "OK"
        try:
            yield outcome
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            status = context.code() if context is not None else None
            if status is not None:
                code = status.name
            if outcome.code is not None:
                code = outcome.code
            self.observe_request(rpc, code, time.perf_counter() - started)


def start_metrics_server(metrics: NodeMetrics, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve /metrics for this registry on host:port (0 = a free port); return (bound port, stop)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return server.server_port, stop
