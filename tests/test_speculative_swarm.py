"""Speculative decoding through a real swarm (DHT + 2 node processes on 127.0.0.1): the same tokens
as plain greedy decoding with both drafters and several draft lengths, and rollback on the nodes.

The model is a tiny Mistral-style checkpoint with a 2-token sliding window (see test_speculative):
a prompt that repeats a passage of the model's own greedy text is continued by copying it, so
prompt-lookup drafts get accepted, and some rejected.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.localswarm import LocalSwarm
from swarm.speculative import Speculative
from tests.test_speculative import SEED, windowed_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return windowed_checkpoint(tmp_path_factory.mktemp("spec-swarm") / "windowed")


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block model with the same vocabulary and other weights: a draft model that often misses."""
    return windowed_checkpoint(tmp_path_factory.mktemp("spec-swarm") / "draft", seed=7, num_layers=2)


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("spec-swarm") / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:4")
        local.start_node(model_path, "4:8")
        yield local


@pytest.fixture(scope="module")
def client(local_swarm: LocalSwarm, model_path: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        yield model


def repeating_prompt(client: DistributedModelForCausalLM) -> torch.Tensor:
    text = client.generate(torch.tensor([SEED]), max_new_tokens=40)
    return torch.cat([text, text[:, 10:30]], dim=1)


def test_speculative_generation_gives_the_greedy_tokens(
    client: DistributedModelForCausalLM, model_path: Path, draft_path: Path
) -> None:
    prompt, n = repeating_prompt(client), 24
    expected = client.generate(prompt, max_new_tokens=n)
    runs: list[tuple[Speculative, Path | None, int]] = [
        ("lookup", None, 2),
        ("lookup", None, 8),
        ("model", draft_path, 3),
        ("model", model_path, 4),
    ]
    for mode, draft, k in runs:
        got = client.generate(prompt, max_new_tokens=n, speculative=mode, draft_model=draft, draft_tokens=k)
        stats = client.last_speculation
        assert got.tolist() == expected.tolist(), (mode, draft, k)
        assert stats is not None and stats.tokens == n
        if mode == "lookup":  # the repeated passage was drafted and kept: fewer round trips
            assert stats.accepted >= 6 and stats.steps <= n - 1 - stats.accepted, stats
        if draft == model_path:  # the model drafting for itself: every draft is right
            assert stats.accepted == stats.drafted > 0, stats
        if draft == draft_path:  # another model: some drafts wrong, so rollbacks happened
            assert stats.accepted < stats.drafted, stats


def test_rejected_drafts_do_not_leak_into_later_steps(client: DistributedModelForCausalLM) -> None:
    """A step of 1 + 3 drafts, all rejected, then the next token: the same outputs as if the drafts
    had never been sent (and visibly different from a session that kept them)."""
    prompt = torch.tensor([SEED])
    ids = [torch.tensor([[40]]), torch.tensor([[41, 99, 98, 97]]), torch.tensor([[42]])]
    embed = client.parts.embed

    def run(steps: list[torch.Tensor], rollback_to: int | None) -> torch.Tensor:
        with torch.inference_mode(), client.inference_session(max_length=16) as session:
            run_sync(session.step(embed(prompt)))
            out = None
            for i, step in enumerate(steps):
                if i == len(steps) - 1 and rollback_to is not None:
                    session.rollback(rollback_to)
                out = run_sync(session.step(embed(step)))
            assert out is not None
            return out

    clean = run([ids[0][:, :1], ids[1][:, :1], ids[2]], None)
    speculated = run([ids[0], ids[1], ids[2]], rollback_to=len(SEED) + 2)  # keep 40 and 41
    leaked = run([ids[0], ids[1], ids[2]], None)
    # float32 through 8 blocks: token 41 computed within a 4-token step rounds a little differently
    torch.testing.assert_close(speculated, clean, rtol=1e-4, atol=1e-4)
    assert (leaked - clean).abs().max() > 0.05, (leaked - clean).abs().max()


def test_cli_generate_speculative_prints_the_same_tokens(
    local_swarm: LocalSwarm, client: DistributedModelForCausalLM, model_path: Path
) -> None:
    prompt = repeating_prompt(client)[0].tolist()
    expected = client.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt) :].tolist()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "swarm.cli", "generate", "--model", str(model_path)),
            *("--initial-peers", *local_swarm.initial_peers),
            *("--prompt-ids", *map(str, prompt), "--max-new-tokens", "12", "--speculative", "lookup"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert [int(t) for t in result.stdout.split()] == expected
    assert "speculative (lookup): 12 tokens in" in result.stderr


def test_speculative_sampling_through_the_swarm(
    client: DistributedModelForCausalLM, draft_path: Path
) -> None:
    """Sampling with drafts runs end to end (its distribution is tested in test_speculative)."""
    prompt, n = repeating_prompt(client), 12
    modes: list[tuple[Speculative, Path | None]] = [("lookup", None), ("model", draft_path)]
    for mode, draft in modes:
        out = client.generate(
            prompt,
            max_new_tokens=n,
            do_sample=True,
            temperature=0.2,
            seed=5,
            speculative=mode,
            draft_model=draft,
        )
        stats = client.last_speculation
        assert out.shape == (1, prompt.shape[1] + n) and out[:, : prompt.shape[1]].equal(prompt)
        assert stats is not None and stats.tokens == n and stats.drafted > 0, (mode, stats)
