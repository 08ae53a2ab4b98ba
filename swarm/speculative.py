"""Speculative decoding: cheap drafts of the next tokens, and the rule that accepts them.

A drafter guesses up to k next tokens; the real model then scores the last accepted token and
all k drafts in ONE step (through the swarm: one round trip for up to k + 1 tokens), and the
acceptance rule keeps the longest prefix of drafts the model agrees with, plus one token of
the model's own. Greedy: a draft is kept iff it is the model's argmax, so the output is the
greedy output, token for token. Sampling: the standard rule (accept draft x with probability
min(1, p(x) / q(x)), on rejection draw from max(0, p - q) normalised), so every token has
exactly the distribution plain sampling gives it.

Two drafters: `PromptLookup` copies what followed the latest earlier occurrence of the
context's last n-gram (no second model: pays off on text that repeats itself), and
`ModelDrafter` runs a small local model with the same vocabulary.

The acceptance rules and the draft-length policy are pure functions of tensors, tested
without a network; the decoding loop is in swarm/client/speculative.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from swarm import checkpoint
from swarm.errors import ConfigError
from swarm.generation import Decoder, SamplingConfig, select_next_token, token_probs
from swarm.models.llama import LayerCache, LlamaForCausalLM

Speculative = Literal["off", "lookup", "model"]
SPECULATIVE_MODES: tuple[str, ...] = ("off", "lookup", "model")
DEFAULT_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """How generate() drafts: `mode` off | lookup (n-grams of the context) | model (`draft_model`)."""

    mode: Speculative = "off"
    draft_model: str | None = None  # checkpoint directory of the draft model (mode "model")
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # most drafts verified in one step
    # lookup: match the context's last n tokens, n from ngram_max down to ngram_min. A single
    # token matches by chance too often on text that does not repeat (each miss costs compute).
    ngram_max: int = 3
    ngram_min: int = 2

    def __post_init__(self) -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise ConfigError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {self.mode!r}")
        if (self.mode == "model") != (self.draft_model is not None):
            raise ConfigError(
                "speculative 'model' needs a draft model (--draft-model DIR), and a draft model needs "
                f"speculative 'model'; got speculative {self.mode!r}, draft model {self.draft_model!r}"
            )
        if not 1 <= self.draft_tokens <= 64:
            raise ConfigError(f"draft_tokens must be in [1, 64], got {self.draft_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


@dataclass
class SpeculationStats:
    """What a speculative generation did: acceptance = accepted / drafted."""

    steps: int = 0  # verification steps (round trips through the swarm), the prompt's excluded
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # of those, kept
    tokens: int = 0  # tokens generated, the prompt's first token included

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def __str__(self) -> str:
        return (
            f"{self.tokens} tokens in {self.steps + 1} steps; {self.accepted} of {self.drafted} "
            f"drafts accepted ({100 * self.acceptance:.0f}%)"
        )


class Drafter(Protocol):
    costly: bool  # drafting costs compute (a model), so a drafter that keeps missing should pause

    def draft(self, context: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """Up to k guesses [batch, d] (d <= k, maybe 0) of the tokens after `context` [batch, length],
        and their draft probabilities [batch, d, vocab] (None: the drafts are certain, q one-hot)."""
        ...

    def rollback(self, valid: int) -> None:
        """Only the first `valid` tokens of what was drafted from are still the context."""
        ...


# ---- prompt lookup -----------------------------------------------------------------------------


def lookup_draft(tokens: Tensor, k: int, ngram_max: int, ngram_min: int) -> Tensor:
    """Draft up to k tokens [d] for the 1-D context `tokens` (see `NgramIndex`)."""
    index = NgramIndex(ngram_max, ngram_min)
    return torch.tensor(index.draft(tokens.tolist(), k), dtype=tokens.dtype)


class NgramIndex:
    """Where each n-gram of one sequence last occurred, kept up to date as the sequence grows, so
    a lookup costs O(n + k), not a scan of the context.

    `draft` finds the latest earlier occurrence of the context's last n tokens (longest n first)
    and copies what followed it. The copy may run into the tokens it is drafting (text that
    loops with a period shorter than k), as copying on would continue.
    """

    def __init__(self, ngram_max: int, ngram_min: int) -> None:
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.indexed = 0  # n-grams ending before this index are in `after`

    def draft(self, tokens: list[int], k: int) -> list[int]:
        length = len(tokens)
        for end in range(self.indexed, length - 1):  # n-grams ending at `end`, followed by a token
            for n in self.sizes:
                if end + 1 >= n:
                    self.after[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, length - 1)
        for n in self.sizes:
            source = self.after.get(tuple(tokens[length - n :])) if length > n else None
            if source is not None:
                extended = tokens + [0] * k
                for j in range(k):
                    extended[length + j] = extended[source + j]
                return extended[length:]
        return []


class PromptLookup:
    """Drafts copied from the context itself (n-gram lookup); no model. The context only grows
    between calls (it holds accepted tokens only), so each row's index is updated, not rebuilt."""

    costly = False

    def __init__(self, config: SpeculativeConfig) -> None:
        self.ngram_max, self.ngram_min = config.ngram_max, config.ngram_min
        self.rows: list[NgramIndex] = []

    def draft(self, context: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        if len(self.rows) != context.shape[0]:
            self.rows = [NgramIndex(self.ngram_max, self.ngram_min) for _ in range(context.shape[0])]
        drafts = [index.draft(row, k) for index, row in zip(self.rows, context.tolist(), strict=True)]
        d = min(len(r) for r in drafts)  # one step verifies the same number of tokens in every row
        return torch.tensor([r[:d] for r in drafts], dtype=context.dtype).view(len(drafts), d), None

    def rollback(self, valid: int) -> None:
        pass


# ---- a draft model -----------------------------------------------------------------------------


def load_draft_model(
    path: str | Path, vocab_size: int, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A whole small model in this process, checked to share the target's vocabulary."""
    ckpt = checkpoint.open_checkpoint(path)
    if ckpt.config.vocab_size != vocab_size:
        raise ConfigError(
            f"draft model {path} has a vocabulary of {ckpt.config.vocab_size} tokens, the model "
            f"{vocab_size}: a draft model must share the model's tokenizer"
        )
    return checkpoint.load_model(ckpt, dtype=dtype).eval()


class ModelDrafter:
    """Drafts from a small local model with its own KV cache, which follows the context lazily:
    each draft call feeds the context tokens it has not seen, then k - 1 of its own guesses."""

    costly = True

    def __init__(
        self,
        model: LlamaForCausalLM,
        batch_size: int,
        max_length: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.sampling, self.generator = model, sampling, generator
        self.caches: list[LayerCache] = model.new_caches(batch_size, max_length)
        self.fed = 0  # tokens in the caches

    @torch.inference_mode()
    def draft(self, context: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        device = self.model.parts.norm.weight.device
        logits = self._last_logits(context[:, self.fed :].to(device))
        drafts, probs = [], []
        for j in range(k):
            if self.sampling.do_sample:
                q = token_probs(logits, self.sampling)
                token = torch.multinomial(q, 1, generator=self.generator).squeeze(-1)
                probs.append(q)
            else:
                token = logits.argmax(dim=-1)
            drafts.append(token)
            if j + 1 < k:  # the last guess need not be fed: the next call or a rollback decides
                logits = self._last_logits(token[:, None])
        if not drafts:
            return context[:, :0], None
        return torch.stack(drafts, 1).cpu(), torch.stack(probs, 1).cpu() if probs else None

    def _last_logits(self, ids: Tensor) -> Tensor:
        """Feed ids [batch, t] after the cached tokens; logits [batch, vocab] of the last one only
        (the head over every fed position would cost a prompt's worth of vocabulary projections)."""
        hidden = self.model.parts.embed(ids)
        for block, cache in zip(self.model.blocks, self.caches, strict=True):
            hidden = block(hidden, self.fed, cache)
        self.fed += ids.shape[1]
        return self.model.parts.logits(hidden[:, -1:])[:, -1]

    def rollback(self, valid: int) -> None:
        if valid < self.fed:
            for cache in self.caches:
                cache.truncate(valid)
            self.fed = valid


# ---- acceptance --------------------------------------------------------------------------------


def accept_greedy(logits: Tensor, drafts: Tensor, active: Tensor) -> Tensor:
    """The tokens greedy decoding picks [batch, n + 1], given the model's logits [batch, d + 1, vocab]
    for the last accepted token and the d drafts [batch, d]: the drafts up to the first one that
    differs from the argmax (in any still active row, [batch] bool), then the argmax after them."""
    best = logits.argmax(dim=-1)  # [batch, d + 1]
    d = drafts.shape[1]
    agree = (best[:, :d] == drafts) | ~active[:, None]  # finished rows emit padding anyway
    n = int(agree.long().cumprod(dim=1).sum(dim=1).min()) if d else 0
    return best[:, : n + 1]


def accept_sampled(
    logits: Tensor,
    drafts: Tensor,
    draft_probs: Tensor | None,
    cfg: SamplingConfig,
    active: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Speculative sampling's acceptance rule, with the same outputs as `accept_greedy`.

    Draft x at step j is kept with probability min(1, p_j(x) / q_j(x)) (q one-hot for certain
    drafts: probability p_j(x)); the first rejected step draws from max(0, p_j - q_j), normalised;
    if all d are kept, one more token comes from p_d. Every row stops at the same n (the fewest
    kept in an active row): a row that kept more keeps its draft at n, which is distributed
    as p_n already, and drops the rest.
    """
    batch, d = drafts.shape
    p = token_probs(logits.flatten(0, 1), cfg).view(batch, d + 1, -1)  # [batch, d + 1, vocab]
    if d == 0:
        return torch.multinomial(p[:, 0], 1, generator=generator)
    q = (
        draft_probs
        if draft_probs is not None
        else torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype)
    )
    p_x = p[:, :d].gather(-1, drafts[..., None]).squeeze(-1)  # [batch, d]
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(batch, d, generator=generator)
    kept = (u * q_x < p_x) | ~active[:, None]  # u < p/q without dividing by a zero q
    runs = kept.long().cumprod(dim=1).sum(dim=1)  # drafts kept per row
    n = int(runs.min())
    out = drafts[:, : n + 1].clone() if n < d else torch.empty(batch, d + 1, dtype=drafts.dtype)
    if n == d:
        out[:, :d] = drafts
        out[:, d] = torch.multinomial(p[:, d], 1, generator=generator).squeeze(-1)
        return out
    rejected = runs == n  # these rows draw their token n from the residual
    residual = (p[:, n] - q[:, n]).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, n])
    drawn = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    out[:, n] = torch.where(rejected, drawn, drafts[:, n])
    return out


MAX_BACKOFF = 16  # steps a costly drafter sits out at most after drafts that were all wrong


@dataclass(frozen=True)
class DraftBudget:
    """How many tokens to draft in the next step: `k`, unless `skip` more steps go without drafts.

    More after a step that kept every draft, as many as were kept plus one after a miss. A costly
    drafter (a draft model: compute per draft) whose drafts were all wrong sits out 1, 2, 4, ...
    up to MAX_BACKOFF steps before it tries again, so on text it cannot predict it costs a few
    percent; each kept draft halves the back-off. A free drafter (lookup) never sits out.
    """

    k: int
    skip: int = 0
    backoff: int = 0

    @property
    def now(self) -> int:
        return 0 if self.skip else self.k

    def after(self, drafted: int, accepted: int, limit: int, costly: bool) -> DraftBudget:
        if drafted == 0:  # nothing to judge by (no lookup match, or a skipped step)
            return DraftBudget(self.k, max(0, self.skip - 1), self.backoff)
        # A kept draft halves the back-off rather than clearing it: a drafter right 1 time in 20
        # would otherwise be back to drafting every step after each lucky guess.
        if accepted == drafted:
            return DraftBudget(min(limit, self.k + 2), 0, self.backoff // 2)
        if accepted or not costly:
            return DraftBudget(max(1, accepted + 1), 0, self.backoff // 2)
        backoff = min(MAX_BACKOFF, max(1, 2 * self.backoff))
        return DraftBudget(1, backoff, backoff)


# ---- the decoding loop -------------------------------------------------------------------------


class Verifier(Protocol):
    """The model that has the last word: the swarm (swarm.client.speculative) or a local model."""

    @property
    def position(self) -> int:
        """Tokens its KV caches hold."""
        ...

    async def logits(self, ids: Tensor) -> Tensor:
        """Feed ids [batch, t] at `position`; logits [batch, t, vocab] of every fed position."""
        ...

    def rollback(self, keep: int) -> None:
        """Forget the cached tokens from position `keep` on."""
        ...


async def speculative_decode(
    verifier: Verifier,
    input_ids: Tensor,
    cfg: SamplingConfig,
    drafter: Drafter,
    draft_tokens: int,
    on_tokens: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, SpeculationStats]:
    """Generate like `generate_tokens`, verifying up to `draft_tokens` drafts per step.

    Each step feeds the last chosen token and the drafts; the verifier's logits decide how many
    drafts stay, the rest are rolled back (the verifier's caches and the drafter's), and every
    kept token goes to the decoder (EOS and max_new_tokens apply as usual).
    """
    decoder = Decoder(input_ids, cfg)
    stats = SpeculationStats()
    last = await verifier.logits(input_ids)
    token = _push(decoder, select_next_token(last[:, -1], cfg, decoder.generator), on_tokens)
    stats.tokens = 1
    budget = DraftBudget(draft_tokens)
    while not decoder.done:
        context = decoder.out
        # never draft past max_new_tokens: the step's own token comes on top of the drafts
        room = min(budget.now, decoder.remaining - 1)
        drafts, draft_probs = drafter.draft(context, room) if room > 0 else (context[:, :0], None)
        d = drafts.shape[1]
        held = verifier.position
        logits = await verifier.logits(torch.cat([context[:, -1:], drafts], dim=1) if d else context[:, -1:])
        with torch.inference_mode():
            if d == 0:  # a plain step, as without speculation
                tokens = select_next_token(logits[:, -1], cfg, decoder.generator)[:, None]
            elif cfg.do_sample:
                tokens = accept_sampled(
                    logits, drafts, draft_probs, cfg, ~decoder.finished, decoder.generator
                )
            else:
                tokens = accept_greedy(logits, drafts, ~decoder.finished)
        n = tokens.shape[1] - 1
        if n < d:
            verifier.rollback(held + 1 + n)
            drafter.rollback(context.shape[1] + n)
        stats.steps, stats.drafted, stats.accepted = stats.steps + 1, stats.drafted + d, stats.accepted + n
        budget = budget.after(d, n, draft_tokens, drafter.costly)
        for token in tokens.unbind(dim=1):
            _push(decoder, token, on_tokens)
            stats.tokens += 1
            if decoder.done:
                break
    return decoder.out, stats


def _push(decoder: Decoder, token: Tensor, on_tokens: Callable[[Tensor], None] | None) -> Tensor:
    token = decoder.push(token)
    if on_tokens is not None:
        on_tokens(token)
    return token


class LocalVerifier:
    """A whole model in this process as the verifier (tests, and the one-process comparison)."""

    def __init__(self, model: LlamaForCausalLM, batch_size: int, max_length: int) -> None:
        self.model = model
        self.caches = model.new_caches(batch_size, max_length)
        self.position = 0

    async def logits(self, ids: Tensor) -> Tensor:
        with torch.inference_mode():
            out = self.model(ids, self.position, self.caches)
        self.position += ids.shape[1]
        return out

    def rollback(self, keep: int) -> None:
        for cache in self.caches:
            cache.truncate(keep)
        self.position = keep
