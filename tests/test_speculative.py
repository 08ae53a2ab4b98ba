"""Speculative decoding without a network: drafters, acceptance rules, and the loop against a local model.

The models are tiny random Mistral-style checkpoints with a sliding window of 2 tokens (8 blocks:
each prediction sees only the last 9 tokens, and RoPE is relative), so when a prompt repeats a
passage of the model's own greedy output, greedy continues the passage: text with repetition
whose drafts get accepted, without a trained model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from swarm import checkpoint
from swarm.cli import GenerateConfig
from swarm.errors import ConfigError
from swarm.generation import SamplingConfig, generate_tokens, token_probs
from swarm.models.llama import LlamaForCausalLM
from swarm.speculative import (
    DEFAULT_DRAFT_TOKENS,
    DraftBudget,
    LocalVerifier,
    ModelDrafter,
    PromptLookup,
    SpeculativeConfig,
    accept_greedy,
    accept_sampled,
    lookup_draft,
    speculative_decode,
)
from tests.checkpoints import make_checkpoint

SEED = [5, 9, 31, 77, 2]


def windowed_checkpoint(path: Path, seed: int = 0, num_layers: int = 8) -> Path:
    return make_checkpoint(
        path, "mistral", num_layers=num_layers, sliding_window=2, eos_token_id=[], seed=seed
    )


def greedy(model: LlamaForCausalLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    caches = model.new_caches(prompt.shape[0], prompt.shape[1] + n)
    with torch.inference_mode():
        return generate_tokens(
            lambda ids, start: model(ids, start, caches)[:, -1], prompt, SamplingConfig(max_new_tokens=n)
        )


def repetitive_prompt(model: LlamaForCausalLM) -> torch.Tensor:
    """The model's greedy text, then a stretch of it again: greedy goes on copying the passage."""
    text = greedy(model, torch.tensor([SEED]), 40)
    return torch.cat([text, text[:, 10:30]], dim=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    path = windowed_checkpoint(tmp_path_factory.mktemp("spec") / "windowed")
    return checkpoint.load_model(checkpoint.open_checkpoint(path))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    """Same vocabulary, other weights and depth: a draft model that is often wrong."""
    path = windowed_checkpoint(tmp_path_factory.mktemp("spec") / "draft", seed=7, num_layers=2)
    return checkpoint.load_model(checkpoint.open_checkpoint(path))


# ---- drafters ----------------------------------------------------------------------------------


def test_lookup_copies_what_followed_the_latest_occurrence() -> None:
    tokens = torch.tensor([1, 2, 3, 9, 1, 2, 3, 4, 5, 0, 2, 3])
    # "2 3" occurred twice before; the latest was followed by 4 5 0 ...
    assert lookup_draft(tokens, 3, ngram_max=2, ngram_min=2).tolist() == [4, 5, 0]
    # the longest n-gram wins: "0 2 3" never occurred before, "2 3" did
    assert lookup_draft(tokens, 2, ngram_max=3, ngram_min=1).tolist() == [4, 5]


def test_lookup_continues_a_loop_past_the_end_of_the_context() -> None:
    tokens = torch.tensor([8, 6, 7, 6, 7, 6, 7])
    assert lookup_draft(tokens, 5, ngram_max=2, ngram_min=2).tolist() == [6, 7, 6, 7, 6]


def test_lookup_without_a_match_drafts_nothing() -> None:
    tokens = torch.tensor([1, 2, 3, 4, 5, 6])
    assert lookup_draft(tokens, 4, ngram_max=3, ngram_min=2).numel() == 0
    drafts, probs = PromptLookup(SpeculativeConfig("lookup")).draft(tokens[None], 4)
    assert drafts.shape == (1, 0) and probs is None


def test_model_drafter_rolls_back_to_the_accepted_context(model: LlamaForCausalLM) -> None:
    drafter = ModelDrafter(model, 1, 64, SamplingConfig(max_new_tokens=32))
    context = torch.tensor([SEED])
    first, _ = drafter.draft(context, 4)
    assert drafter.fed == len(SEED) + 3  # the context and all but the last guess
    expected = greedy(model, context, 4)[:, len(SEED) :]
    assert first.tolist() == expected.tolist()  # the draft model's greedy guesses
    drafter.rollback(len(SEED) + 1)  # one guess kept
    assert drafter.fed == len(SEED) + 1 and all(c.length == len(SEED) + 1 for c in drafter.caches)


# ---- acceptance --------------------------------------------------------------------------------


def one_hot_logits(best: list[list[int]], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(best), vocab).float() * 10


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_adds_the_models_token() -> None:
    logits = one_hot_logits([[3, 4, 5, 1]])  # the model's argmax after each fed token
    active = torch.tensor([True])
    assert accept_greedy(logits, torch.tensor([[3, 4, 0]]), active).tolist() == [[3, 4, 5]]
    assert accept_greedy(logits, torch.tensor([[3, 4, 5]]), active).tolist() == [[3, 4, 5, 1]]
    assert accept_greedy(logits, torch.tensor([[2, 4, 5]]), active).tolist() == [[3]]
    # rows stop together at the fewest accepted, unless a row has finished
    two = torch.cat([logits, one_hot_logits([[3, 0, 5, 1]])])
    drafts = torch.tensor([[3, 4, 5], [3, 4, 5]])
    assert accept_greedy(two, drafts, torch.tensor([True, True])).tolist() == [[3, 4], [3, 0]]
    assert accept_greedy(two, drafts, torch.tensor([True, False])).shape == (2, 4)


@pytest.mark.parametrize("draft_model", [False, True], ids=["certain-drafts", "draft-distribution"])
def test_speculative_sampling_keeps_the_models_distribution(draft_model: bool) -> None:
    """The first token is distributed as p_0, and the second, given that the first is the draft, as
    p_1: exactly what plain sampling gives (a rule that kept every draft would give q, or the draft)."""
    cfg = SamplingConfig(max_new_tokens=2, do_sample=True, top_k=0)
    logits = torch.tensor([[[0.2, 2.5, -0.5, 0.7], [0.1, 1.5, 0.3, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    p = token_probs(logits[0], cfg)
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    generator = torch.Generator().manual_seed(0)

    def drafts(rows: int) -> torch.Tensor:
        if not draft_model:
            return torch.ones(rows, 2, dtype=torch.long)
        return torch.multinomial(q, rows, replacement=True, generator=generator).T

    # First token: one call, 40k independent rows (every row emits its first token by the rule).
    rows = 40_000
    first = accept_sampled(
        logits.expand(rows, -1, -1),
        drafts(rows),
        q.expand(rows, -1, -1) if draft_model else None,
        cfg,
        torch.ones(rows, dtype=torch.bool),
        generator,
    )[:, 0]
    assert (torch.bincount(first, minlength=4) / rows - p[0]).abs().max() < 0.015  # 6 standard errors
    # Second token, given the first was the draft: one row per call (rows of a call stop together).
    counts, kept = torch.zeros(4), 0
    for _ in range(1500):
        d = drafts(1)
        out = accept_sampled(
            logits, d, q[None] if draft_model else None, cfg, torch.tensor([True]), generator
        )[0]
        if out.numel() > 1:
            counts[out[1]] += 1
            kept += 1
    assert kept > 300
    assert (counts / kept - p[1]).abs().max() < 5 * 0.5 / kept**0.5


def test_draft_length_grows_on_success_and_shrinks_on_a_miss() -> None:
    b = DraftBudget(4)
    assert b.after(4, 4, limit=8, costly=False).now == 6
    assert DraftBudget(8).after(8, 8, limit=8, costly=False).now == 8
    assert DraftBudget(8).after(8, 2, limit=8, costly=True).now == 3
    assert DraftBudget(8).after(8, 0, limit=8, costly=False).now == 1  # lookup: free, never pauses
    assert b.after(0, 0, limit=8, costly=True) == b  # no draft: nothing learnt


def test_a_costly_drafter_that_keeps_missing_pauses_longer_each_time() -> None:
    b, pauses = DraftBudget(8), []
    for _ in range(6):
        b = b.after(b.now, 0, limit=8, costly=True)  # a probe, all wrong
        pauses.append(b.skip)
        while b.now == 0:
            b = b.after(0, 0, limit=8, costly=True)
    assert pauses == [1, 2, 4, 8, 16, 16]
    assert b.after(1, 1, limit=8, costly=True) == DraftBudget(3, 0, 8)  # a kept draft halves the back-off
    assert DraftBudget(3, 0, 1).after(3, 3, limit=8, costly=True) == DraftBudget(5)


def test_config_errors_show_the_values() -> None:
    with pytest.raises(ConfigError, match="got 'fast'"):
        SpeculativeConfig("fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="draft model None"):
        SpeculativeConfig("model")
    with pytest.raises(ConfigError, match=r"\[1, 64\], got 0"):
        SpeculativeConfig("lookup", draft_tokens=0)
    assert GenerateConfig("m", ("p",), prompt_ids=(1,)).draft_tokens == DEFAULT_DRAFT_TOKENS


# ---- the loop, against a local verifier ---------------------------------------------------------


def decode(model: LlamaForCausalLM, prompt: torch.Tensor, n: int, drafter: object, k: int) -> tuple:
    verifier = LocalVerifier(model, prompt.shape[0], prompt.shape[1] + n)
    return asyncio.run(speculative_decode(verifier, prompt, SamplingConfig(max_new_tokens=n), drafter, k))  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_lookup_gives_the_greedy_tokens_and_accepts_drafts_on_repetition(
    model: LlamaForCausalLM, k: int
) -> None:
    prompt, n = repetitive_prompt(model), 24
    expected = greedy(model, prompt, n)
    out, stats = decode(model, prompt, n, PromptLookup(SpeculativeConfig("lookup")), k)
    assert out.tolist() == expected.tolist()
    assert stats.accepted >= 6, stats  # the repeated passage (15 tokens) was drafted and kept
    assert stats.steps <= n - 1 - stats.accepted and stats.tokens == n


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_model_gives_the_greedy_tokens(
    model: LlamaForCausalLM, other_model: LlamaForCausalLM, k: int
) -> None:
    prompt, n = torch.tensor([SEED, [7, 3, 3, 101, 64]]), 20
    expected = greedy(model, prompt, n)
    for draft, accepted_all in ((model, True), (other_model, False)):
        drafter = ModelDrafter(draft, 2, prompt.shape[1] + n, SamplingConfig(max_new_tokens=n))
        out, stats = decode(model, prompt, n, drafter, k)
        assert out.tolist() == expected.tolist()
        assert (stats.accepted == stats.drafted > 0) == accepted_all, stats


def test_sampling_runs_through_the_loop_with_both_drafters(
    model: LlamaForCausalLM, other_model: LlamaForCausalLM
) -> None:
    """Shapes and bookkeeping of the sampled path (its distribution is tested above)."""
    prompt, n = repetitive_prompt(model), 16
    # a low temperature: sampling mostly follows the copied passage, so lookup finds drafts
    cfg = SamplingConfig(max_new_tokens=n, do_sample=True, temperature=0.2, top_k=20, seed=3)
    drafters = [
        PromptLookup(SpeculativeConfig("lookup")),
        ModelDrafter(other_model, 1, prompt.shape[1] + n, cfg, torch.Generator().manual_seed(4)),
    ]
    for drafter in drafters:
        verifier = LocalVerifier(model, 1, prompt.shape[1] + n)
        out, stats = asyncio.run(speculative_decode(verifier, prompt, cfg, drafter, 4))  # type: ignore[arg-type]
        assert out.shape == (1, prompt.shape[1] + n) and out[:, : prompt.shape[1]].equal(prompt)
        assert stats.tokens == n and stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
        assert verifier.position <= prompt.shape[1] + n - 1  # rejected drafts were rolled back
