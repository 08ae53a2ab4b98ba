"""A node's life: measure, choose blocks, load, serve, announce, rebalance, drain, stop.

    joining ──(reachable, blocks loaded)──► online ──(a move pays)──► draining ──► joining ...
                                              └──(SIGTERM)──► draining ──► offline

Every step that can take long (measuring, loading, draining) gives way to SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2
from hivemind.dht import DHT
from rich.progress import Progress

import swarm
from swarm import checkpoint, receipts, tls
from swarm.errors import ConfigError, SwarmError
from swarm.models.llama import LayerCache, LlamaBlock, LlamaConfig
from swarm.node import device as devices
from swarm.node import selection
from swarm.node.announcer import Announcer
from swarm.node.backend import BlockBackend
from swarm.node.config import NodeConfig
from swarm.node.metrics import NodeMetrics, start_metrics_server
from swarm.node.push import PushGate, records_lookup
from swarm.node.reachability import announce_host, check_reachable
from swarm.node.server import SERVICE_NAME, BlockServicer, ServerLimits, start_grpc_server
from swarm.node.throughput import Throughput, default_cache_path, get_throughput
from swarm.records import NodeIdentity, ServerRecord, ServerState, fetch_records, latest_per_peer

log = logging.getLogger("swarm.node")
T = TypeVar("T")
DEFAULT_NETWORK_BPS = 100e6 / 8  # assumed when no peer is known to measure against: 100 Mbit/s


class Stopped(Exception):
    """SIGTERM/SIGINT arrived while the node was still starting or moving."""


def load_span(
    ckpt: checkpoint.Checkpoint,
    span: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    quant: devices.Quant,
) -> list[LlamaBlock]:
    """Load blocks one at a time behind a progress bar (big spans take minutes to read)."""
    start, end = span
    blocks: list[LlamaBlock] = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"loading blocks {start}:{end}", total=end - start)
        for index in range(start, end):
            # Quantize on the CPU copy before it moves, so a full-precision span never sits on the GPU.
            (block,) = checkpoint.load_blocks(ckpt, index, index + 1, dtype=dtype, device=torch.device("cpu"))
            if quant != "none":
                block = devices.quantize_block(block, quant, device)  # type: ignore[assignment]
            blocks.append(block.to(device))
            progress.advance(task)
    return blocks


@dataclass
class Node:
    """Everything a running node holds; `serve` drives it through its states."""

    cfg: NodeConfig
    ckpt: checkpoint.Checkpoint
    model: str
    device: torch.device
    dtype: torch.dtype
    dht: DHT
    servicer: BlockServicer
    announcer: Announcer
    metrics: NodeMetrics
    address: str
    stop: asyncio.Event
    health: Any  # grpc_health's aio HealthServicer: SERVING only while ONLINE
    failure: BaseException | None = None  # why the node stopped itself, if it did
    throughput: Throughput | None = None
    cache_bytes: int = 0
    span: tuple[int, int] = (0, 0)
    cert_sha256: str | None = None  # of the TLS certificate gRPC serves with; None: plaintext (--no-tls)

    @property
    def config(self) -> LlamaConfig:
        return self.ckpt.config

    @property
    def peer_id(self) -> str:
        return self.servicer.peer_id

    def span_throughput(self, num_blocks: int) -> float:
        assert self.throughput is not None, "measured before any span is chosen"
        return self.throughput.span_throughput(num_blocks, self.config.hidden_size)

    # ---- states -----------------------------------------------------------------------------------

    def record(self, state: ServerState) -> ServerRecord:
        start, end = self.span
        tp = self.throughput
        unmeasured = dict.fromkeys(
            ("compute_throughput", "inference_rps", "network_throughput", "throughput"), 0.0
        )
        measured = tp.record_fields(end - start, self.config.hidden_size) if tp else unmeasured
        return ServerRecord(
            state=state,
            peer_id=self.peer_id,
            grpc_address=self.address,
            model=self.model,
            start=start,
            end=end,
            compute_throughput=measured["compute_throughput"],
            inference_rps=measured["inference_rps"],
            network_throughput=measured["network_throughput"],
            throughput=measured["throughput"],
            free_cache_tokens=self.free_cache_tokens(),
            dtype=str(self.dtype).removeprefix("torch."),
            quant=self.cfg.quant,
            software_version=swarm.__version__,
            tls_cert_sha256=self.cert_sha256,
        )

    def free_cache_tokens(self) -> int:
        """Tokens of KV cache a new session could still reserve on the whole span."""
        backend = self.servicer.backend
        if backend is None:
            return 0
        per_token = LayerCache.bytes_needed(self.config, 1, 1, self.dtype) * (backend.end - backend.start)
        return max(0, backend.budget.total - backend.budget.used) // per_token

    async def enter(self, state: ServerState, *, required: bool = False) -> None:
        self.servicer.state = str(state)
        self.metrics.set_state(str(state))
        serving = state == ServerState.ONLINE
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(SERVICE_NAME, status)
        await self.announcer.publish(self.record(state), required=required)

    async def until_stopped(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, or raise Stopped as soon as a stop signal arrives."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            raise Stopped
        return task.result()

    async def load(self, span: tuple[int, int]) -> None:
        """Load `span` and serve it; the node must serve nothing when called."""
        cfg = self.cfg
        blocks = await self.until_stopped(
            asyncio.to_thread(load_span, self.ckpt, span, self.dtype, self.device, cfg.quant)
        )
        self.servicer.backend = BlockBackend(
            self.config,
            blocks,
            span[0],
            dtype=self.dtype,
            device=self.device,
            cache_bytes=self.cache_bytes,
            cache_share=cfg.client_share,
            adapter_bytes=cfg.adapter_cache_bytes,
            batching=cfg.batching,
            batch_tokens=cfg.batch_tokens,
            on_batch=self._on_batch,
        )
        self.span = span
        self.metrics.set_span(*span)
        log.info("serving blocks %d:%d of %s (%s on %s)", *span, self.model, self.dtype, self.device)

    def _on_batch(self, kind: str, requests: int, tokens: int, queue_wait: float) -> None:
        # called on the compute thread; prometheus_client metrics are thread-safe
        self.metrics.batch_size.observe(requests)
        self.metrics.queue_wait_seconds.labels(priority=kind).observe(queue_wait)

    async def drain(self) -> None:
        """Wait (up to --drain-timeout) for in-flight requests and sessions to finish."""
        try:
            await asyncio.wait_for(self.servicer.idle.wait(), timeout=self.cfg.drain_timeout)
        except TimeoutError:
            log.warning(
                "%d request(s)/session(s) still running after %.0f s; ending them",
                self.servicer.active,
                self.cfg.drain_timeout,
            )

    def unload(self) -> None:
        backend, self.servicer.backend = self.servicer.backend, None
        if backend is not None:
            backend.shutdown()
            backend.blocks.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def move(self, span: tuple[int, int]) -> None:
        log.info("moving from blocks %d:%d to %d:%d: the swarm needs them more", *self.span, *span)
        # The old span's DRAINING records are older than the new span's: readers keep the newest
        # record per peer, and the old ones expire within a TTL.
        await self.enter(ServerState.DRAINING)
        await self.drain()
        self.unload()
        self.span = span
        await self.enter(ServerState.JOINING)
        await self.load(span)
        await self.enter(ServerState.ONLINE)
        self.metrics.rebalances.inc()


# ---- the swarm as this node sees it ---------------------------------------------------------------


async def swarm_records(node: Node) -> list[ServerRecord]:
    """Every other peer's newest record for this model (this node's own state is known locally)."""
    per_block = await fetch_records(node.dht, node.model, list(range(node.config.num_hidden_layers)))
    records = latest_per_peer(r for rs in per_block.values() for r in rs)
    return [r for r in records if r.peer_id != node.peer_id]


# ---- setup ----------------------------------------------------------------------------------------


async def measure(node: Node, peers: list[ServerRecord]) -> None:
    cfg = node.cfg
    online = [p for p in peers if p.state == ServerState.ONLINE]
    cache_path = Path(cfg.throughput_cache) if cfg.throughput_cache else default_cache_path()
    node.throughput = await node.until_stopped(
        get_throughput(
            node.config,
            node.device,
            node.dtype,
            cfg.quant,
            device_name=devices.device_name(node.device),
            cache_path=cache_path,
            override=cfg.throughput,
            network_override=cfg.network_throughput,
            peer_address=online[0].grpc_address if online else None,
            peer_cert_sha256=online[0].tls_cert_sha256 if online else None,
            default_network_bps=DEFAULT_NETWORK_BPS,
            block_factory=_probe_block(node) if cfg.quant != "none" else None,
        )
    )
    tp = node.throughput
    node.servicer.compute_throughput = tp.forward_tps
    node.metrics.throughput.labels(kind="compute").set(tp.forward_tps)
    node.metrics.throughput.labels(kind="inference").set(tp.inference_rps)
    node.metrics.network_bytes_per_second.set(tp.network_bps)


def _probe_block(node: Node) -> Callable[[], torch.nn.Module]:
    """A random block in the node's weight format: int8/nf4 kernels run at their own speed."""

    def build() -> torch.nn.Module:
        block = LlamaBlock(node.config).to(node.dtype).eval()
        return devices.quantize_block(block, node.cfg.quant, node.device)

    return build


