"""How fast a node is, for the record it announces (`swarm.records.ServerRecord`).

Compute: one randomly initialised block is timed on the node's device, a forward of a batch and
single-token inference steps. A real block takes seconds to time and the answer only changes with
the hardware, so it is cached on disk per (device, model config, dtype, quantization).
Network: Ping round trips to a known peer. The node's throughput is the smaller of the compute
bound and the network bound, as in Petals: fast compute behind a slow link is no faster than the link.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import torch
from torch import nn

from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import ConfigError, PeerUnavailable
from swarm.models.llama import LayerCache, LlamaBlock, LlamaConfig
from swarm.node import device as devices

log = logging.getLogger(__name__)

FORWARD_TOKENS: Final = 256  # the forward batch timed: 1 x 256 tokens, a typical prompt chunk
INFERENCE_CONTEXT: Final = 128  # tokens in the KV cache while single-token steps are timed
DEFAULT_NETWORK_BPS: Final = 100e6 / 8  # 100 Mbit/s, assumed when no peer is measured
_METHOD_VERSION: Final = 1  # part of the cache key: a changed benchmark must not reuse old numbers


@dataclass(frozen=True)
class Throughput:
    """Per-block compute speed and link speed of a node.

    `fixed_tps` is set by `--throughput N`: the user states the tokens/s the node pushes through its
    WHOLE span. It is then announced as `throughput` whatever the span, and forward_tps and
    inference_rps hold N (what a one-block span does); `record_fields` scales them to the span so
    that compute_throughput / span length == N for anyone reading the record.
    """

    forward_tps: float  # forward tokens/s of one block
    inference_rps: float  # single-token inference steps/s of one block
    network_bps: float  # bytes/s, both directions of a request/response exchange together
    fixed_tps: float | None = None

    def __post_init__(self) -> None:
        for name in ("forward_tps", "inference_rps", "network_bps", "fixed_tps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"throughput {name} must be a positive finite number, got {value}")

    @classmethod
    def fixed(cls, tps: float, network_bps: float) -> Throughput:
        if not (math.isfinite(tps) and tps > 0):
            raise ConfigError(f"--throughput must be a positive number of tokens/s, got {tps}")
        return cls(forward_tps=tps, inference_rps=tps, network_bps=network_bps, fixed_tps=tps)

    def span_throughput(self, num_blocks: int, hidden_size: int, wire_bytes_per_value: float = 2.0) -> float:
        """Tokens/s through a span of `num_blocks`: min(compute bound, network bound), where every
        token moves hidden_size values in and as many out."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if self.fixed_tps is not None:
            return self.fixed_tps
        network_bound = self.network_bps / (2 * hidden_size * wire_bytes_per_value)
        return min(self.forward_tps / num_blocks, network_bound)

    def record_fields(
        self, num_blocks: int, hidden_size: int, wire_bytes_per_value: float = 2.0
    ) -> dict[str, float]:
        """The ServerRecord fields for a span of `num_blocks`: `ServerRecord(..., **fields)`."""
        scale = num_blocks if self.fixed_tps is not None else 1
        return {
            "compute_throughput": self.forward_tps * scale,
            "inference_rps": self.inference_rps * scale,
            "network_throughput": self.network_bps,
            "throughput": self.span_throughput(num_blocks, hidden_size, wire_bytes_per_value),
        }


# ---------------------------------------------------------------------------------------- compute ---


def measure_compute(
    config: LlamaConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    block_factory: Callable[[], nn.Module] | None = None,
    budget_s: float = 2.0,
) -> tuple[float, float]:
    """(forward tokens/s, inference steps/s) of one block: LlamaBlock(config) with random weights, or
    `block_factory()` (e.g. a quantized block, already on `device`). Half of `budget_s` goes to each,
    a fifth of that to warming up; every phase makes at least one call, so a very slow device overruns."""
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if block_factory is not None:
        block = block_factory()
    else:
        with torch.device(device):  # built in place: copying a big block to the GPU costs seconds
            block = LlamaBlock(config).to(dtype).eval()
    with torch.inference_mode():
        hidden = torch.randn(1, FORWARD_TOKENS, config.hidden_size, device=device, dtype=dtype)
        forward_s = _seconds_per_call(lambda: block(hidden), device, budget_s / 2)
        step_s = _seconds_per_call(_inference_step(block, config, device, dtype), device, budget_s / 2)
    return FORWARD_TOKENS / forward_s, 1.0 / step_s


