"""Training through remote blocks: the loss backpropagates by Backward RPCs and matches a local run."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swarm import checkpoint
from swarm.client.autograd import run_remote_blocks
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import CausalLMOutput, DistributedModelForCausalLM, causal_lm_loss
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaForCausalLM
from tests.checkpoints import make_checkpoint

TOLERANCE = 1e-4  # relative error, float32 end to end


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "train-llama", "llama", num_layers=8)


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        local.start_node(model_path, "0:4", "--dtype", "float32", name="first")
        local.start_node(model_path, "4:8", "--dtype", "float32", name="second")
        yield local


@pytest.fixture(scope="module")
def client(local_swarm: LocalSwarm, model_path: Path) -> Iterator[DistributedModelForCausalLM]:
    # Lossless on the wire, so gradients can be compared to float rounding; int8 has its own test.
    exact = ClientConfig(training_codec="none")
    with DistributedModelForCausalLM.from_pretrained(
        model_path, local_swarm.initial_peers, client_config=exact
    ) as model:
        yield model


@pytest.fixture(scope="module")
def reference(model_path: Path) -> LlamaForCausalLM:
    return checkpoint.load_model(checkpoint.open_checkpoint(model_path))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def remote_and_local(
    client: DistributedModelForCausalLM,
    reference: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[CausalLMOutput, torch.Tensor]:
    """Backpropagate the same loss through the swarm and through the local model."""
    client.parts.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    out = client(input_ids, labels=labels)
    out.loss.backward()
    expected = causal_lm_loss(reference(input_ids), labels)
    expected.backward()
    return out, expected


def assert_gradients_match(client: DistributedModelForCausalLM, reference: LlamaForCausalLM) -> None:
    remote, local = gradients(client.parts), gradients(reference.parts)
    assert set(remote) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for name, grad in remote.items():
        assert relative_error(grad, local[name]) <= TOLERANCE, name


def test_gradients_match_local_model(
    client: DistributedModelForCausalLM, reference: LlamaForCausalLM
) -> None:
    input_ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    out, expected = remote_and_local(client, reference, input_ids, labels=input_ids)
    assert out.logits.shape == (1, 12, 128)
    assert relative_error(out.loss.detach(), expected.detach()) <= TOLERANCE
    assert_gradients_match(client, reference)


def test_batch_with_ignored_labels(client: DistributedModelForCausalLM, reference: LlamaForCausalLM) -> None:
    input_ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :6] = -100  # e.g. a prompt that is not trained on
    labels[2, 4:] = -100  # e.g. padding
    out, expected = remote_and_local(client, reference, input_ids, labels)
    assert relative_error(out.loss.detach(), expected.detach()) <= TOLERANCE
    assert_gradients_match(client, reference)

    # -100 positions count for nothing: the loss is the mean over the other positions alone.
    kept = labels[:, 1:] != -100
    by_hand = F.cross_entropy(out.logits[:, :-1][kept], labels[:, 1:][kept])
    assert relative_error(out.loss.detach(), by_hand.detach()) <= 1e-6


def test_gradient_reaches_input_hidden_states(
    client: DistributedModelForCausalLM, reference: LlamaForCausalLM
) -> None:
    """What prompt tuning needs: d(loss)/d(hidden states fed to the first remote block)."""
    hidden = torch.randn(2, 5, reference.config.hidden_size, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 5, reference.config.hidden_size, generator=torch.Generator().manual_seed(3))
    remote_in = hidden.clone().requires_grad_(True)
    (run_remote_blocks(remote_in, client.remote_pipeline(randomized=True)) * weights).sum().backward()

    local_in = hidden.clone().requires_grad_(True)
    h = local_in
    for block in reference.blocks:
        h = block(h)
    (h * weights).sum().backward()
    assert remote_in.grad is not None and local_in.grad is not None
    assert relative_error(remote_in.grad, local_in.grad) <= TOLERANCE


def test_logits_without_labels_stay_a_tensor(client: DistributedModelForCausalLM) -> None:
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = client(input_ids)
    assert isinstance(plain, torch.Tensor) and plain.grad_fn is None
    tracked = client(input_ids)  # client parameters require grad: the logits carry a graph
    assert tracked.grad_fn is not None
    assert torch.allclose(plain, tracked.detach())


def test_int8_training_codec_gives_close_gradients(
    local_swarm: LocalSwarm, model_path: Path, reference: LlamaForCausalLM
) -> None:
    """The default training codec: a quarter of the bytes on the wire, gradients nearly unchanged."""
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with DistributedModelForCausalLM.from_pretrained(model_path, local_swarm.initial_peers) as model:
        assert model.client_config.training_codec == "int8"
        out, expected = remote_and_local(model, reference, input_ids, labels=input_ids)
        remote, local = gradients(model.parts), gradients(reference.parts)
    assert relative_error(out.loss.detach(), expected.detach()) < 1e-2
    for name, grad in remote.items():
        error = relative_error(grad, local[name])
        cosine = float(F.cosine_similarity(grad.flatten(), local[name].flatten(), dim=0))
        # Quantized, so not exact; the direction, which is what SGD follows, is nearly the same.
        assert 0 < error < 0.15 and cosine > 0.99, (name, error, cosine)


def test_backward_survives_a_killed_server(
    client: DistributedModelForCausalLM,
    reference: LlamaForCausalLM,
    local_swarm: LocalSwarm,
    model_path: Path,
) -> None:
    """Backward is stateless, so another server of the span answers when the forward's one died.

    Runs last in this module: it kills a node of the shared swarm.
    """
    spare = local_swarm.start_node(model_path, "4:8", "--dtype", "float32", name="spare")
    await_server(client, spare.info["peer_id"])
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    client.parts.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    pipeline = client.remote_pipeline(randomized=True)
    hidden = run_remote_blocks(client.parts.embed(input_ids), pipeline)
    loss = causal_lm_loss(client.parts.logits(hidden), input_ids)
    victim = pipeline.route[-1].peer_id
    local_swarm.stop(
        next(p for p in local_swarm.processes if p.info.get("peer_id") == victim), signal.SIGKILL
    )
    loss.backward()

    assert pipeline.route[-1].peer_id != victim
    causal_lm_loss(reference(input_ids), input_ids).backward()
    assert_gradients_match(client, reference)


def await_server(client: DistributedModelForCausalLM, peer_id: str, timeout: float = 60.0) -> None:
    """Poll the DHT (each poll is a real lookup, not a sleep) until the client sees `peer_id`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = run_sync(client.swarm_map.get(refresh=True))
        if peer_id in {s.peer_id for s in snapshot.online()}:
            return
    raise AssertionError(f"{peer_id} did not appear in the swarm map within {timeout} s")
