"""A client that names a push target no signed record announces (a third party's TCP listener, a
real node under a wrong peer id or certificate pin) gets its tokens right through the client
fallback, and the node never dials it: the listener sees no connection, the node's metrics show
no push, and its log says why once. The same swarm still pushes to targets its records announce.
Real DHT and node processes on 127.0.0.1 (TLS on)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from swarm._proto import swarm_pb2
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.remote import InferenceStream
from swarm.localswarm import LocalSwarm, NodeProcess
from tests.checkpoints import make_checkpoint
from tests.servers import accepted, scrape
from tests.servers import listener as listener  # the fixture
from tests.test_push import local_greedy, session_tokens

PROMPT = torch.tensor([[5, 9, 31, 77, 2]])
NEW_TOKENS = 8
STEPS = NEW_TOKENS - 1  # decoding steps after the prompt: the ones a node pushes


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("forged") / "llama", "llama", num_layers=8, eos_token_id=[]
    )


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("forged") / "swarm") as local:
        local.start_dht()
        for span in ("0:4", "4:8"):
            local.start_node(model_path, span, "--metrics-port", "0", name=f"node-{span.replace(':', '-')}")
        yield local


def push_counts(node: NodeProcess) -> dict[str, float]:
    values = scrape(f"http://127.0.0.1:{node.info['metrics_port']}/metrics")
    keys = ("pushes_sent", "pushes_received", "push_failures", "push_refusals")
    return {key: values[f"swarm_node_{key}_total"] for key in keys}


def forge(monkeypatch: pytest.MonkeyPatch, change: Callable[[swarm_pb2.PushTarget], None]) -> None:
    """Make this process's client name a changed target wherever it names the next hop."""
    honest = InferenceStream.push_target

    def forged(self: InferenceStream, dial_only: bool = False) -> swarm_pb2.PushTarget:
        target = honest(self, dial_only)
        change(target)
        return target

    monkeypatch.setattr(InferenceStream, "push_target", forged)


def not_pushed(before: dict[str, float], after: dict[str, float]) -> float:
    """Steps not pushed: refused by the gate, or (while its DHT lookup runs) found the link not ready."""
    return sum(after[k] - before[k] for k in ("push_refusals", "push_failures"))


def tokens(local: LocalSwarm, model_path: Path) -> torch.Tensor:
    with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client:
        got, _, route = session_tokens(client, PROMPT, NEW_TOKENS)
    assert len(route) == 2
    return got


def test_the_swarm_pushes_to_announced_nodes(local_swarm: LocalSwarm, model_path: Path) -> None:
    first, second = local_swarm.processes[1:]
    before = push_counts(first)
    assert tokens(local_swarm, model_path).tolist() == local_greedy(model_path, PROMPT, NEW_TOKENS).tolist()
    after = push_counts(first)
    # The prompt step opens the link (after the gate's DHT lookup); a step that finds it still
    # opening is relayed by the client and counted as a failure: how many do depends on the load.
    sent = after["pushes_sent"] - before["pushes_sent"]
    assert sent >= 1 and sent + after["push_failures"] - before["push_failures"] == STEPS, (before, after)
    assert after["push_refusals"] == before["push_refusals"], after
    assert push_counts(second)["pushes_received"] >= sent


def test_a_listener_named_as_target_is_never_dialled(
    local_swarm: LocalSwarm, model_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def to_listener(target: swarm_pb2.PushTarget) -> None:
        target.address, target.tls_cert_sha256 = address, ""  # plaintext, anywhere: the old hole

    forge(monkeypatch, to_listener)
    first = local_swarm.processes[1]
    before = push_counts(first)
    expected = local_greedy(model_path, PROMPT, NEW_TOKENS).tolist()
    for _ in range(2):  # a second session: the refusal is cached, and not logged again
        assert tokens(local_swarm, model_path).tolist() == expected
    after = push_counts(first)
    assert accepted(listener) == 0
    assert after["pushes_sent"] == before["pushes_sent"], (before, after)
    assert not_pushed(before, after) == 2 * STEPS and after["push_refusals"] > before["push_refusals"]
    said = [line for line in first.log_path.read_text().splitlines() if f"not pushing to {address}" in line]
    assert len(said) == 1 and f"not {address}" in said[0], said  # the real peer announces another address


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("peer_id", "12D3KooWForgedPeerIdForgedPeerIdForgedPeerId", "no signed record of peer"),
        ("tls_cert_sha256", "cd" * 32, "pins certificate"),
    ],
)
def test_a_real_node_under_a_wrong_identity_is_not_pushed_to(
    local_swarm: LocalSwarm,
    model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    value: str,
    why: str,
) -> None:
    forge(monkeypatch, lambda target: setattr(target, field, value))
    first, second = local_swarm.processes[1:]
    before, received = push_counts(first), push_counts(second)["pushes_received"]
    assert tokens(local_swarm, model_path).tolist() == local_greedy(model_path, PROMPT, NEW_TOKENS).tolist()
    after = push_counts(first)
    assert after["pushes_sent"] == before["pushes_sent"], (before, after)
    assert not_pushed(before, after) == STEPS and after["push_refusals"] > before["push_refusals"]
    assert push_counts(second)["pushes_received"] == received
    said = [
        line for line in first.log_path.read_text().splitlines() if "not pushing to" in line and why in line
    ]
    assert len(said) == 1, said