def _inference_step(
    block: nn.Module, config: LlamaConfig, device: torch.device, dtype: torch.dtype
) -> Callable[[], object]:
    cache = LayerCache(config, 1, INFERENCE_CONTEXT + 1, dtype, device)
    block(torch.randn(1, INFERENCE_CONTEXT, config.hidden_size, device=device, dtype=dtype), 0, cache)
    token = torch.randn(1, 1, config.hidden_size, device=device, dtype=dtype)

    def step() -> object:
        cache.length = INFERENCE_CONTEXT  # rewind, so every timed step attends to the same context
        return block(token, INFERENCE_CONTEXT, cache)

    return step


def _seconds_per_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    # Synchronise after every call: a node returns each result to the host, so calls never overlap.
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    _run_for(fn, sync, budget_s / 5)  # warm-up: kernel selection, allocations, GPU clocks ramping up
    return _run_for(fn, sync, budget_s * 4 / 5)


def _run_for(fn: Callable[[], object], sync: Callable[[], None], budget_s: float) -> float:
    """Call fn (at least once) until budget_s has passed; seconds per call."""
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < budget_s:
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - start) / calls


# ------------------------------------------------------------------------------------------ cache ---


def cache_key(device_name: str, config: LlamaConfig, dtype: torch.dtype, quant: str) -> str:
    """Stable across runs and processes: a hash of everything the measured speed depends on."""
    what = {
        "method": _METHOD_VERSION,
        "device": device_name,
        "config": config.to_hf_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "quant": quant,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def default_cache_path() -> Path:
    """$SWARM_CACHE_DIR, else $XDG_CACHE_HOME/swarm, else ~/.cache/swarm; file throughput.json."""
    if os.environ.get("SWARM_CACHE_DIR"):
        return Path(os.environ["SWARM_CACHE_DIR"]) / "throughput.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "swarm" / "throughput.json"


def load_cached(path: Path, key: str) -> tuple[float, float] | None:
    entry = _read_cache(path).get(key)
    try:
        value = (float(entry["forward_tps"]), float(entry["inference_rps"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError):  # absent, or not written by us
        return None
    return value if all(math.isfinite(v) and v > 0 for v in value) else None


def save_cached(path: Path, key: str, value: tuple[float, float]) -> None:
    """Store `value` under `key`, keeping the other keys. The write is atomic, so a crash (or another
    node on the host writing at once) never leaves half a file behind."""
    data = _read_cache(path)
    data[key] = {"forward_tps": value[0], "inference_rps": value[1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, or not an object
        log.warning("ignoring unreadable throughput cache %s (%s); it will be rewritten", path, e)
        return {}
    return data


# ---------------------------------------------------------------------------------------- network ---


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Imported here: measuring compute (e.g. on a bare GPU box) needs no gRPC server stack.
    from swarm.node.server import grpc_options

    return grpc_options(max_message_bytes)


async def measure_network(
    address: str,
    *,
    payload_bytes: int = 4 << 20,
    timeout: float = 10.0,
    rounds: int = 3,
    cert_sha256: str | None = None,
) -> float:
    """Bytes/s to the node at `address`: (bytes sent + received) / round-trip time of a Ping carrying
    `payload_bytes` each way, best of `rounds` (the one least disturbed by other traffic), over TLS
    pinned to `cert_sha256` when the peer announces one (as the data plane will run). The whole
    measurement is bounded by `timeout`; any failure raises PeerUnavailable."""
    if payload_bytes <= 0 or rounds <= 0:
        raise ValueError(f"payload_bytes and rounds must be > 0, got {payload_bytes}, {rounds}")
    payload = os.urandom(payload_bytes)  # incompressible, in case something on the path compresses
    try:
        options = _channel_options(payload_bytes + (1 << 20))
        async with asyncio.timeout(timeout):
            channel = await tls.open_channel(address, cert_sha256, options=options, timeout=timeout)
            async with channel:
                stub = swarm_pb2_grpc.BlockServiceStub(channel)
                await stub.Ping(swarm_pb2.PingRequest(), timeout=timeout)  # setup is not bandwidth
                return max([await _ping_bps(stub, payload, timeout) for _ in range(rounds)])
    except (grpc.aio.AioRpcError, TimeoutError) as e:
        reason = f"{e.code().name} {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else "timed out"
        raise PeerUnavailable(f"could not measure the network to {address}: {reason}") from e


async def _ping_bps(stub: swarm_pb2_grpc.BlockServiceStub, payload: bytes, timeout: float) -> float:
    start = time.perf_counter()
    request = swarm_pb2.PingRequest(payload=payload, reply_bytes=len(payload))
    reply = await stub.Ping(request, timeout=timeout)
    # The peer may cap its reply (16 MiB), so count what came back, not what was asked for.
    return (len(payload) + len(reply.payload)) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- together ---


async def get_throughput(
    config: LlamaConfig,
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    *,
    cache_path: Path | None,
    device_name: str | None = None,
    override: float | None = None,
    network_override: float | None = None,
    peer_address: str | None = None,
    default_network_bps: float = DEFAULT_NETWORK_BPS,
    peer_cert_sha256: str | None = None,
    block_factory: Callable[[], nn.Module] | None = None,
    budget_s: float = 2.0,
) -> Throughput:
    """The node's Throughput. `override` (--throughput N, span tokens/s) wins and nothing is measured.
    Otherwise compute comes from `cache_path` (None: no disk cache) or is measured in a worker thread
    and cached; network is `network_override`, else measured against `peer_address`, else (or when
    that fails) `default_network_bps`. `device_name` defaults to `swarm.node.device.device_name(device)`."""
    if override is not None:  # the user knows best: do not spend seconds measuring
        return Throughput.fixed(override, await _network(None, network_override, default_network_bps))
    key = cache_key(device_name or devices.device_name(device), config, dtype, quant)
    measure = functools.partial(
        measure_compute, config, device, dtype, block_factory=block_factory, budget_s=budget_s
    )
    forward_tps, inference_rps = await _compute(key, cache_path, measure)
    network_bps = await _network(peer_address, network_override, default_network_bps, peer_cert_sha256)
    return Throughput(forward_tps, inference_rps, network_bps)


async def _compute(
    key: str, cache_path: Path | None, measure: Callable[[], tuple[float, float]]
) -> tuple[float, float]:
    cached = load_cached(cache_path, key) if cache_path is not None else None
    if cached is not None:
        log.info("compute throughput from %s: %.0f tokens/s, %.1f steps/s per block", cache_path, *cached)
        return cached
    log.info("measuring compute throughput (a few seconds; cached in %s)", cache_path)
    value = await asyncio.to_thread(measure)  # off the event loop: it runs for seconds
    log.info("compute throughput: %.0f tokens/s, %.1f steps/s per block", *value)
    if cache_path is not None:
        try:
            save_cached(cache_path, key, value)
        except OSError as e:  # a read-only home must not stop the node; it measures again next time
            log.warning("could not cache the throughput in %s: %s", cache_path, e)
    return value


async def _network(
    peer_address: str | None, override: float | None, default_bps: float, cert_sha256: str | None = None
) -> float:
    if override is not None or peer_address is None:
        return default_bps if override is None else override
    try:
        bps = await measure_network(peer_address, cert_sha256=cert_sha256)
    except PeerUnavailable as e:
        log.warning("%s; assuming %.0f Mbit/s", e, default_bps * 8 / 1e6)
        return default_bps
    log.info("network throughput to %s: %.0f Mbit/s", peer_address, bps * 8 / 1e6)
    return bps
