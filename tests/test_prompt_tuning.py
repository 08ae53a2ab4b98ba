"""Prompt tuning through the swarm: exact prompt gradients, training, decoding, save/load."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from swarm import checkpoint
from swarm.client.config import ClientConfig
from swarm.client.model import DistributedModelForCausalLM, causal_lm_loss
from swarm.client.ptune import PromptTuning
from swarm.errors import ConfigError
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaForCausalLM
from tests.checkpoints import make_checkpoint

TOLERANCE = 1e-4  # relative error, float32 end to end
VIRTUAL = 4
SEQUENCE = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ptune-llama", "llama", num_layers=4)


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        local.start_node(model_path, "0:2", "--dtype", "float32", name="first")
        local.start_node(model_path, "2:4", "--dtype", "float32", name="second")
        yield local


@pytest.fixture(scope="module")
def client(local_swarm: LocalSwarm, model_path: Path) -> Iterator[DistributedModelForCausalLM]:
    exact = ClientConfig(training_codec="none")  # lossless, so gradients compare to float rounding
    with DistributedModelForCausalLM.from_pretrained(
        model_path, local_swarm.initial_peers, client_config=exact
    ) as model:
        yield model


@pytest.fixture(scope="module")
def reference(model_path: Path) -> LlamaForCausalLM:
    return checkpoint.load_model(checkpoint.open_checkpoint(model_path))


@dataclass
class Trained:
    tuning: PromptTuning
    losses: list[float]
    parts_grads: list[torch.Tensor | None]


@pytest.fixture(scope="module")
def trained(client: DistributedModelForCausalLM) -> Iterator[Trained]:
    """30 Adam steps on one fixed sequence, the client's own parameters frozen meanwhile."""
    flags = [p.requires_grad for p in client.parts.parameters()]
    client.parts.requires_grad_(False)
    client.parts.zero_grad(set_to_none=True)  # an earlier test's backward also reached them
    try:
        tuning = PromptTuning(client, VIRTUAL, seed=0)
        optimizer = torch.optim.Adam(tuning.parameters(), lr=0.1)
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = tuning(SEQUENCE, labels=SEQUENCE).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        grads = [p.grad for p in client.parts.parameters()]
        yield Trained(tuning, losses, grads)
    finally:
        for p, flag in zip(client.parts.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_prompt_gradient_matches_local_model(
    client: DistributedModelForCausalLM, reference: LlamaForCausalLM
) -> None:
    tuning = PromptTuning(client, VIRTUAL, init="random", seed=1)
    input_ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[1, :3] = -100
    out = tuning(input_ids, labels=labels)
    assert out.logits.shape == (2, 6, 128)
    out.loss.backward()

    local_prompt = tuning.prompt.detach().clone().requires_grad_(True)
    hidden = torch.cat([local_prompt.expand(2, -1, -1), reference.parts.embed(input_ids)], dim=1)
    for block in reference.blocks:
        hidden = block(hidden)
    expected = causal_lm_loss(reference.parts.logits(hidden[:, VIRTUAL:]), labels)
    expected.backward()
    assert tuning.prompt.grad is not None and local_prompt.grad is not None
    assert relative_error(out.loss.detach(), expected.detach()) <= TOLERANCE
    assert relative_error(tuning.prompt.grad, local_prompt.grad) <= TOLERANCE
    # Without labels: logits only, the virtual positions dropped.
    with torch.no_grad():
        logits = tuning(input_ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 6, 128)
    assert relative_error(logits, out.logits.detach()) <= TOLERANCE


def test_training_lowers_loss_with_the_model_frozen(trained: Trained) -> None:
    assert trained.losses[-1] <= trained.losses[0] / 2, trained.losses
    assert all(g is None for g in trained.parts_grads)  # only the prompt was trained
    assert [name for name, _ in trained.tuning.named_parameters()] == ["prompt"]


def test_generate_with_the_trained_prompt(client: DistributedModelForCausalLM, trained: Trained) -> None:
    tuning, prefix = trained.tuning, SEQUENCE[:, :4]
    out = tuning.generate(prefix, max_new_tokens=6, eos_token_id=[])
    assert out.shape == (1, 10) and torch.equal(out[:, :4], prefix)
    # Greedy decoding through the KV cache agrees with the full forward pass...
    with torch.no_grad():
        logits = tuning(prefix)
    assert int(out[0, 4]) == int(logits[0, -1].argmax())
    # ...and the trained prompt steers the model toward the sequence it was trained on.
    plain = client.generate(prefix, max_new_tokens=6, eos_token_id=[])
    tuned_hits = int((out[:, 4:] == SEQUENCE[:, 4:]).sum())
    plain_hits = int((plain[:, 4:] == SEQUENCE[:, 4:]).sum())
    assert tuned_hits > plain_hits, (out, plain, SEQUENCE)


def test_batched_generate_and_input_checks(trained: Trained) -> None:
    batch = torch.cat([SEQUENCE[:, :4], SEQUENCE[:, 1:5]])
    out = trained.tuning.generate(batch, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (2, 7) and torch.equal(out[:, :4], batch)
    with pytest.raises(ConfigError, match=r"labels must have the shape of input_ids \[1, 10\], got \[1, 9\]"):
        trained.tuning(SEQUENCE, labels=SEQUENCE[:, 1:])
    with pytest.raises(ConfigError, match="num_virtual_tokens must be >= 1, got 0"):
        PromptTuning(trained.tuning.model, 0)


def test_save_load_round_trip(client: DistributedModelForCausalLM, trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "prompt.safetensors"
    trained.tuning.save(path)
    fresh = PromptTuning(client, VIRTUAL, seed=5)
    assert not torch.equal(fresh.prompt, trained.tuning.prompt)
    fresh.load(path)
    assert torch.equal(fresh.prompt, trained.tuning.prompt)
    with pytest.raises(ConfigError, match=r"\[4, 64\].*needs \[3, 64\]"):
        PromptTuning(client, VIRTUAL - 1).load(path)


# ---- deep prompt tuning: per-block prompts sent with the requests --------------------------


def deep_tuning(client: DistributedModelForCausalLM, seed: int) -> PromptTuning:
    tuning = PromptTuning(client, VIRTUAL, init="random", deep=True, seed=seed)
    assert tuning.deep_prompts is not None and not tuning.deep_prompts.any()  # starts as the shallow tuning
    with torch.no_grad():  # as if trained for a while, so the nodes' additions matter
        tuning.deep_prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return tuning


def test_deep_prompt_gradients_match_local_model(
    client: DistributedModelForCausalLM, reference: LlamaForCausalLM
) -> None:
    tuning = deep_tuning(client, seed=3)
    assert tuning.deep_prompts is not None
    input_ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    out = tuning(input_ids, labels=input_ids)
    out.loss.backward()

    prompt = tuning.prompt.detach().clone().requires_grad_(True)
    deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
    hidden = torch.cat([prompt.expand(2, -1, -1), reference.parts.embed(input_ids)], dim=1)
    for i, block in enumerate(reference.blocks):  # each block's input gets its prompt on the prefix
        hidden = block(torch.cat([hidden[:, :VIRTUAL] + deep[i], hidden[:, VIRTUAL:]], dim=1))
    expected = causal_lm_loss(reference.parts.logits(hidden[:, VIRTUAL:]), input_ids)
    expected.backward()

    assert relative_error(out.loss.detach(), expected.detach()) <= TOLERANCE
    assert tuning.prompt.grad is not None and prompt.grad is not None
    assert tuning.deep_prompts.grad is not None and deep.grad is not None
    assert relative_error(tuning.prompt.grad, prompt.grad) <= TOLERANCE
    assert relative_error(tuning.deep_prompts.grad, deep.grad) <= TOLERANCE
    assert float(deep.grad[-1].norm()) > 0  # the last block's prompt really took part
    shallow = PromptTuning(client, VIRTUAL, init="random", seed=3)
    with torch.no_grad():
        assert relative_error(shallow(input_ids), out.logits.detach()) > 1e-2


def test_deep_prompts_in_generation_and_save_load(
    client: DistributedModelForCausalLM, tmp_path: Path
) -> None:
    tuning = deep_tuning(client, seed=6)
    prefix = SEQUENCE[:, :4]
    out = tuning.generate(prefix, max_new_tokens=5, eos_token_id=[])
    expected = prefix
    with torch.no_grad():  # the KV-cache path (prompts sent with the first step) = full forwards
        for _ in range(5):
            expected = torch.cat([expected, tuning(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == expected.tolist()

    tuning.save(tmp_path / "deep.safetensors")
    fresh = PromptTuning(client, VIRTUAL, deep=True)
    fresh.load(tmp_path / "deep.safetensors")
    assert fresh.deep_prompts is not None and tuning.deep_prompts is not None
    assert torch.equal(fresh.deep_prompts, tuning.deep_prompts)
    with pytest.raises(ConfigError, match="deep_prompts"):
        PromptTuning(client, VIRTUAL).load(tmp_path / "deep.safetensors")
