"""The swarm as a whole: who serves which block, how fast, how many replicas, for the status page.

`summarize` is a pure function of one swarm-map snapshot, so what the page, `/api/status` and the
swarm-wide Prometheus gauges show is unit-tested without a network. `StatusBoard` keeps the latest
summary of every watched model fresh from the DHT in the background: a fixed set of models, or
every model the swarm's model registry lists (`fetch_models`), re-read at each refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

from hivemind.dht import DHT
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from swarm.client.loop import run_on_client_loop
from swarm.coordinator.routing import SwarmMap
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.errors import ConfigError, SwarmError
from swarm.records import ServerState, fetch_models

logger = logging.getLogger(__name__)

STATES = [s.value for s in ServerState]

# Which models to watch, asked at every refresh: model name -> number of blocks.
Discover = Callable[[], Awaitable[Mapping[str, int]]]


@dataclass(frozen=True)
class ServerStatus:
    peer_id: str
    state: str
    start: int
    end: int
    grpc_address: str
    throughput: float  # tokens/s through the whole span
    inference_rps: float
    free_cache_tokens: int
    dtype: str
    quant: str
    software_version: str
    announced_at: float


@dataclass(frozen=True)
class BlockStatus:
    block: int
    servers: tuple[str, ...]  # peer ids of every server announcing the block, any state
    replicas: int  # online servers
    throughput: float  # summed tokens/s of its online servers

    @property
    def health(self) -> str:
        """What the page colours: no online server, exactly one (no redundancy), or more."""
        return "uncovered" if self.replicas == 0 else "single" if self.replicas == 1 else "ok"


@dataclass(frozen=True)
class ModelStatus:
    model: str
    num_blocks: int
    servers: tuple[ServerStatus, ...]
    blocks: tuple[BlockStatus, ...]
    taken_at: float

    @property
    def covered(self) -> int:
        return sum(1 for b in self.blocks if b.replicas > 0)

    @property
    def min_replicas(self) -> int:
        return min((b.replicas for b in self.blocks), default=0)

    @property
    def throughput(self) -> float:
        """Summed announced throughput of the online servers."""
        return sum(s.throughput for s in self.servers if s.state == ServerState.ONLINE)

    @property
    def pipeline_throughput(self) -> float:
        """Tokens/s the whole model can take: its slowest block (0 while a block is uncovered)."""
        return min((b.throughput for b in self.blocks), default=0.0)

    def by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for s in self.servers:
            counts[s.state] += 1
        return counts

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "num_blocks": self.num_blocks,
            "taken_at": self.taken_at,
            "blocks_covered": self.covered,
            "uncovered_blocks": [b.block for b in self.blocks if b.replicas == 0],
            "single_server_blocks": [b.block for b in self.blocks if b.replicas == 1],
            "min_replicas": self.min_replicas,
            "servers_by_state": self.by_state(),
            "throughput": self.throughput,
            "pipeline_throughput": self.pipeline_throughput,
            "servers": [asdict(s) for s in self.servers],
            "blocks": [{**asdict(b), "health": b.health} for b in self.blocks],
        }


def summarize(snapshot: SwarmMap) -> ModelStatus:
    servers = tuple(
        ServerStatus(
            peer_id=r.peer_id,
            state=r.state.value,
            start=r.start,
            end=r.end,
            grpc_address=r.grpc_address,
            throughput=r.throughput,
            inference_rps=r.inference_rps,
            free_cache_tokens=r.free_cache_tokens,
            dtype=r.dtype,
            quant=r.quant,
            software_version=r.software_version,
            announced_at=r.announced_at,
        )
        for r in snapshot.servers
    )
    blocks = []
    for block in range(snapshot.num_blocks):
        here = [s for s in servers if s.start <= block < s.end]
        online = [s for s in here if s.state == ServerState.ONLINE]
        blocks.append(
            BlockStatus(
                block=block,
                servers=tuple(s.peer_id for s in here),
                replicas=len(online),
                throughput=sum(s.throughput for s in online),
            )
        )
    return ModelStatus(snapshot.model, snapshot.num_blocks, servers, tuple(blocks), snapshot.taken_at)


def discover_models(dht: DHT, timeout: float = 10.0) -> Discover:
    """What `swarm monitor` watches without --model: the models the swarm's registry lists now."""
    return lambda: fetch_models(dht, timeout=timeout)


