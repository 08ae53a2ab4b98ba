"""The one-process reference with the swarm's wire rounding (bench/codec_parity.py's instrument)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from swarm import wire
from swarm.models.llama import ClientParts, LlamaBlock
from swarm.node.training import stage_blocks
from swarm.training.data import ByteDataset, DataConfig
from swarm.training.local import next_byte_loss, wire_blocks
from swarm.training.stages import read_config
from swarm.training.trainer import initial_parts
from tests.checkpoints import BYTE_CONFIG


def _model(tmp_path: Path) -> tuple[ClientParts, list[LlamaBlock], torch.Tensor]:
    (tmp_path / "config.json").write_text(json.dumps(BYTE_CONFIG))
    config = read_config(str(tmp_path))
    parts = initial_parts(str(tmp_path), config, 0)
    blocks = stage_blocks(str(tmp_path), config, (0, config.num_hidden_layers), 0)
    tokens = ByteDataset(DataConfig(seq_len=33, max_bytes=1 << 16, seed=0)).batch(0, 4)
    return parts, blocks, tokens


def _grads(
    parts: ClientParts, blocks: list[LlamaBlock], tokens: torch.Tensor, codec: str
) -> tuple[float, torch.Tensor]:
    for p in [*parts.parameters(), *(q for b in blocks for q in b.parameters())]:
        p.grad = None
    trained = blocks if codec == "none" else wire_blocks(blocks, codec, 2)
    loss = next_byte_loss(parts, trained, tokens)
    loss.backward()
    grad = parts.embed_tokens.weight.grad
    assert grad is not None
    return float(loss.detach()), grad.clone()


def test_rounding_sits_at_the_stage_edges_and_the_last_output(tmp_path: Path) -> None:
    _, blocks, _ = _model(tmp_path)
    wrapped = wire_blocks(blocks, "int8", 2)
    assert [(w.before, w.after) for w in wrapped] == [
        (True, False),
        (False, False),
        (True, False),
        (False, True),
    ]
    x = torch.randn(2, 5, int(str(BYTE_CONFIG["hidden_size"])))
    rounded = wire.decode_tensor(wire.encode_tensor(x, "int8"))
    expected = blocks[0](rounded, 0, None)
    assert torch.equal(wrapped[0](x, 0, None), expected)
    assert not torch.equal(expected, blocks[0](x, 0, None))  # int8 does round this input


def test_int8_moves_the_loss_and_gradients_a_little_and_float32_not_at_all(tmp_path: Path) -> None:
    parts, blocks, tokens = _model(tmp_path)
    exact_loss, exact_grad = _grads(parts, blocks, tokens, "none")
    same_loss, same_grad = _grads(parts, blocks, tokens, "none")
    assert (same_loss, torch.equal(same_grad, exact_grad)) == (exact_loss, True)
    int8_loss, int8_grad = _grads(parts, blocks, tokens, "int8")
    assert int8_loss != exact_loss and abs(int8_loss - exact_loss) < 0.01
    # the embedding's gradient came back through the rounded backward of every stage edge
    assert not torch.equal(int8_grad, exact_grad)
    error = float((int8_grad - exact_grad).norm() / exact_grad.norm())
    assert 0 < error < 0.05, error


def test_reversed_sums_take_the_same_micro_batches_and_differ_only_by_rounding(tmp_path: Path) -> None:
    from swarm.training.local import train_locally
    from swarm.training.trainer import TrainerConfig

    (tmp_path / "config.json").write_text(json.dumps(BYTE_CONFIG))
    cfg = TrainerConfig(
        model=str(tmp_path),
        steps=2,
        micro_batch_size=2,
        target_batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        seed=0,
        data=DataConfig(seq_len=33, max_bytes=1 << 16),
    )
    plain = train_locally(cfg)
    reversed_ = train_locally(cfg, reverse_sums=True)
    per_step = 4
    assert (
        [s for _, s, _ in reversed_.losses] == [s for _, s, _ in plain.losses] == [2 * i for i in range(1, 9)]
    )
    first = [loss for _, _, loss in plain.losses[:per_step]]
    # Step 1 runs on the initial weights: the same four losses, in reverse order.
    assert [loss for _, _, loss in reversed_.losses[:per_step]] == first[::-1]
    # Step 2 starts from weights updated by the same gradients summed in another order: the same
    # losses up to float rounding (a wrong or missing micro-batch would move them by far more).
    for (_, _, a), (_, _, b) in zip(reversed_.losses[per_step:][::-1], plain.losses[per_step:], strict=True):
        assert abs(a - b) < 1e-4
