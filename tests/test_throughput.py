"""Throughput: compute timing, the on-disk cache, the --throughput override, span math, network probe."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from swarm.errors import ConfigError, PeerUnavailable
from swarm.models.llama import LlamaBlock, LlamaConfig
from swarm.node import throughput
from swarm.node.backend import BlockBackend
from swarm.node.server import BlockServicer, ServerLimits, start_grpc_server
from swarm.node.throughput import (
    Throughput,
    cache_key,
    get_throughput,
    load_cached,
    measure_compute,
    measure_network,
    save_cached,
)

CPU = torch.device("cpu")


def tiny_config(hidden: int = 32, intermediate: int = 64, **extra: object) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **extra,
        }
    )


class CountingFactory:
    """A block_factory that records how often it is asked for a block, i.e. how often we measure."""

    def __init__(self, config: LlamaConfig) -> None:
        self.config = config
        self.calls = 0

    def __call__(self) -> nn.Module:
        self.calls += 1
        return LlamaBlock(self.config).eval()


def never_called() -> nn.Module:
    raise AssertionError("measured although it should not have")


@pytest.fixture
def closed_address() -> Iterator[str]:
    """An address that refuses connections: bound (so no one else takes the port) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def node_address() -> AsyncIterator[str]:
    config = tiny_config()
    backend = BlockBackend(
        config, [LlamaBlock(config)], 0, dtype=torch.float32, device=CPU, cache_bytes=1 << 20
    )
    limits = ServerLimits(
        max_batch=1, max_tokens=16, max_session_length=16, max_message_bytes=64 << 20, session_idle_timeout=5
    )
    servicer = BlockServicer(backend, "tiny", "peer-a", limits)
    server, port, _ = await start_grpc_server(servicer, "127.0.0.1", 0, 64 << 20)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        backend.shutdown()


# ---- compute --------------------------------------------------------------------------------------


def test_measure_compute_is_positive_and_keeps_to_its_budget() -> None:
    budget = 0.5
    began = time.perf_counter()
    forward_tps, inference_rps = measure_compute(tiny_config(), CPU, torch.float32, budget_s=budget)
    # The loop stops by the clock, not after a fixed count; the slack is for a busy CI machine.
    assert time.perf_counter() - began < 2 * budget + 0.5
    for value in (forward_tps, inference_rps):
        assert math.isfinite(value) and value > 0


def test_bigger_block_is_slower() -> None:
    small = measure_compute(tiny_config(), CPU, torch.float32, budget_s=0.2)
    # 500x the weights: far apart enough that a busy machine cannot flip the order
    big = measure_compute(tiny_config(hidden=1024, intermediate=4096), CPU, torch.float32, budget_s=0.2)
    assert big[0] < small[0]
    assert big[1] < small[1]


def test_measure_compute_uses_the_block_factory() -> None:
    config = tiny_config()
    factory = CountingFactory(config)
    measure_compute(config, CPU, torch.float32, block_factory=factory, budget_s=0.05)
    assert factory.calls == 1


# ---- cache ----------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_depends_on_every_input() -> None:
    key = cache_key("gpu-x", tiny_config(), torch.float32, "none")
    assert key == cache_key("gpu-x", tiny_config(), torch.float32, "none")
    others = {
        cache_key("gpu-y", tiny_config(), torch.float32, "none"),
        cache_key("gpu-x", tiny_config(hidden=64), torch.float32, "none"),
        cache_key("gpu-x", tiny_config(), torch.bfloat16, "none"),
        cache_key("gpu-x", tiny_config(), torch.float32, "nf4"),
    }
    assert key not in others and len(others) == 4


