"""Prompt tuning: a trainable prefix of virtual-token embeddings in front of every sequence.

The client owns the only trainable weights (`prompt` [num_virtual_tokens, hidden]); the blocks
stay on the swarm and gradients reach the prompt by Backward RPCs through `run_remote_blocks`.
Deep prompt tuning (P-Tuning v2) adds `deep_prompts` [num_blocks, num_virtual_tokens, hidden]:
each node adds its blocks' rows to the virtual positions at every block's input, and Backward
returns their gradients. Built on the public pieces of `DistributedModelForCausalLM`: local
parts, remote pipelines and inference sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.client.autograd import run_remote_blocks
from swarm.client.model import CausalLMOutput, DistributedModelForCausalLM, causal_lm_loss
from swarm.errors import ConfigError
from swarm.generation import generate_tokens

PROMPT_KEY = "prompt"
DEEP_KEY = "deep_prompts"


class PromptTuning(nn.Module):
    """`num_virtual_tokens` trainable embeddings prepended to the input of the remote blocks.

    init "vocab": start from the embeddings of random vocabulary tokens (usually trains faster);
    "random": small normal noise. deep: also train per-block prompts, starting at zero (so a new
    deep tuning begins as the shallow one). Train with any optimizer over `parameters()`; the
    model's own local parts are not registered here, so they are not trained unless the caller
    adds them.
    """

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        num_virtual_tokens: int,
        init: Literal["random", "vocab"] = "vocab",
        *,
        deep: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if init not in ("random", "vocab"):
            raise ConfigError(f"init must be 'random' or 'vocab', got {init!r}")
        self.model = model  # a plain attribute: not an nn.Module, its parts are not ours to train
        self.num_virtual_tokens = num_virtual_tokens
        self.hidden_size = model.config.hidden_size
        weight = model.parts.embed_tokens.weight
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            if init == "vocab":
                ids = torch.randint(0, model.config.vocab_size, (num_virtual_tokens,), generator=gen)
                start = weight[ids.to(weight.device)].detach().clone()
            else:
                start = torch.randn(num_virtual_tokens, self.hidden_size, generator=gen) * 0.02
        self.prompt = nn.Parameter(start.to(device=weight.device, dtype=weight.dtype))
        self.deep_prompts: nn.Parameter | None = None
        if deep:
            shape = (model.config.num_hidden_layers, num_virtual_tokens, self.hidden_size)
            self.deep_prompts = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=weight.dtype))

    def _deep(self) -> torch.Tensor | None:
        """The deep prompts as the wire takes them, [num_blocks, 1, virtual, hidden] (batch broadcast)."""
        return self.deep_prompts.unsqueeze(1) if self.deep_prompts is not None else None

    def _prepend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, t] ids -> [b, virtual + t, D]: the prompt, then the tokens' embeddings."""
        tokens = self.model.parts.embed(input_ids)
        prefix = self.prompt.to(tokens.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return torch.cat([prefix, tokens], dim=1)

    def _check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ConfigError(f"input_ids must be [batch, length>0], got shape {list(input_ids.shape)}")
        total = self.num_virtual_tokens + input_ids.shape[1] + new_tokens
        limit = self.model.config.max_position_embeddings
        if total > limit:
            raise ConfigError(
                f"{self.num_virtual_tokens} virtual + {input_ids.shape[1]} input + {new_tokens} new tokens "
                f"= {total} exceeds max_position_embeddings {limit}"
            )

    @overload
    def forward(self, input_ids: torch.Tensor, labels: None = None) -> torch.Tensor: ...
    @overload
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput: ...

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | CausalLMOutput:
        """Logits [batch, length, vocab] for the real tokens (virtual positions dropped).

        With `labels` [batch, length] (-100 ignored), return a `CausalLMOutput` whose loss
        backpropagates into `prompt` through the remote blocks (training codec on the wire).
        """
        self._check_input(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ConfigError(
                f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}"
            )
        codec = self.model.client_config.training_codec if labels is not None else None
        pipeline = self.model.remote_pipeline(randomized=True, codec=codec)
        hidden = run_remote_blocks(self._prepend(input_ids), pipeline, self._deep())
        logits = self.model.parts.logits(hidden[:, self.num_virtual_tokens :])
        if labels is None:
            return logits
        return CausalLMOutput(loss=causal_lm_loss(logits, labels), logits=logits)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Prompt + up to `max_new_tokens` new tokens [batch, total] as model.generate; no virtual ones."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        self._check_input(input_ids, max_new_tokens)
        model = self.model
        cfg = model.sampling_config(
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
        )
        max_length = self.num_virtual_tokens + input_ids.shape[1] + max_new_tokens
        session_of = model.inference_session(max_length, batch_size=input_ids.shape[0], prompts=self._deep())
        with session_of as session:

            def step(new_ids: torch.Tensor, start: int) -> torch.Tensor:
                # The first step carries the virtual tokens; later ones only the new token.
                hidden = self._prepend(new_ids) if start == 0 else model.parts.embed(new_ids)
                return model.next_token_logits(session, hidden)

            return generate_tokens(step, input_ids, cfg)

    def save(self, path: str | Path) -> None:
        """Write the prompts as safetensors (keys "prompt" and, when deep, "deep_prompts")."""
        meta = {"num_virtual_tokens": str(self.num_virtual_tokens), "hidden_size": str(self.hidden_size)}
        tensors = {name: p.detach().cpu().contiguous() for name, p in self._tensors().items()}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Read prompts written by `save`; their kind (deep or not) and sizes must equal this module's."""
        tensors = load_file(str(path))
        mine = self._tensors()
        if set(tensors) != set(mine):
            raise ConfigError(f"{path} holds {sorted(tensors)}, this PromptTuning has {sorted(mine)}")
        for name, param in mine.items():
            if tensors[name].shape != param.shape:
                raise ConfigError(
                    f"{path} holds {name} of shape {list(tensors[name].shape)}, this PromptTuning needs "
                    f"{list(param.shape)} (num_virtual_tokens={self.num_virtual_tokens})"
                )
        with torch.no_grad():
            for name, param in mine.items():
                param.copy_(tensors[name].to(param))

    def _tensors(self) -> dict[str, nn.Parameter]:
        tensors = {PROMPT_KEY: self.prompt}
        if self.deep_prompts is not None:
            tensors[DEEP_KEY] = self.deep_prompts
        return tensors
