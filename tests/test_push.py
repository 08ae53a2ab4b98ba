"""Server-to-server push through a real swarm (DHT + 3 node processes on 127.0.0.1, TLS on): the
tokens equal a local run and a push-off run, the nodes' metrics show the pushed path was taken, and
a middle node killed (SIGKILL) or hung (SIGSTOP) mid-session is replaced with identical tokens."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from swarm import checkpoint
from swarm.client.config import ClientConfig
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.session import InferenceSession
from swarm.generation import SamplingConfig, generate_tokens
from swarm.localswarm import LocalSwarm, NodeProcess
from tests.checkpoints import make_checkpoint
from tests.servers import scrape

# A 3-hop route: the middle node gets pushes and pushes on. Three servers of the middle span: one
# is killed, one hung, and the third (or the other) replaces them.
SPANS = ("0:3", "3:6", "3:6", "3:6", "6:8")
PROMPT = torch.tensor([[5, 9, 31, 77, 2], [3, 17, 42, 99, 5]])  # batch 2
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("push") / "llama", "llama", num_layers=8, eos_token_id=[])


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("push") / "swarm") as local:
        local.start_dht()
        for i, span in enumerate(SPANS):
            local.start_node(
                model_path, span, "--metrics-port", "0", name=f"node-{i}-{span.replace(':', '-')}"
            )
        yield local


def local_greedy(model_path: Path, prompt: torch.Tensor, n: int) -> torch.Tensor:
    local = checkpoint.load_model(checkpoint.open_checkpoint(model_path))
    caches = local.new_caches(prompt.shape[0], prompt.shape[1] + n)
    tokens, new, start = prompt, prompt, 0
    with torch.no_grad():
        for _ in range(n):
            token = local(new, start=start, caches=caches)[:, -1].argmax(-1)
            start += new.shape[1]
            new = token[:, None]
            tokens = torch.cat([tokens, new], dim=1)
    return tokens


def pushes(node: NodeProcess) -> dict[str, float]:
    values = scrape(f"http://127.0.0.1:{node.info['metrics_port']}/metrics")
    names = ("sent", "received", "failures", "fallbacks")
    keys = ("pushes_sent", "pushes_received", "push_failures", "push_fallbacks")
    return {name: values[f"swarm_node_{key}_total"] for name, key in zip(names, keys, strict=True)}


def session_tokens(
    client: DistributedModelForCausalLM, prompt: torch.Tensor, n: int, fault: object = None
) -> tuple[torch.Tensor, int, list[str]]:
    """Greedy tokens from one inference session; (tokens, client-sent fallbacks, route after)."""
    with client.inference_session(max_length=prompt.shape[1] + n, batch_size=prompt.shape[0]) as session:

        def step(ids: torch.Tensor, start: int) -> torch.Tensor:
            if callable(fault):
                fault(session, start)
            with torch.inference_mode():
                return client.next_token_logits(session, client.parts.embed(ids))

        got = generate_tokens(step, prompt, SamplingConfig(max_new_tokens=n))
        return got, session.push_fallbacks, [s.hop.peer_id for s in session.streams]


def test_push_gives_the_local_tokens_and_is_really_used(local_swarm: LocalSwarm, model_path: Path) -> None:
    expected = local_greedy(model_path, PROMPT, NEW_TOKENS)
    nodes = local_swarm.processes[1:]
    with DistributedModelForCausalLM.from_pretrained(
        model_path, local_swarm.initial_peers, client_config=ClientConfig(push=False)
    ) as client:
        before = [pushes(n) for n in nodes]
        off, _, _ = session_tokens(client, PROMPT, NEW_TOKENS)
        assert [pushes(n) for n in nodes] == before  # push off: nothing pushed
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as client:
        on, fallbacks, route = session_tokens(client, PROMPT, NEW_TOKENS)
    after = [pushes(n) for n in nodes]
    assert on.tolist() == expected.tolist()
    assert off.tolist() == expected.tolist()
    assert len(route) == 3
    first, last = after[0], after[-1]
    middle = after[[n.info["peer_id"] for n in nodes].index(route[1])]
    # Every decoding step after the prompt was pushed from hop to hop, or found its link still
    # opening and was relayed by the client: the prompt step starts the dials, each after a DHT
    # lookup that vouches for the target (node/push.py PushGate), so on a loaded machine the first
    # few steps may miss. Each step is counted once on each side; pushes did happen on both links.
    steps = NEW_TOKENS - 1
    for hop, node in (("first", first), ("middle", middle)):
        assert node["sent"] + node["failures"] == steps and node["sent"] >= 1, (hop, after)
    assert middle["received"] + middle["fallbacks"] == steps and middle["received"] >= 1, after
    assert last["received"] + last["fallbacks"] == steps and last["received"] >= 1, after
    assert last["sent"] == last["failures"] == 0, after  # the last hop answers the client only
    assert fallbacks == middle["fallbacks"] + last["fallbacks"], (fallbacks, after)


def middle_fault(
    local: LocalSwarm, at: int, act: Callable[[NodeProcess], object], hit: list[NodeProcess]
) -> object:
    """A fault callback for session_tokens: at position `at`, `act` on the route's middle node."""

    def fault(session: InferenceSession, start: int) -> None:
        if start == at:
            victim = next(
                p for p in local.processes if p.info.get("peer_id") == session.streams[1].hop.peer_id
            )
            act(victim)
            hit.append(victim)

    return fault