def test_save_keeps_other_keys_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "throughput.json"
    assert load_cached(path, "a") is None
    save_cached(path, "a", (100.0, 5.0))
    save_cached(path, "b", (200.0, 7.5))
    assert load_cached(path, "a") == (100.0, 5.0)
    assert load_cached(path, "b") == (200.0, 7.5)
    assert [p.name for p in path.parent.iterdir()] == ["throughput.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"\x00\xffnot json{", b"[1, 2]", b'{"k": "x"}'])
def test_corrupt_cache_is_tolerated(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "throughput.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert load_cached(path, "k") is None
    save_cached(path, "k", (1.0, 2.0))
    assert load_cached(path, "k") == (1.0, 2.0)
    assert json.loads(path.read_text())["k"] == {"forward_tps": 1.0, "inference_rps": 2.0}


async def test_second_call_reads_the_cache(tmp_path: Path) -> None:
    config, path = tiny_config(), tmp_path / "throughput.json"
    factory = CountingFactory(config)

    async def get() -> Throughput:
        return await get_throughput(
            config, CPU, torch.float32, "none", cache_path=path, block_factory=factory, budget_s=0.05
        )

    first = await get()
    assert factory.calls == 1
    second = await get()
    assert factory.calls == 1  # not measured again
    assert (second.forward_tps, second.inference_rps) == (first.forward_tps, first.inference_rps)
    other_quant = await get_throughput(
        config, CPU, torch.float32, "int8", cache_path=path, block_factory=factory, budget_s=0.05
    )
    assert factory.calls == 2 and other_quant.network_bps == throughput.DEFAULT_NETWORK_BPS


async def test_corrupt_cache_file_is_measured_again_and_rewritten(tmp_path: Path) -> None:
    config, path = tiny_config(), tmp_path / "throughput.json"
    path.write_text("{truncated")
    factory = CountingFactory(config)
    await get_throughput(
        config, CPU, torch.float32, "none", cache_path=path, block_factory=factory, budget_s=0.05
    )
    assert factory.calls == 1
    assert len(json.loads(path.read_text())) == 1


def test_default_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert throughput.default_cache_path() == tmp_path / "s" / "throughput.json"
    monkeypatch.delenv("SWARM_CACHE_DIR")
    assert throughput.default_cache_path() == tmp_path / "x" / "swarm" / "throughput.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert throughput.default_cache_path() == Path.home() / ".cache" / "swarm" / "throughput.json"


# ---- override and span math -----------------------------------------------------------------------


async def test_override_wins_and_measures_nothing(tmp_path: Path, closed_address: str) -> None:
    path = tmp_path / "throughput.json"
    got = await get_throughput(
        tiny_config(),
        CPU,
        torch.float32,
        "none",
        cache_path=path,
        override=123.0,
        peer_address=closed_address,
        block_factory=never_called,
    )
    assert not path.exists()
    assert got.network_bps == throughput.DEFAULT_NETWORK_BPS
    # N is the span's tokens/s whatever the span; per-block fields scale so that compute / span == N
    for blocks in (1, 4):
        assert got.span_throughput(blocks, hidden_size=8192) == 123.0
        fields = got.record_fields(blocks, hidden_size=8192)
        assert fields["throughput"] == 123.0
        assert fields["compute_throughput"] == fields["inference_rps"] == 123.0 * blocks


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
async def test_bad_override_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="--throughput"):
        await get_throughput(tiny_config(), CPU, torch.float32, "none", cache_path=None, override=bad)


def test_span_throughput_compute_bound() -> None:
    t = Throughput(forward_tps=1000.0, inference_rps=50.0, network_bps=1e9)
    # network bound: 1e9 / (2 * 1024 * 2) = 244140 tokens/s, far above 1000 / 4
    assert t.span_throughput(4, hidden_size=1024) == pytest.approx(250.0)
    assert t.record_fields(4, hidden_size=1024) == {
        "compute_throughput": 1000.0,
        "inference_rps": 50.0,
        "network_throughput": 1e9,
        "throughput": pytest.approx(250.0),
    }


def test_span_throughput_network_bound() -> None:
    t = Throughput(forward_tps=1000.0, inference_rps=50.0, network_bps=1e6)
    # 1e6 bytes/s / (2 directions * 1024 values * 2 bytes) = 244.1 tokens/s < 1000 / 2
    assert t.span_throughput(2, hidden_size=1024) == pytest.approx(1e6 / 4096)
    assert t.span_throughput(2, hidden_size=1024, wire_bytes_per_value=4.0) == pytest.approx(1e6 / 8192)
    with pytest.raises(ValueError, match="num_blocks"):
        t.span_throughput(0, hidden_size=1024)


def test_throughput_rejects_non_positive_values() -> None:
    with pytest.raises(ConfigError, match="network_bps"):
        Throughput(forward_tps=1.0, inference_rps=1.0, network_bps=0.0)


# ---- network --------------------------------------------------------------------------------------


async def test_measure_network_against_a_real_node(node_address: str) -> None:
    bps = await measure_network(node_address, payload_bytes=1 << 20, timeout=10.0, rounds=2)
    assert math.isfinite(bps) and bps > 0


async def test_measure_network_unreachable_raises_quickly(closed_address: str) -> None:
    began = time.perf_counter()
    with pytest.raises(PeerUnavailable, match=closed_address):
        await measure_network(closed_address, payload_bytes=1024, timeout=2.0)
    assert time.perf_counter() - began < 2.0


async def test_get_throughput_network_sources(
    tmp_path: Path, node_address: str, closed_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    config, path = tiny_config(), tmp_path / "throughput.json"

    async def network(peer: str | None = None, override: float | None = None, default: float = 7e6) -> float:
        got = await get_throughput(
            config,
            CPU,
            torch.float32,
            "none",
            cache_path=path,
            budget_s=0.05,
            peer_address=peer,
            network_override=override,
            default_network_bps=default,
        )
        return got.network_bps

    assert await network(peer=closed_address, override=5e6) == 5e6
    assert await network() == 7e6
    with caplog.at_level(logging.WARNING):
        assert await network(peer=closed_address) == 7e6  # unreachable: warn and fall back
    assert closed_address in caplog.text
    measured = await network(peer=node_address)
    assert measured != 7e6 and measured > 0
