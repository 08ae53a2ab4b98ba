"""The swarm status page, /api/status and the swarm-wide gauges: unit tests of the summary, then a
real local swarm watched by `swarm monitor`, scraped by Debian's Prometheus with the repository's
config and rendered by Debian's headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from swarm.client.model import DistributedModelForCausalLM
from swarm.coordinator.routing import SwarmMap
from swarm.localswarm import LocalSwarm
from swarm.records import ServerRecord, ServerState
from swarm.serve.status import StatusBoard, summarize
from tests.browser import chromium_binary, open_page
from tests.servers import scrape, wait_for
from tests.test_deploy import PROMETHEUS_YML, load_dashboard

# Set to write the page's screenshot there (the one in docs/ was made so).
SCREENSHOT = os.environ.get("SWARM_STATUS_SCREENSHOT")


def record(
    peer: str, start: int, end: int, state: ServerState = ServerState.ONLINE, tps: float = 10.0
) -> ServerRecord:
    return ServerRecord(
        state=state,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        model="m",
        start=start,
        end=end,
        throughput=tps,
        free_cache_tokens=100,
        software_version="0.1.0",
    )


def test_summary_marks_uncovered_and_single_server_blocks() -> None:
    servers = (
        record("a", 0, 2),
        record("b", 1, 3),
        record("c", 1, 3, ServerState.DRAINING),
        record("d", 3, 4, ServerState.OFFLINE),
    )
    status = summarize(SwarmMap("m", 5, servers))
    assert [b.health for b in status.blocks] == ["single", "ok", "single", "uncovered", "uncovered"]
    assert [b.replicas for b in status.blocks] == [1, 2, 1, 0, 0]
    assert status.blocks[1].servers == ("a", "b", "c")  # every announcer is listed, with its state
    assert (status.covered, status.min_replicas, status.throughput) == (3, 0, 20.0)
    assert status.pipeline_throughput == 0.0  # an uncovered block stops the pipeline
    assert status.by_state() == {"joining": 0, "online": 2, "draining": 1, "offline": 1}
    assert status.to_json()["uncovered_blocks"] == [3, 4]


def test_swarm_gauges_come_from_the_latest_summary() -> None:
    board = StatusBoard(dht=None, models={"m": 3})  # never refreshed here
    board.latest["m"] = summarize(SwarmMap("m", 3, (record("a", 0, 3, tps=7.0), record("b", 1, 3, tps=5.0))))
    registry = CollectorRegistry()
    registry.register(board)
    text = generate_latest(registry).decode()
    for line in (
        'swarm_blocks_covered{model="m"} 3.0',
        'swarm_blocks{model="m"} 3.0',
        'swarm_servers{model="m",state="online"} 2.0',
        'swarm_servers{model="m",state="offline"} 0.0',
        'swarm_min_replicas{model="m"} 1.0',
        'swarm_throughput_tokens_per_second{model="m"} 12.0',
        'swarm_pipeline_throughput_tokens_per_second{model="m"} 7.0',
    ):
        assert line in text


# ------------------------------------------------------------------------- against a real swarm ---


@pytest.fixture(scope="module")
def monitor(monitor_url: str) -> str:
    return monitor_url


@pytest.fixture(scope="module")
def local_swarm(chat_swarm: LocalSwarm) -> LocalSwarm:
    return chat_swarm


@pytest.fixture(scope="module")
def model_path(chat_model_path: Path) -> Path:
    return chat_model_path


def test_api_status_lists_every_block_with_its_servers(monitor: str, local_swarm: LocalSwarm) -> None:
    (model,) = httpx.get(f"{monitor}/api/status", timeout=10).json()["models"]
    assert model["model"] == "tiny-chat" and model["num_blocks"] == 4
    assert [b["health"] for b in model["blocks"]] == ["single", "single", "ok", "ok"]
    assert model["single_server_blocks"] == [0, 1] and model["uncovered_blocks"] == []
    peers = {p.name: p.info["peer_id"] for p in local_swarm.processes[1:]}
    assert model["blocks"][0]["servers"] == [peers["node-a"]]
    assert sorted(model["blocks"][3]["servers"]) == sorted([peers["node-b"], peers["node-c"]])
    for server in model["servers"]:
        assert server["state"] == "online" and server["software_version"] and server["free_cache_tokens"] > 0
        assert server["throughput"] > 0


def test_metrics_has_swarm_wide_gauges(monitor: str) -> None:
    values = scrape(f"{monitor}/metrics")
    assert values['swarm_blocks_covered{model="tiny-chat"}'] == 4
    assert values['swarm_min_replicas{model="tiny-chat"}'] == 1
    assert values['swarm_servers{model="tiny-chat",state="online"}'] == 3
    assert values['swarm_throughput_tokens_per_second{model="tiny-chat"}'] > 0


def test_monitor_without_model_discovers_the_served_model(discovery_monitor_url: str) -> None:
    status = httpx.get(f"{discovery_monitor_url}/api/status", timeout=10).json()
    (model,) = status["models"]
    assert model["model"] == "tiny-chat" and model["num_blocks"] == 4 and status["error"] is None
    assert [b["health"] for b in model["blocks"]] == ["single", "single", "ok", "ok"]
    assert model["blocks_covered"] == 4 and model["servers_by_state"]["online"] == 3
    values = scrape(f"{discovery_monitor_url}/metrics")
    assert values['swarm_blocks{model="tiny-chat"}'] == 4
    assert values['swarm_blocks_covered{model="tiny-chat"}'] == 4


async def test_a_discovering_board_of_an_empty_swarm_is_empty_not_an_error() -> None:
    found: dict[str, int] = {}

    async def discover() -> dict[str, int]:
        return found

    board = StatusBoard(dht=None, models=discover)  # no model yet: no map to read either
    await board.refresh()
    assert board.discovering and board.maps == {}
    body = board.to_json()
    assert body["models"] == [] and body["error"] is None
    registry = CollectorRegistry()
    registry.register(board)
    assert "swarm_blocks_covered" in generate_latest(registry).decode()  # /metrics still answers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prometheus_config(node: str, monitor: str) -> dict[str, Any]:
    """The repository's config (scrape settings kept), its static targets pointed at this swarm."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {"swarm-node": node, "swarm-monitor": monitor}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, local_swarm: LocalSwarm, monitor: str
) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/system-deps.sh (make test does)")
    workdir = tmp_path_factory.mktemp("prometheus")
    node_a = local_swarm.processes[1]
    config = _prometheus_config(f"127.0.0.1:{node_a.info['metrics_port']}", monitor.removeprefix("http://"))
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{_free_port()}"
    args = [f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}"]
    args += [f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"]
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            ["prometheus", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(
            lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200 or None,
            "prometheus",
            timeout=60,
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel, with Grafana's variables as Grafana would fill them."""
    queries = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace('=~"$instance"', '=~".+"')
            queries.append((panel["title"], expr))
    return queries


def test_prometheus_scrapes_node_and_monitor_and_every_dashboard_query_has_data(
    prometheus: str, local_swarm: LocalSwarm, model_path: Path
) -> None:
    # Traffic first, so the node's request series exist before Prometheus scrapes them.
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        model.generate(__import__("torch").tensor([[1, 2, 3]]), 4)

    def targets_up() -> bool:
        active = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    wait_for(targets_up, "both targets to be up", timeout=60, interval=0.5)
    assert (
        _query(prometheus, 'swarm_blocks_covered{job="swarm-monitor",model="tiny-chat"}')[0]["value"][1]
        == "4"
    )
    assert _query(prometheus, 'swarm_node_span_end{job="swarm-node"}')[0]["value"][1] == "2"
    # rate() needs two scrapes, 15 s apart with the repository's scrape_interval.
    for title, expr in dashboard_queries():
        wait_for(
            partial(_query, prometheus, expr), f"data for panel {title!r}: {expr}", timeout=60, interval=1
        )


@pytest.mark.skipif(chromium_binary() is None, reason="needs chromium: scripts/system-deps.sh installs it")
def test_status_page_renders_in_chromium_and_updates_when_a_node_stops(
    monitor: str, local_swarm: LocalSwarm, tmp_path: Path
) -> None:
    """Stops node-a: runs after every other test of the shared swarm (but the one below)."""
    rows = "JSON.stringify([...document.querySelectorAll('tr[data-block]')].map(r => r.dataset.health))"
    with open_page(monitor, tmp_path) as page:
        wait_for(
            lambda: page.evaluate(rows) == '["single","single","ok","ok"]', "the blocks to render", timeout=30
        )
        text = page.evaluate("document.body.innerText")
        assert "tiny-chat" in text and "4/4 blocks covered" in text and "0.1.0" in text
        page.evaluate("window.notReloaded = true")
        local_swarm.stop(local_swarm.processes[1])  # node-a: blocks 0:2, their only server
        started = time.monotonic()
        wait_for(
            lambda: page.evaluate(rows) == '["uncovered","uncovered","ok","ok"]',
            "the open page to show blocks 0 and 1 uncovered",
            timeout=30,
        )
        assert page.evaluate("window.notReloaded") is True  # the page updated itself
        assert "uncovered blocks: 0, 1" in page.evaluate("document.body.innerText")
        page.screenshot(Path(SCREENSHOT) if SCREENSHOT else tmp_path / "status-page.png")
        print(f"page updated {time.monotonic() - started:.1f} s after the node stopped")


def test_uncovered_blocks_are_503_naming_them(serve_url: str, local_swarm: LocalSwarm) -> None:
    """After the test above stopped node-a, the only server of blocks 0:2."""
    if local_swarm.processes[1].proc.poll() is None:
        local_swarm.stop(local_swarm.processes[1])

    def refused() -> httpx.Response | None:
        r = httpx.post(
            f"{serve_url}/v1/completions", json={"model": "tiny-chat", "prompt": "w10"}, timeout=30
        )
        return r if r.status_code == 503 else None

    response = wait_for(refused, "a 503 once blocks 0:2 have no server", timeout=30, interval=0.5)
    error = response.json()["error"]
    assert "blocks 0:2" in error["message"] and error["type"] == "service_unavailable"
