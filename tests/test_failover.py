"""Faults mid-generation: a node killed (SIGKILL) or hung (SIGSTOP) is replaced, its span re-routed and
its inputs replayed, with identical tokens (also with speculative decoding on, and with server-to-server
push on and off; tests/test_push.py kills and hangs the middle node of a 3-hop route); a span nobody
else serves fails fast with MissingBlocksError."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.speculative import decode_in_session
from swarm.errors import MissingBlocksError
from swarm.generation import SamplingConfig, generate_tokens
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.speculative import SpeculativeConfig
from tests.checkpoints import make_checkpoint
from tests.test_speculative import SEED, windowed_checkpoint

# Server-to-server push on (the default) and off: failover works the same either way.
PUSH = pytest.mark.parametrize("push", [True, False], ids=["push", "no-push"])


@PUSH
def test_greedy_tokens_survive_a_killed_node(tmp_path: Path, push: bool) -> None:
    model_path = make_checkpoint(tmp_path / "failover-llama", "llama", num_layers=8, eos_token_id=[])
    prompt = torch.tensor([[5, 9, 31, 77, 2]])
    new_tokens, kill_after = 24, 8
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:4")
        second_half = [local.start_node(model_path, "4:8", name=f"half-{i}") for i in range(2)]
        with DistributedModelForCausalLM.from_pretrained(
            model_path, local.initial_peers, client_config=ClientConfig(push=push)
        ) as client:
            expected = client.generate(prompt, max_new_tokens=new_tokens)
            killed: list[str] = []

            with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:

                def step(ids: torch.Tensor, start: int) -> torch.Tensor:
                    if start == prompt.shape[1] + kill_after:
                        victim_id = session.streams[-1].hop.peer_id
                        victim = next(p for p in second_half if p.info["peer_id"] == victim_id)
                        local.stop(victim, signal.SIGKILL)
                        killed.append(victim_id)
                    with torch.inference_mode():
                        return client.next_token_logits(session, client.parts.embed(ids))

                got = generate_tokens(step, prompt, SamplingConfig(max_new_tokens=new_tokens))
                route_after = [s.hop.peer_id for s in session.streams]

    assert killed, "the kill never happened"
    assert killed[0] not in route_after
    assert got.tolist() == expected.tolist()


@PUSH
def test_a_hung_node_is_caught_by_the_step_deadline(tmp_path: Path, push: bool) -> None:
    """SIGSTOP keeps the TCP connection open, so only the per-step deadline can tell."""
    model_path = make_checkpoint(tmp_path / "hung-llama", "llama", num_layers=8, eos_token_id=[])
    prompt = torch.tensor([[6, 1, 28, 3]])
    new_tokens, stop_after = 24, 6
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:4")
        second_half = [local.start_node(model_path, "4:8", name=f"half-{i}") for i in range(2)]
        with DistributedModelForCausalLM.from_pretrained(
            model_path, local.initial_peers, client_config=ClientConfig(push=push)
        ) as client:
            started = time.monotonic()
            expected = client.generate(prompt, max_new_tokens=new_tokens)
            undisturbed = time.monotonic() - started
            hung: list[NodeProcess] = []

            with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:

                def step(ids: torch.Tensor, start: int) -> torch.Tensor:
                    if start == prompt.shape[1] + stop_after:
                        victim_id = session.streams[-1].hop.peer_id
                        victim = next(p for p in second_half if p.info["peer_id"] == victim_id)
                        victim.proc.send_signal(signal.SIGSTOP)
                        hung.append(victim)
                    with torch.inference_mode():
                        return client.next_token_logits(session, client.parts.embed(ids))

                started = time.monotonic()
                try:
                    got = generate_tokens(step, prompt, SamplingConfig(max_new_tokens=new_tokens))
                finally:
                    for victim in hung:  # let it run again so it can be stopped normally
                        victim.proc.send_signal(signal.SIGCONT)
                disturbed = time.monotonic() - started
                route_after = [s.hop.peer_id for s in session.streams]

    assert hung, "the SIGSTOP never happened"
    assert hung[0].info["peer_id"] not in route_after
    assert got.tolist() == expected.tolist()
    extra = disturbed - undisturbed
    print(f"hung peer: generation took {extra:.2f} s longer than undisturbed ({undisturbed:.2f} s)")
    # The floor of the step deadline is 3 s; allow for a loaded CI machine on top.
    assert extra < ClientConfig().step_timeout_floor + 10


def test_a_span_served_once_fails_fast_when_its_server_dies(tmp_path: Path) -> None:
    model_path = make_checkpoint(tmp_path / "lonely-llama", "llama", num_layers=8, eos_token_id=[])
    prompt = torch.tensor([[2, 7, 1, 8]])
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:4")
        lonely = local.start_node(model_path, "4:8", name="lonely")
        with (
            DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client,
            client.inference_session(max_length=32) as session,
        ):

            def step(ids: torch.Tensor, start: int) -> torch.Tensor:
                if start == prompt.shape[1] + 3:
                    local.stop(lonely, signal.SIGKILL)
                with torch.inference_mode():
                    return client.next_token_logits(session, client.parts.embed(ids))

            started = time.monotonic()
            with pytest.raises(MissingBlocksError) as info:
                generate_tokens(step, prompt, SamplingConfig(max_new_tokens=20))
            took = time.monotonic() - started
    assert info.value.blocks == [4, 5, 6, 7]
    assert took < 30, f"took {took:.1f} s to give up"  # no waiting for long timeouts


@PUSH
def test_speculative_tokens_survive_a_killed_node(tmp_path: Path, push: bool) -> None:
    """Speculation on (prompt lookup, drafts accepted and rejected): the replacement replays the
    accepted tokens only, and the tokens equal plain greedy decoding's."""
    model_path = windowed_checkpoint(tmp_path / "failover-windowed")
    new_tokens, kill_after = 28, 20  # after the repeated passage (15 tokens) and its first rejection
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:4")
        second_half = [local.start_node(model_path, "4:8", name=f"half-{i}") for i in range(2)]
        with DistributedModelForCausalLM.from_pretrained(
            model_path, local.initial_peers, client_config=ClientConfig(push=push)
        ) as client:
            text = client.generate(torch.tensor([SEED]), max_new_tokens=40)
            prompt = torch.cat([text, text[:, 10:30]], dim=1)  # greedy goes on copying the passage
            expected = client.generate(prompt, max_new_tokens=new_tokens)
            killed: list[str] = []
            emitted: list[torch.Tensor] = []
            cfg = SamplingConfig(max_new_tokens=new_tokens)

            with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:

                def on_tokens(token: torch.Tensor) -> None:
                    emitted.append(token)
                    if len(emitted) == kill_after:
                        victim_id = session.streams[-1].hop.peer_id
                        victim = next(p for p in second_half if p.info["peer_id"] == victim_id)
                        local.stop(victim, signal.SIGKILL)
                        killed.append(victim_id)

                spec = SpeculativeConfig("lookup", draft_tokens=3)  # 3: a draft runs past the passage
                got, stats = run_sync(
                    decode_in_session(session, client.parts, prompt, cfg, spec, None, on_tokens)
                )
                route_after = [s.hop.peer_id for s in session.streams]

    assert killed, "the kill never happened"
    assert killed[0] not in route_after
    assert stats.accepted >= 6 and stats.accepted < stats.drafted, stats  # kept and rolled back drafts
    assert got.tolist() == expected.tolist()
