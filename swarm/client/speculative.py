"""Speculative decoding through the swarm: the session verifies a step's drafts in one round trip.

The drafting, acceptance and loop are swarm.speculative's; here the swarm is the verifier. A
step of 1 + d tokens goes through every hop like any step (failover included: a replacement
replays the accepted tokens only, as rejected ones are cut from each hop's stored inputs), and
rejected drafts are dropped from the nodes' KV caches by the next step's `keep`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from swarm.client.session import InferenceSession
from swarm.generation import SamplingConfig
from swarm.models.llama import ClientParts, LlamaForCausalLM
from swarm.speculative import (
    Drafter,
    ModelDrafter,
    PromptLookup,
    SpeculationStats,
    SpeculativeConfig,
    speculative_decode,
)


class SessionVerifier:
    """An inference session plus the local embeddings and head: token ids in, logits out."""

    def __init__(self, session: InferenceSession, parts: ClientParts) -> None:
        self.session, self.parts = session, parts

    @property
    def position(self) -> int:
        return self.session.position

    async def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.parts.embed(ids)
        out = await self.session.step(hidden)
        with torch.inference_mode():  # nodes answer in their own compute dtype; the head runs in ours
            return self.parts.logits(out.to(hidden.dtype))

    def rollback(self, keep: int) -> None:
        self.session.rollback(keep)


def make_drafter(
    config: SpeculativeConfig,
    draft_model: LlamaForCausalLM | None,
    batch_size: int,
    max_length: int,
    sampling: SamplingConfig,
) -> Drafter:
    if config.mode == "lookup":
        return PromptLookup(config)
    if draft_model is None:
        raise ValueError("speculative 'model' needs a loaded draft model")
    # The draft model's own generator: its draws must not shift the verifier's random stream.
    generator = torch.Generator().manual_seed(sampling.seed + 1) if sampling.seed is not None else None
    return ModelDrafter(draft_model, batch_size, max_length, sampling, generator)


async def decode_in_session(
    session: InferenceSession,
    parts: ClientParts,
    input_ids: torch.Tensor,
    sampling: SamplingConfig,
    config: SpeculativeConfig,
    draft_model: LlamaForCausalLM | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, SpeculationStats]:
    """Speculative generation in an open session (sized for prompt + max_new_tokens); run it on
    the client's loop (swarm.client.loop.run_sync)."""
    max_length = input_ids.shape[1] + sampling.max_new_tokens
    drafter = make_drafter(config, draft_model, input_ids.shape[0], max_length, sampling)
    verifier = SessionVerifier(session, parts)
    return await speculative_decode(verifier, input_ids, sampling, drafter, config.draft_tokens, on_tokens)