def test_push_survives_a_killed_middle_node(local_swarm: LocalSwarm, model_path: Path) -> None:
    expected = local_greedy(model_path, PROMPT[:1], NEW_TOKENS)
    killed: list[NodeProcess] = []
    kill = middle_fault(
        local_swarm, PROMPT.shape[1] + 6, lambda p: local_swarm.stop(p, signal.SIGKILL), killed
    )
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as client:
        got, _, route = session_tokens(client, PROMPT[:1], NEW_TOKENS, kill)
    assert killed, "the kill never happened"
    assert killed[0].info["peer_id"] not in route
    assert got.tolist() == expected.tolist()


def test_push_survives_a_hung_middle_node(local_swarm: LocalSwarm, model_path: Path) -> None:
    """SIGSTOP keeps its connections open: the previous node's push to it still "succeeds", and only
    the client's step deadline can tell."""
    expected = local_greedy(model_path, PROMPT[:1], NEW_TOKENS)
    hung: list[NodeProcess] = []
    stop = middle_fault(local_swarm, PROMPT.shape[1] + 6, lambda p: p.proc.send_signal(signal.SIGSTOP), hung)
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as client:
        try:
            got, fallbacks, route = session_tokens(client, PROMPT[:1], NEW_TOKENS, stop)
        finally:
            for victim in hung:  # let it run again so it can be stopped normally
                victim.proc.send_signal(signal.SIGCONT)
    assert hung, "the SIGSTOP never happened"
    assert hung[0].info["peer_id"] not in route
    assert got.tolist() == expected.tolist()
    assert fallbacks >= 1  # the hop after the hung one got its input from the client


def test_cli_no_push_relays_every_hop(local_swarm: LocalSwarm, model_path: Path) -> None:
    """`swarm generate --no-push`: the same tokens, and no node pushes anything."""
    prompt = PROMPT[:1]
    expected = local_greedy(model_path, prompt, 6)[0, prompt.shape[1] :].tolist()
    nodes = [p for p in local_swarm.processes[1:] if p.proc.poll() is None]
    before = [pushes(n) for n in nodes]
    command = [sys.executable, "-m", "swarm.cli", "generate", "--model", str(model_path), "--no-push"]
    command += ["--initial-peers", *local_swarm.initial_peers, "--max-new-tokens", "6", "--prompt-ids"]
    result = subprocess.run(
        [*command, *map(str, prompt[0].tolist())], capture_output=True, text=True, timeout=240, check=True
    )
    assert [int(t) for t in result.stdout.split()] == expected
    assert [pushes(n) for n in nodes] == before


def test_push_skips_only_the_hops_of_a_node_without_push(tmp_path: Path, model_path: Path) -> None:
    """The last node runs with --no-push (as a node that predates push): the first hop still pushes
    to the second, and the client relays the second hop's output to the last itself."""
    expected = local_greedy(model_path, PROMPT, NEW_TOKENS)
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        nodes = [
            local.start_node(model_path, "0:3", "--metrics-port", "0"),
            local.start_node(model_path, "3:6", "--metrics-port", "0"),
            local.start_node(model_path, "6:8", "--metrics-port", "0", "--no-push"),
        ]
        with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client:
            got, fallbacks, _ = session_tokens(client, PROMPT, NEW_TOKENS)
        first, middle, last = (pushes(n) for n in nodes)
    assert got.tolist() == expected.tolist()
    steps = NEW_TOKENS - 1
    assert first["sent"] == middle["received"] >= steps - 1, (first, middle)  # see the first test
    assert middle["sent"] == last["received"] == last["sent"] == 0, (middle, last)
    assert fallbacks <= 1