def plan_span(node: Node, peers: list[ServerRecord]) -> tuple[int, int]:
    """The fixed --blocks span, or the span of --num-blocks (or what fits) the swarm needs most."""
    cfg, num_layers = node.cfg, node.config.num_hidden_layers
    if cfg.span is not None:
        start, end = cfg.span
        if end > num_layers:
            raise ConfigError(f"--blocks {start}:{end} is out of range: the model has {num_layers} blocks")
        return start, end
    count = cfg.num_blocks or devices.default_num_blocks(node.config, node.dtype, cfg.quant, node.device)
    if count > num_layers:
        raise ConfigError(f"--num-blocks {count} is more than the model's {num_layers} blocks")
    return selection.choose_span(peers, num_layers, count, node.span_throughput(count), rng=random.Random())


def plan_memory(node: Node, span: tuple[int, int]) -> None:
    cfg, count = node.cfg, span[1] - span[0]
    weights = devices.span_bytes(node.config, count, node.dtype, cfg.quant)
    node.cache_bytes = cfg.cache_bytes or devices.default_cache_bytes(node.device, weights_bytes=weights)
    devices.check_fits(node.config, count, node.dtype, cfg.quant, node.device, node.cache_bytes)


async def watch_swarm(node: Node) -> None:
    """Every ~rebalance period (jittered, so nodes do not move in lockstep): look at the swarm, and
    move when another span helps the weakest blocks by more than --balance-threshold
    (see selection.plan_move)."""
    rng = random.Random()
    fixed = node.cfg.span is not None
    while not node.stop.is_set():
        try:
            await asyncio.wait_for(
                node.stop.wait(), timeout=node.cfg.rebalance_period * rng.uniform(0.5, 1.5)
            )
            return
        except TimeoutError:
            pass
        try:
            peers = await swarm_records(node)
        except Exception as e:  # the announcer reports DHT trouble; just look again next time
            log.debug("could not read the swarm map: %s", e)
            continue
        node.metrics.dht_peers.set(len(peers) + 1)
        if fixed or node.servicer.state != ServerState.ONLINE:
            continue
        me = node.record(ServerState.ONLINE)
        target = selection.plan_move(
            [*peers, me],
            node.config.num_hidden_layers,
            node.peer_id,
            node.span,
            me.throughput,
            threshold=node.cfg.balance_threshold,
            rng=rng,
        )
        if target is None:
            continue
        try:
            await node.move(target)
        except Stopped:
            return
        except Exception as e:  # e.g. the new span failed to load: a node serving nothing must not linger
            log.exception("moving to blocks %d:%d failed; stopping this node", *target)
            node.failure = e
            node.stop.set()
            return