class StatusBoard(Collector):
    """The latest `ModelStatus` of each watched model, refreshed from the DHT every `interval` s.

    `models` is either fixed (name -> number of blocks) or a `Discover` callback, asked at every
    refresh: a model that appears is watched from then on, one that no node lists any more is
    dropped. Also a Prometheus collector: registered in a registry, it exports the swarm-wide gauges.
    """

    def __init__(self, dht: DHT, models: Mapping[str, int] | Discover, interval: float = 1.0) -> None:
        if isinstance(models, Mapping) and not models:
            raise ConfigError("the status board needs at least one model to watch")
        if not interval > 0:
            raise ConfigError(f"status refresh interval must be > 0 s, got {interval}")
        self.dht, self.interval = dht, interval
        self._discover = None if isinstance(models, Mapping) else models
        self.maps: dict[str, SwarmMapCache] = {}
        self._blocks: dict[str, int] = {}
        if isinstance(models, Mapping):
            for model, num_blocks in models.items():
                self._watch(model, num_blocks)
        self.latest: dict[str, ModelStatus] = {}
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def discovering(self) -> bool:
        return self._discover is not None

    def _watch(self, model: str, num_blocks: int) -> None:
        # ttl = 2 x interval: the cache's own refresher re-reads the DHT every `interval`.
        self.maps[model] = SwarmMapCache(self.dht, model, num_blocks, ttl=2 * self.interval)
        self._blocks[model] = num_blocks

    async def _rediscover(self) -> None:
        """Follow the registry: watch new models, drop gone ones (or ones whose block count changed)."""
        assert self._discover is not None
        found = await run_on_client_loop(_awaited(self._discover()))
        for model in list(self.maps):
            if found.get(model) != self._blocks[model]:
                logger.info("status: %s is no longer announced with %d blocks", model, self._blocks[model])
                cache = self.maps.pop(model)
                del self._blocks[model]
                self.latest.pop(model, None)
                await run_on_client_loop(cache.close())
        for model, num_blocks in found.items():
            if model not in self.maps:
                logger.info("status: watching %s (%d blocks)", model, num_blocks)
                self._watch(model, num_blocks)

    async def refresh(self) -> None:
        """Read every model's map once (on the client loop, where the DHT lives)."""
        if self._discover is not None:
            await self._rediscover()
        for model, cache in list(self.maps.items()):
            snapshot = await run_on_client_loop(cache.get())
            if model in self.maps:  # not dropped meanwhile
                self.latest[model] = summarize(snapshot)

    async def start(self) -> None:
        with contextlib.suppress(SwarmError):
            await self.refresh()  # the first page load already has data when the DHT answers
        self._task = asyncio.get_running_loop().create_task(self._run(), name="status-board")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
                self.error = None
            except SwarmError as e:  # keep the last summary; the page shows the error
                if self.error is None:
                    logger.warning("status: reading the swarm map failed: %s", e)
                self.error = str(e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for cache in self.maps.values():
            await run_on_client_loop(cache.close())

    def to_json(self) -> dict[str, object]:
        # An empty swarm (no model yet, when discovering) is no error: "models" is just empty.
        return {
            "updated_at": max((s.taken_at for s in self.latest.values()), default=0.0),
            "now": time.time(),
            "error": self.error,
            "models": [self.latest[m].to_json() for m in self.maps if m in self.latest],
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        covered = GaugeMetricFamily("swarm_blocks_covered", "Blocks with an online server.", labels=["model"])
        total = GaugeMetricFamily("swarm_blocks", "Blocks of the model.", labels=["model"])
        servers = GaugeMetricFamily(
            "swarm_servers", "Servers of the model by state.", labels=["model", "state"]
        )
        replicas = GaugeMetricFamily(
            "swarm_min_replicas", "Online servers of the least served block.", labels=["model"]
        )
        throughput = GaugeMetricFamily(
            "swarm_throughput_tokens_per_second",
            "Summed announced throughput of the online servers.",
            labels=["model"],
        )
        pipeline = GaugeMetricFamily(
            "swarm_pipeline_throughput_tokens_per_second",
            "Throughput of the slowest block (summed over its online servers).",
            labels=["model"],
        )
        for model, status in self.latest.items():
            covered.add_metric([model], status.covered)
            total.add_metric([model], status.num_blocks)
            for state, count in status.by_state().items():
                servers.add_metric([model, state], count)
            replicas.add_metric([model], status.min_replicas)
            throughput.add_metric([model], status.throughput)
            pipeline.add_metric([model], status.pipeline_throughput)
        yield from (covered, total, servers, replicas, throughput, pipeline)


async def _awaited(awaitable: Awaitable[Mapping[str, int]]) -> Mapping[str, int]:
    return await awaitable  # run_on_client_loop takes a coroutine; a Discover may return any awaitable
