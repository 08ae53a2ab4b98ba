"""`DistributedModelForCausalLM`: a causal LM whose transformer blocks run in the swarm.

Embeddings, the final norm and the LM head are loaded and run locally; every block runs
on remote nodes found through the DHT. The public methods are synchronous, mirroring
transformers; all network I/O happens on the client's background event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, overload

import torch
import torch.nn.functional as F
from hivemind.dht import DHT

from swarm import checkpoint
from swarm.client.autograd import RemotePipeline, run_remote_blocks
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.lora import LoraConfig, RemoteLora
from swarm.client.remote import ChannelPool
from swarm.client.session import InferenceSession
from swarm.client.speculative import decode_in_session
from swarm.client.verify import SpotChecker
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import min_latency_route, throughput_weighted_route
from swarm.coordinator.rtt import RttTable
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.errors import ConfigError, MissingBlocksError, SwarmError
from swarm.generation import Decoder, SamplingConfig, eos_ids
from swarm.models.llama import ClientParts, LlamaConfig, LlamaForCausalLM, check_token_ids
from swarm.speculative import (
    DEFAULT_DRAFT_TOKENS,
    SpeculationStats,
    Speculative,
    SpeculativeConfig,
    load_draft_model,
)

log = logging.getLogger(__name__)

MAX_REDECODES = 8  # convictions in one speculative generation before it gives up (each bans a server)
REVIEW_PERIOD = 30.0  # seconds between reads of the evidence other clients publish (a DHT lookup)
IGNORE_INDEX = -100  # label value that contributes no loss, as in transformers


@dataclass(frozen=True)
class CausalLMOutput:
    """What `model(input_ids, labels=...)` returns, named as in transformers."""

    loss: torch.Tensor
    logits: torch.Tensor  # [batch, length, vocab] float32


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 at position t; IGNORE_INDEX labels count for nothing."""
    if labels.shape != logits.shape[:2]:
        raise ConfigError(
            f"labels must be [batch, length] = {list(logits.shape[:2])}, got {list(labels.shape)}"
        )
    predicted = logits[:, :-1].flatten(0, 1)  # position t predicts label t + 1
    targets = labels[:, 1:].flatten().to(logits.device)
    return F.cross_entropy(predicted.float(), targets, ignore_index=IGNORE_INDEX)