# ---- the whole life -------------------------------------------------------------------------------


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets (call from inside the node's event loop)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> None:
    stop = stop_on_signals()

    ckpt = await asyncio.to_thread(checkpoint.open_checkpoint, cfg.model)
    model = checkpoint.model_name(cfg.model)
    device = devices.resolve_device(cfg.device)
    dtype = devices.resolve_dtype(cfg.dtype, device)
    devices.check_quant(cfg.quant, device)

    metrics = NodeMetrics()
    metrics.set_info(
        version=swarm.__version__,
        model=model,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        quant=cfg.quant,
        peer_id=str(dht.peer_id),
    )
    limits = ServerLimits(
        cfg.max_batch, cfg.max_tokens, cfg.max_session_length, cfg.max_message_bytes, cfg.session_idle_timeout
    )
    servicer = BlockServicer(
        None,
        model,
        str(dht.peer_id),
        limits,
        quant=cfg.quant,
        metrics=metrics,
        signer=receipts.ReceiptSigner(identity.private_key),
        corrupt_rate=cfg.corrupt_rate,
        push=cfg.push,
        # A client names push targets: dial only nodes the swarm's signed records announce.
        push_allowed=PushGate(records_lookup(dht, model)).allowed,
    )
    # A fresh certificate per start: the records announced below pin it, so nothing needs storing.
    certificate = tls.NodeCertificate.generate(str(dht.peer_id)) if cfg.tls else None
    server, port, health = await start_grpc_server(
        servicer, cfg.host, cfg.port, cfg.max_message_bytes, certificate=certificate
    )
    metrics_port, stop_metrics = await serve_metrics(cfg, metrics, server)
    address = f"{announce_host(cfg)}:{cfg.announce_port or port}"
    node = Node(
        cfg,
        ckpt,
        model,
        device,
        dtype,
        dht,
        servicer,
        Announcer(dht, identity, cfg.announce_period, num_blocks=ckpt.config.num_hidden_layers),
        metrics,
        address,
        stop,
        health,
        cert_sha256=certificate.sha256 if certificate is not None else None,
    )
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)  # until ONLINE
    node.announcer.refresh = lambda r: r.model_copy(update={"free_cache_tokens": node.free_cache_tokens()})
    _export_live_gauges(node)
    background: list[asyncio.Task[None]] = []
    try:
        await start_serving(node)
        on_ready(
            {
                "peer_id": node.peer_id,
                "grpc_address": node.address,
                "tls_cert_sha256": node.cert_sha256,
                "model": model,
                "span": f"{node.span[0]}:{node.span[1]}",
                "throughput": round(node.span_throughput(node.span[1] - node.span[0]), 3),
                "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                "metrics_port": metrics_port,
                "pid": os.getpid(),
            }
        )
        background = [asyncio.create_task(node.announcer.run(stop)), asyncio.create_task(watch_swarm(node))]
        await stop.wait()
    except Stopped:
        log.info("stopped while %s", servicer.state)
    finally:
        for task in background:
            task.cancel()
        await shut_down(node, server, health)
        stop_metrics()
    if node.failure is not None:  # exit non-zero, so a supervisor restarts the node
        raise SwarmError(f"the node stopped itself: {node.failure}") from node.failure


