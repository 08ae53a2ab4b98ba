"""Token selection and the decoding loop, shared by the local model and the swarm client.

The loop is written once against a `step` callable (new token ids + their start position
-> logits of the last position), so local and distributed generation cannot drift apart:
the demo's local baseline and the client decode through exactly this code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swarm.errors import ConfigError

# step(new_ids [batch, new_tokens], start) -> logits [batch, vocab] for the last new token
StepFn = Callable[[torch.Tensor, int], torch.Tensor]
# on_tokens(tokens [batch]) is called after each decoding step (streaming)
TokenCallback = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token; defaults match transformers' `generate`."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def select_next_token(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch] (greedy, or sampled with temperature/top-k/top-p)."""
    if not cfg.do_sample:
        return logits.float().argmax(dim=-1)
    probs = token_probs(logits, cfg)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [batch, vocab] -> the distribution sampling draws from [batch, vocab] (temperature,
    top-k, top-p applied); speculative sampling's acceptance rule compares these."""
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


class Decoder:
    """The state of one decoding loop, driven by a sync (`generate_tokens`) or async loop alike.

    The output buffer is allocated once for the whole generation: a token costs no allocation here.
    Like transformers, a sequence that produced an EOS token is padded afterwards, and decoding
    is `done` once every sequence has finished.
    """

    def __init__(self, input_ids: torch.Tensor, cfg: SamplingConfig) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ConfigError(f"input_ids must be [batch, length>0], got shape {list(input_ids.shape)}")
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        self.eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long)
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0]
        batch, prompt = input_ids.shape
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self._out = torch.empty(batch, prompt + cfg.max_new_tokens, dtype=input_ids.dtype)
        self._out[:, :prompt] = input_ids
        self.prompt_length = prompt
        self.length = prompt  # tokens in `out` so far
        self.new_ids = input_ids  # what the next step feeds
        self.position = 0  # where new_ids start
        self._all_finished = False

    @property
    def out(self) -> torch.Tensor:
        """Prompt + the tokens so far [batch, total]."""
        return self._out[:, : self.length]

    @property
    def done(self) -> bool:
        return self._all_finished or self.length >= self._out.shape[1]

    def rewind(self, length: int) -> int:
        """Forget the tokens from index `length` on (never the prompt) and feed everything kept again
        from position 0, as into a fresh session; returns the length kept."""
        keep = max(self.prompt_length, min(length, self.length))
        self.length = keep
        self.new_ids = self._out[:, :keep]
        self.position = 0
        if self.eos.numel():
            self.finished = torch.isin(self._out[:, self.prompt_length : keep], self.eos).any(dim=1)
            self._all_finished = bool(self.finished.all())
        return keep

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        """Take the step's logits [batch, vocab] for the last fed token; return the chosen tokens [batch]."""
        self.position += self.new_ids.shape[1]
        token = self.push(select_next_token(logits, self.cfg, self.generator))
        self.new_ids = self._out[:, self.length - 1 : self.length]
        return token

    @property
    def remaining(self) -> int:
        """Tokens still to generate at most."""
        return self._out.shape[1] - self.length

    def push(self, token: torch.Tensor) -> torch.Tensor:
        """Append chosen tokens [batch] (padding in finished sequences); return what was appended.

        Speculative decoding pushes several tokens per step; `new_ids`/`position` are `advance`'s."""
        if self.eos.numel():
            token = torch.where(self.finished, torch.full_like(token, self.pad), token)
        self._out[:, self.length] = token
        self.length += 1
        if self.eos.numel():
            self.finished |= torch.isin(token, self.eos)
            self._all_finished = bool(self.finished.all())
        return token


def generate_tokens(
    step: StepFn,
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    on_tokens: TokenCallback | None = None,
) -> torch.Tensor:
    """Decode up to `cfg.max_new_tokens` tokens; returns prompt + new tokens [batch, total]."""
    decoder = Decoder(input_ids, cfg)
    while not decoder.done:
        token = decoder.advance(step(decoder.new_ids, decoder.position))
        if on_tokens is not None:
            on_tokens(token)
    return decoder.out


def eos_ids(values: Sequence[int] | int | None) -> tuple[int, ...]:
    """Normalise an eos_token_id setting (int, list or None) to a tuple."""
    if values is None:
        return ()
    if isinstance(values, int):
        return (values,)
    return tuple(int(v) for v in values)