class Streamer(Protocol):
    """What `generate(streamer=...)` calls; transformers' TextStreamer fits."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class DistributedModelForCausalLM:
    def __init__(
        self,
        model_name: str,
        config: LlamaConfig,
        parts: ClientParts,
        dht: DHT,
        client_config: ClientConfig,
    ) -> None:
        self.model_name = model_name
        self.config = config
        self.parts = parts
        self.dht = dht
        self.client_config = client_config
        self.swarm_map = SwarmMapCache(
            dht, model_name, config.num_hidden_layers, ttl=client_config.swarm_map_ttl
        )
        self.pool = ChannelPool(client_config)
        # Peers that failed recently, avoided by every route and session of this client.
        self.bans = BanList(client_config.ban_base, client_config.ban_limit)
        self.rtts = RttTable()  # measured round trips, for the fastest routes
        # Spot checks of the servers' work (verify_rate 0: none); it also reads others' evidence.
        self.checker = SpotChecker(self.pool, self.swarm_map, client_config, self.bans, dht)
        self._rng = random.Random()  # draws training routes
        self._adapter: RemoteLora | None = None  # client-owned LoRA on the remote blocks
        self._adapter_enabled = True
        self._draft: tuple[str, LlamaForCausalLM] | None = None  # speculative decoding's draft model
        self.last_speculation: SpeculationStats | None = None  # counts of the last speculative generate()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        client_config: ClientConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> DistributedModelForCausalLM:
        """Load the local parts of a model and find servers for all of its blocks.

        Raises MissingBlocksError (naming the blocks) if the swarm does not serve them all.
        """
        from swarm.dht import start_dht

        client_config = client_config or ClientConfig()
        if not initial_peers:
            raise ConfigError("initial_peers is empty: pass the multiaddr of at least one swarm peer")
        ckpt = checkpoint.open_checkpoint(name_or_path)
        parts = checkpoint.load_client_parts(ckpt, dtype=dtype)
        dht = start_dht(
            initial_peers=initial_peers, client_mode=True, startup_timeout=client_config.dht_startup_timeout
        )
        model = cls(checkpoint.model_name(name_or_path), ckpt.config, parts, dht, client_config)
        try:
            run_sync(model._await_coverage())
        except BaseException:
            model.shutdown()
            raise
        return model

    async def _await_coverage(self) -> None:
        deadline = time.monotonic() + self.client_config.wait_for_blocks
        while True:
            missing = (await self.swarm_map.get(refresh=True)).missing_blocks()
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise MissingBlocksError(self.model_name, missing)
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # ---- inference ----------------------------------------------------------------------------

    # ---- LoRA adapters (transformers' PeftAdapterMixin names) --------------------------------

    @property
    def adapter(self) -> RemoteLora | None:
        """The active LoRA adapter, or None; its parameters are the ones to train."""
        return self._adapter if self._adapter_enabled else None

    def add_adapter(self, config: LoraConfig | Any, *, seed: int | None = None) -> RemoteLora:
        """Attach a new LoRA adapter to the remote blocks and return it (a `torch.nn.Module`).

        `config` is a `swarm.client.lora.LoraConfig` or a `peft.LoraConfig`. The adapter starts
        as a no-op (B = 0, as in peft); train `adapter.parameters()` with any optimizer.
        """
        lora_config = config if isinstance(config, LoraConfig) else LoraConfig.from_peft(config)
        if lora_config.base_model_name_or_path is None:
            lora_config = replace(lora_config, base_model_name_or_path=self.model_name)
        return self._attach(RemoteLora(self.config, lora_config, seed=seed))

    def load_adapter(self, path: str | Path) -> RemoteLora:
        """Attach a peft LoRA adapter saved in `path` (adapter_config.json + adapter_model.safetensors)."""
        return self._attach(RemoteLora.load_pretrained(path, self.config))

    def save_adapter(self, path: str | Path) -> None:
        """Write the adapter in peft's format: `PeftModel.from_pretrained(hf_model, path)` loads it."""
        if self._adapter is None:
            raise ConfigError("there is no adapter to save: add_adapter or load_adapter first")
        self._adapter.save_pretrained(path)

    def disable_adapters(self) -> None:
        """Run the plain blocks (the adapter is kept; `enable_adapters` brings it back)."""
        self._adapter_enabled = False

    def enable_adapters(self) -> None:
        self._adapter_enabled = True

    def _attach(self, adapter: RemoteLora) -> RemoteLora:
        device = self.parts.norm.weight.device
        self._adapter, self._adapter_enabled = adapter.to(device), True
        return adapter

    # ---- inference ----------------------------------------------------------------------------

    @contextmanager
    def inference_session(
        self, max_length: int, batch_size: int = 1, *, prompts: torch.Tensor | None = None
    ) -> Iterator[InferenceSession]:
        """A KV-cache session through the swarm; use `step` via `generate(session=...)`.

        prompts: deep prompts [num_blocks, batch or 1, prefix, hidden] added to the first
        `prefix` positions at every block's input (see `swarm.client.ptune`).
        """
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self._check_prompts(prompts, batch_size)
        session = InferenceSession(
            self.pool,
            self.swarm_map,
            self.client_config,
            batch_size=batch_size,
            max_length=max_length,
            bans=self.bans,
            rtts=self.rtts,
            adapter=self.adapter,
            prompts=prompts,
            checker=self.checker if self.checker.enabled else None,
        )
        run_sync(self.review_reports())
        run_sync(session.open())
        try:
            yield session
        finally:
            run_sync(session.close())

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
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        streamer: Streamer | None = None,
        speculative: Speculative = "off",
        draft_model: str | Path | LlamaForCausalLM | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> torch.Tensor:
        """Return prompt + up to `max_new_tokens` new tokens [batch, total], like transformers.

        Stops at the checkpoint's EOS token(s) unless `eos_token_id` overrides them (`[]`: never stop early).
        `streamer` works as in transformers (e.g. `TextStreamer`): `put(prompt)`, then `put(tokens)`
        as each step's tokens arrive, then `end()`.

        speculative: "lookup" drafts from n-grams of the context, "model" with `draft_model` (a
        checkpoint directory, or a loaded swarm.models model, with this model's vocabulary); the swarm
        verifies up to `draft_tokens` drafts per round trip. Greedy output is the same token for
        token; sampled output has the same distribution. `last_speculation` then holds the counts.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        self._check_input_ids(input_ids)
        named = "a loaded model" if isinstance(draft_model, LlamaForCausalLM) else draft_model
        spec = SpeculativeConfig(
            speculative, None if named is None else str(named), draft_tokens=draft_tokens
        )
        cfg = self.sampling_config(
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
        )
        drafter = self._draft_model(draft_model) if spec.mode == "model" else None
        max_length = input_ids.shape[1] + max_new_tokens
        with self.inference_session(max_length, batch_size=input_ids.shape[0]) as session:
            callback = on_tokens
            if streamer is not None:
                streamer.put(input_ids.cpu())

                def callback(tokens: torch.Tensor) -> None:
                    streamer.put(tokens.cpu())
                    if on_tokens is not None:
                        on_tokens(tokens)

            try:
                if spec.mode == "off":
                    return run_sync(self._decode(session, input_ids, cfg, callback))
                out, self.last_speculation = run_sync(
                    self._speculate(session, input_ids, cfg, spec, drafter, callback)
                )
                return out
            finally:
                if streamer is not None:
                    streamer.end()

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse a prompt the model cannot embed before any server is asked to hold a session."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ConfigError(
                f"input_ids must be integer token ids [batch, tokens], got {input_ids.dtype} of shape "
                f"{list(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ConfigError("input_ids holds no tokens: give a prompt of at least one token")
        check_token_ids(input_ids, self.config.vocab_size)

    def _draft_model(self, draft_model: str | Path | LlamaForCausalLM | None) -> LlamaForCausalLM:
        """The draft model, loaded once per path and kept for the next generate()."""
        if isinstance(draft_model, LlamaForCausalLM):
            if draft_model.config.vocab_size != self.config.vocab_size:
                raise ConfigError(
                    f"the draft model has a vocabulary of {draft_model.config.vocab_size} tokens, the "
                    f"model {self.config.vocab_size}: a draft model must share the model's tokenizer"
                )
            return draft_model
        key = str(Path(str(draft_model)).resolve())
        if self._draft is None or self._draft[0] != key:
            dtype = self.parts.norm.weight.dtype
            self._draft = (key, load_draft_model(key, self.config.vocab_size, dtype))
        return self._draft[1]

    async def _decode(
        self,
        session: InferenceSession,
        input_ids: torch.Tensor,
        cfg: SamplingConfig,
        on_tokens: Callable[[torch.Tensor], None] | None,
    ) -> torch.Tensor:
        """The token loop, all on the client's event loop: a token costs no hop between the caller's
        thread and the loop (each would cost a task, a wake-up and a future), only the network's.

        Embedding, LM head and sampling run here too, between awaits (inference mode is per thread,
        so it is entered on this one). Callbacks run on the loop thread.
        """
        decoder = Decoder(input_ids, cfg)
        while True:
            while not decoder.done:
                with torch.inference_mode():
                    # after the first step, new_ids are tokens sampled here: no range check needed
                    hidden = self.parts.embed(decoder.new_ids, check=decoder.position == 0)
                out = await session.step(hidden)
                with torch.inference_mode():
                    # nodes answer in their own compute dtype; the local head runs in ours
                    token = decoder.advance(self.parts.logits(out[:, -1:].to(hidden.dtype))[:, -1])
                if on_tokens is not None:
                    on_tokens(token)
                await self._redo_if_caught(session, decoder)
            # Spot checks: every answer not yet checked is, before the tokens are returned; a server
            # caught lying makes the tokens from its first wrong position be decoded again.
            await session.verify()
            if not await self._redo_if_caught(session, decoder):
                return decoder.out

    async def _speculate(
        self,
        session: InferenceSession,
        input_ids: torch.Tensor,
        cfg: SamplingConfig,
        spec: SpeculativeConfig,
        drafter: LlamaForCausalLM | None,
        on_tokens: Callable[[torch.Tensor], None] | None,
    ) -> tuple[torch.Tensor, SpeculationStats]:
        """Speculative decoding, spot-checked as `_decode` is: every answer is checked before the
        tokens are returned, and a server caught lying makes the tokens from its first wrong
        position be decoded again, on a session without it."""
        prompt = input_ids.shape[1]
        out, stats = await decode_in_session(session, self.parts, input_ids, cfg, spec, drafter, on_tokens)
        for _ in range(MAX_REDECODES):
            await session.verify()
            bad = session.take_rollback()
            if bad is None:
                return out, stats
            keep = max(prompt, min(bad + 1, out.shape[1] - 1))  # the token after `bad` came from wrong logits
            log.warning("re-decoding from token %d after a server was caught returning wrong results", keep)
            await session.restart()
            rest = replace(cfg, max_new_tokens=cfg.max_new_tokens - (keep - prompt))
            out, stats = await decode_in_session(
                session, self.parts, out[:, :keep], rest, spec, drafter, on_tokens
            )
        raise SwarmError(
            f"servers were caught returning wrong results {MAX_REDECODES} times in one generation"
        )

    async def _redo_if_caught(self, session: InferenceSession, decoder: Decoder) -> bool:
        """If a check convicted a server of the session, rewind to its first wrong position and
        rebuild the session without it; the loop then decodes those tokens again."""
        bad = session.take_rollback()
        if bad is None:
            return False
        keep = decoder.rewind(bad + 1)  # the token after position `bad` came from wrong logits
        log.warning("re-decoding from token %d after a server was caught returning wrong results", keep)
        await session.restart()
        return True

    def sampling_config(
        self,
        max_new_tokens: int,
        *,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        eos_token_id: int | Sequence[int] | None,
    ) -> SamplingConfig:
        """generate()'s arguments as a config; EOS defaults to the checkpoint's."""
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_ids=self.config.eos_token_ids if eos_token_id is None else eos_ids(eos_token_id),
            seed=seed,
        )

    def next_token_logits(self, session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
        """Send one step's hidden states through the session; logits [batch, vocab] of its last token."""
        # nodes answer in their own compute dtype; the local head runs in ours
        out = run_sync(session.step(hidden)).to(hidden.dtype)
        return self.parts.logits(out[:, -1:])[:, -1]

    @overload
    def forward(self, input_ids: torch.Tensor, labels: None = None) -> torch.Tensor: ...
    @overload
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput: ...

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | CausalLMOutput:
        """Logits [batch, length, vocab] for full sequences, through Forward RPCs.

        With `labels` [batch, length], return a `CausalLMOutput` whose `loss` (mean next-token
        cross-entropy, -100 ignored) backpropagates through the remote blocks by Backward RPCs.
        Without labels, logits only carry a graph when autograd is on and a local parameter
        requires grad; otherwise the pass runs under inference mode.
        """
        if labels is None and not self._needs_grad():
            return self._inference_logits(input_ids)
        # With labels this is a training step: int8 on the wire by default. A plain forward keeps
        # the lossless codec, so its logits equal a local run's, as transformers users expect.
        codec = self.client_config.training_codec if labels is not None else None
        run_sync(self.review_reports())
        pipeline = self.remote_pipeline(randomized=True, codec=codec)
        hidden = run_remote_blocks(self.parts.embed(input_ids), pipeline)
        logits = self.parts.logits(hidden)
        if labels is None:
            return logits
        return CausalLMOutput(loss=causal_lm_loss(logits, labels), logits=logits)

    __call__ = forward

    def _needs_grad(self) -> bool:
        params = [*self.parts.parameters(), *(self.adapter.parameters() if self.adapter else ())]
        return torch.is_grad_enabled() and any(p.requires_grad for p in params)

    def _check_prompts(self, prompts: torch.Tensor | None, batch_size: int) -> None:
        if prompts is None:
            return
        c = self.config
        shape = list(prompts.shape)
        if len(shape) != 4 or shape[0] != c.num_hidden_layers or shape[1] not in (1, batch_size):
            raise ConfigError(
                f"deep prompts must be [num_blocks {c.num_hidden_layers}, batch {batch_size} or 1, prefix, "
                f"hidden {c.hidden_size}], got {shape}"
            )
        if shape[3] != c.hidden_size:
            raise ConfigError(f"deep prompts have hidden size {shape[3]}, the model {c.hidden_size}")

    @torch.inference_mode()
    def _inference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.parts.embed(input_ids)
        run_sync(self.review_reports())
        randomized = self.client_config.routing == "throughput_weighted"
        out, _ = run_sync(self.remote_pipeline(randomized=randomized).forward(hidden))
        return self.parts.logits(out.to(hidden.dtype))

    def remote_pipeline(self, *, randomized: bool = True, codec: str | None = None) -> RemotePipeline:
        """A route through every remote block, for `run_remote_blocks` (prompt tuning builds on this).

        randomized: drawn in proportion to throughput (SWARM wiring, spreads training load);
        otherwise the fastest route, as interactive inference wants. `codec` overrides the
        client's codec for this pipeline's activations and gradients.
        """
        snapshot = run_sync(self.swarm_map.get())
        avoid = self.bans.banned()
        if randomized:
            route = throughput_weighted_route(snapshot, rng=self._rng, banned=avoid)
        else:
            route = min_latency_route(snapshot, banned=avoid)
        config = self.client_config if codec is None else replace(self.client_config, codec=codec)
        checker = self.checker if self.checker.enabled else None
        return RemotePipeline(
            self.pool, self.swarm_map, config, route, bans=self.bans, adapter=self.adapter, checker=checker
        )

    async def review_reports(self) -> list[str]:
        """Ban the servers that other clients published signed wrong answers of, once this client
        has reproduced the mismatch (the first call, then at most every REVIEW_PERIOD seconds);
        returns those banned now."""
        return await self.checker.review_reports(every=max(REVIEW_PERIOD, self.client_config.swarm_map_ttl))

    def to(self, dtype: torch.dtype) -> DistributedModelForCausalLM:
        """Run the local parts (and send activations) in `dtype`, like `nn.Module.to`."""
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point type, got {dtype}")
        self.parts.to(dtype)
        return self

    # ---- lifecycle ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        try:
            run_sync(self.swarm_map.close(), timeout=10)  # stop its refresher before the DHT goes away
            run_sync(self.pool.close(), timeout=10)
        finally:
            self.dht.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
