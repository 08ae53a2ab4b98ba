"""A node's life: load the span, serve it over gRPC, announce it, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from grpc_health.v1 import health_pb2
from hivemind.dht import DHT
from rich.progress import Progress

import swarm
from swarm import checkpoint
from swarm.errors import ConfigError
from swarm.models.llama import LlamaBlock
from swarm.node.backend import BlockBackend, resolve_device, resolve_dtype
from swarm.node.config import NodeConfig
from swarm.node.server import SERVICE_NAME, BlockServicer, ServerLimits, start_grpc_server
from swarm.records import NodeIdentity, ServerRecord, ServerState, announce, withdraw

log = logging.getLogger("swarm.node")
# Records live this many announce periods, so one lost announcement does not drop the node.
RECORD_TTL_PERIODS = 2.5


def load_span(
    ckpt: checkpoint.Checkpoint, start: int, end: int, dtype: torch.dtype, device: torch.device
) -> list[LlamaBlock]:
    """Load blocks one at a time behind a progress bar (big spans take minutes to read)."""
    blocks: list[LlamaBlock] = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"loading blocks {start}:{end}", total=end - start)
        for index in range(start, end):
            blocks.extend(checkpoint.load_blocks(ckpt, index, index + 1, dtype=dtype, device=device))
            progress.advance(task)
    return blocks


async def serve(
    cfg: NodeConfig, dht: DHT, identity: NodeIdentity, on_ready: Callable[[dict[str, Any]], None]
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    ckpt = await asyncio.to_thread(checkpoint.open_checkpoint, cfg.model)
    start, end = cfg.span
    if end > ckpt.config.num_hidden_layers:
        raise ConfigError(
            f"--blocks {start}:{end} is out of range: the model has {ckpt.config.num_hidden_layers} blocks"
        )
    model_name = checkpoint.model_name(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    load = asyncio.ensure_future(asyncio.to_thread(load_span, ckpt, start, end, dtype, device))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("stopped while loading")
        return
    stopped.cancel()
    blocks = load.result()
    log.info("loaded blocks %d:%d of %s (%s on %s)", start, end, model_name, dtype, device)

    backend = BlockBackend(
        ckpt.config, blocks, start, dtype=dtype, device=device, cache_bytes=cfg.cache_bytes
    )
    limits = ServerLimits(
        cfg.max_batch, cfg.max_tokens, cfg.max_session_length, cfg.max_message_bytes, cfg.session_idle_timeout
    )
    servicer = BlockServicer(backend, model_name, str(dht.peer_id), limits)
    server, port, health = await start_grpc_server(servicer, cfg.host, cfg.port, cfg.max_message_bytes)
    record = ServerRecord(
        state=ServerState.ONLINE,
        peer_id=str(dht.peer_id),
        grpc_address=f"{cfg.host}:{port}",
        model=model_name,
        start=start,
        end=end,
        free_cache_tokens=0,
        dtype=str(dtype).removeprefix("torch."),
        software_version=swarm.__version__,
    )
    try:
        ttl = cfg.announce_period * RECORD_TTL_PERIODS
        await announce(dht, identity, record, expiration_time=time.time() + ttl)
        on_ready(
            {
                "peer_id": str(dht.peer_id),
                "grpc_address": record.grpc_address,
                "model": model_name,
                "span": f"{start}:{end}",
                "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                "pid": os.getpid(),
            }
        )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=cfg.announce_period)
            except TimeoutError:
                await _announce_safely(dht, identity, record, ttl)
    finally:
        log.info("shutting down: withdrawing records, finishing in-flight requests")
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await asyncio.wait_for(withdraw(dht, identity, record), timeout=5)
        except Exception as e:  # records expire on their own; never fail the shutdown over it
            log.warning(
                "could not withdraw records (%s); they expire in %.0f s", e, cfg.announce_period * 2.5
            )
        await server.stop(grace=5)
        backend.shutdown()


async def _announce_safely(dht: DHT, identity: NodeIdentity, record: ServerRecord, ttl: float) -> None:
    try:
        await announce(dht, identity, record, expiration_time=time.time() + ttl)
    except Exception as e:  # keep serving in-flight work; the next period tries again
        log.warning("announcing to the DHT failed (%s); retrying next period", e)