async def serve_metrics(
    cfg: NodeConfig, metrics: NodeMetrics, server: grpc.aio.Server
) -> tuple[int | None, Callable[[], None]]:
    """/metrics on --metrics-port (serving and training nodes alike): (bound port or None, stop).
    A port that cannot be bound stops the gRPC server already started and says which flag to fix."""
    if cfg.metrics_port is None:
        return None, lambda: None
    try:
        return start_metrics_server(metrics, cfg.host, cfg.metrics_port)
    except OSError as e:
        await server.stop(grace=None)
        where = f"{cfg.host}:{cfg.metrics_port}"
        raise ConfigError(f"could not serve metrics on {where} ({e}); --metrics-port") from e


async def start_serving(node: Node) -> None:
    peers = await node.until_stopped(swarm_records(node))
    await measure(node, peers)
    span = plan_span(node, peers)
    plan_memory(node, span)
    node.span = span
    await node.enter(ServerState.JOINING, required=True)
    if node.cfg.check_reachability:
        online = [p for p in peers if p.state == ServerState.ONLINE]
        await node.until_stopped(check_reachable(node.address, node.peer_id, online, node.cert_sha256))
    await node.load(span)
    await node.enter(ServerState.ONLINE, required=True)


async def shut_down(node: Node, server: grpc.aio.Server, health: Any) -> None:
    log.info("shutting down: draining in-flight work, then withdrawing records")
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    if node.servicer.backend is not None:
        await node.enter(ServerState.DRAINING)
        await node.drain()
    node.metrics.set_state("offline")
    await node.announcer.withdraw()
    await server.stop(grace=2)
    await node.servicer.close()  # its push channels to other nodes
    node.unload()


def _export_live_gauges(node: Node) -> None:
    """Gauges read at scrape time, so they are never stale and need no refresh loop."""
    m = node.metrics

    def backend_value(fn: Callable[[BlockBackend], float]) -> Callable[[], float]:
        return lambda: fn(node.servicer.backend) if node.servicer.backend is not None else 0.0

    m.cache_used_bytes.set_function(backend_value(lambda b: b.budget.used))
    m.cache_total_bytes.set_function(backend_value(lambda b: b.budget.total))
    m.adapter_bytes.set_function(backend_value(lambda b: b.adapters.used))
    m.adapters.set_function(backend_value(lambda b: len(b.adapters)))
    m.inference_sessions.set_function(backend_value(lambda b: len(b.sessions)))
    for priority in ("inference", "forward", "backward"):
        m.queue_depth.labels(priority=priority).set_function(
            backend_value(lambda b, p=priority: b.queue_depth().get(p, 0))  # type: ignore[misc]
        )
    m.throughput.labels(kind="announced").set_function(
        lambda: node.span_throughput(node.span[1] - node.span[0]) if node.throughput and node.span[1] else 0.0
    )
