"""One local swarm shared by the serve, chat and status page tests of this package.

Starting node processes is the slow part of these tests, so they share one swarm of a tiny chat
model: a DHT peer, node-a (blocks 0:2, its only server), node-b and node-c (both 2:4), plus one
`swarm serve` and two `swarm monitor` processes (one told the model, one discovering it), all
stopped after the package's last test. Tests that stop a node run last (at the end of
test_status_page.py, after test_api.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from swarm.localswarm import LocalSwarm
from tests.checkpoints import add_word_tokenizer, make_checkpoint
from tests.servers import swarm_command, wait_for

MODEL = "tiny-chat"
NODE_ARGS = ("--metrics-port", "0", "--throughput", "50")


@pytest.fixture(scope="package")
def chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, num_layers=4, eos_token_id=[])
    return add_word_tokenizer(path)


@pytest.fixture(scope="package")
def chat_swarm(tmp_path_factory: pytest.TempPathFactory, chat_model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("chat-swarm")) as local:
        local.start_dht()
        local.start_node(chat_model_path, "0:2", *NODE_ARGS, name="node-a")
        local.start_node(chat_model_path, "2:4", *NODE_ARGS, name="node-b")
        local.start_node(chat_model_path, "2:4", *NODE_ARGS, name="node-c")
        yield local


@pytest.fixture(scope="package")
def serve_url(
    tmp_path_factory: pytest.TempPathFactory, chat_swarm: LocalSwarm, chat_model_path: Path
) -> Iterator[str]:
    args = ["serve", "--model", str(chat_model_path), "--initial-peers", *chat_swarm.initial_peers]
    args += ["--port", "0", "--max-sessions", "8", "--max-queue", "2"]
    with swarm_command(tmp_path_factory.mktemp("serve"), "serve", args) as ready:
        assert ready["model"] == MODEL and ready["url"].startswith("http://127.0.0.1:")
        log = Path(ready["log"]).read_text()
        assert f"swarm serve ready: url={ready['url']} model={MODEL} " in log
        yield str(ready["url"])
        log = Path(ready["log"]).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log  # quiet when healthy


@pytest.fixture(scope="package")
def monitor_url(
    tmp_path_factory: pytest.TempPathFactory, chat_swarm: LocalSwarm, chat_model_path: Path
) -> Iterator[str]:
    args = ["monitor", "--initial-peers", *chat_swarm.initial_peers, "--model", str(chat_model_path)]
    args += ["--port", "0", "--status-interval", "0.5"]
    with swarm_command(tmp_path_factory.mktemp("monitor"), "monitor", args) as ready:
        url = str(ready["url"])
        assert f"swarm monitor ready: url={url} models={MODEL} " in Path(ready["log"]).read_text()
        wait_for(lambda: online_servers(url) == 3 or None, "the monitor to see the 3 nodes", timeout=60)
        yield url
        log = Path(ready["log"]).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.fixture(scope="package")
def discovery_monitor_url(tmp_path_factory: pytest.TempPathFactory, chat_swarm: LocalSwarm) -> Iterator[str]:
    """`swarm monitor` without --model: it finds the swarm's models in the DHT's model registry."""
    args = [
        "monitor",
        "--initial-peers",
        *chat_swarm.initial_peers,
        "--port",
        "0",
        "--status-interval",
        "0.5",
    ]
    with swarm_command(tmp_path_factory.mktemp("monitor-discovery"), "monitor", args) as ready:
        url = str(ready["url"])
        assert ready["discovery"] == "on" and ready["models"] in (MODEL, "none-yet"), ready
        assert f"swarm monitor ready: url={url} models={ready['models']} discovery=on " in (
            Path(ready["log"]).read_text()
        )
        wait_for(lambda: online_servers(url) == 3 or None, "the monitor to discover the 3 nodes", timeout=60)
        yield url
        log = Path(ready["log"]).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log


def online_servers(url: str) -> int:
    models = httpx.get(f"{url}/api/status", timeout=10).json()["models"]
    return int(models[0]["servers_by_state"]["online"]) if len(models) == 1 else 0
