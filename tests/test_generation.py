from __future__ import annotations

import pytest
import torch

from swarm.errors import ConfigError
from swarm.generation import SamplingConfig, generate_tokens, select_next_token


def test_greedy_picks_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert select_next_token(logits, SamplingConfig()).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = select_next_token(logits, SamplingConfig(do_sample=True, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    nucleus = select_next_token(logits, SamplingConfig(do_sample=True, top_k=0, top_p=0.8), gen)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is cut
    full = select_next_token(logits, SamplingConfig(do_sample=True, top_k=0), gen)
    share = (full == 0).float().mean().item()
    assert set(full.tolist()) == {0, 1, 2, 3} and 0.45 < share < 0.55


def test_sampling_is_reproducible_with_a_seed() -> None:
    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        return torch.zeros(ids.shape[0], 50)

    cfg = SamplingConfig(max_new_tokens=8, do_sample=True, seed=3)
    prompt = torch.tensor([[1, 2]])
    assert torch.equal(generate_tokens(step, prompt, cfg), generate_tokens(step, prompt, cfg))


def test_eos_stops_and_pads_finished_sequences() -> None:
    script = iter([[5, 2], [2, 6], [7, 7], [8, 8]])  # seq 1 ends at step 1, seq 0 at step 2

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        tokens = next(script)
        return torch.nn.functional.one_hot(torch.tensor(tokens), 10).float()

    seen: list[torch.Tensor] = []
    out = generate_tokens(
        step, torch.tensor([[1], [1]]), SamplingConfig(max_new_tokens=4, eos_token_ids=(2,)), seen.append
    )
    assert out.tolist() == [[1, 5, 2], [1, 2, 2]]  # stopped after both finished; seq 1 padded with eos
    assert len(seen) == 2


def test_positions_advance_by_the_tokens_fed() -> None:
    starts: list[tuple[int, int]] = []

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        starts.append((start, ids.shape[1]))
        return torch.zeros(1, 4)

    generate_tokens(step, torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=3))
    assert starts == [(0, 3), (3, 1), (4, 1)]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_new_tokens": -1}, "-1"),
        ({"do_sample": True, "temperature": 0.0}, "0.0"),
        ({"top_p": 1.5}, "1.5"),
    ],
)
def test_invalid_sampling_config_shows_the_number(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]
