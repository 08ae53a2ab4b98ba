"""Execution of the served blocks: one compute worker per device, and the KV-cache budget.

All compute runs on a single worker thread per node, so the asyncio event loop (gRPC,
DHT announcements) never blocks on a matrix multiply and requests never race on the
device. torch releases the GIL inside its kernels, so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from swarm.errors import ConfigError, LimitExceeded, ProtocolError
from swarm.models.llama import LayerCache, LlamaBlock, LlamaConfig

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class CacheBudget:
    """Bytes of KV cache all sessions together may hold; a session that does not fit is refused."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0

    def reserve(self, nbytes: int) -> None:
        if self.used + nbytes > self.total:
            raise LimitExceeded(
                f"KV cache full: the session needs {nbytes} bytes, {self.total - self.used} of "
                f"{self.total} are free; use a shorter max_length or another server"
            )
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


_session_ids = itertools.count(1)


@dataclass
class InferenceSession:
    """The KV caches one Inference stream holds on this node, for blocks [start, end)."""

    start: int
    end: int
    batch_size: int
    max_length: int
    caches: list[LayerCache]
    nbytes: int
    id: int = field(default_factory=lambda: next(_session_ids))

    @property
    def length(self) -> int:
        return self.caches[0].length if self.caches else 0


class BlockBackend:
    def __init__(
        self,
        config: LlamaConfig,
        blocks: list[LlamaBlock],
        start: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        cache_bytes: int,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.start, self.end = start, start + len(blocks)
        self.dtype, self.device = dtype, device
        self.budget = CacheBudget(cache_bytes)
        self.sessions: dict[int, InferenceSession] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _blocks(self, start: int, end: int) -> list[LlamaBlock]:
        if not (self.start <= start < end <= self.end):
            raise ProtocolError(
                f"this node serves blocks {self.start}:{self.end}, the request asks for {start}:{end}"
            )
        return self.blocks[start - self.start : end - self.start]

    def _check_hidden(self, hidden: torch.Tensor, what: str = "hidden_states") -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ProtocolError(
                f"{what} must be [batch, length, {self.config.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise ProtocolError(f"{what} must be a floating-point tensor, got {hidden.dtype}")

    async def forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        blocks = self._blocks(start, end)
        self._check_hidden(hidden)

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                h = hidden.to(self.device, self.dtype)
                for block in blocks:
                    h = block(h)
                return h.cpu()

        return await self._run(compute)

    async def backward(
        self, hidden: torch.Tensor, grad_outputs: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """Stateless backward: recompute the span's forward under autograd, return d(loss)/d(inputs)."""
        blocks = self._blocks(start, end)
        self._check_hidden(hidden)
        self._check_hidden(grad_outputs, "grad_outputs")
        if grad_outputs.shape != hidden.shape:
            raise ProtocolError(
                f"grad_outputs shape {list(grad_outputs.shape)} != hidden_states shape {list(hidden.shape)}"
            )

        def compute() -> torch.Tensor:
            with torch.enable_grad():
                h_in = hidden.to(self.device, self.dtype).requires_grad_(True)
                h = h_in
                for block in blocks:
                    h = block(h)
                (grad,) = torch.autograd.grad(h, h_in, grad_outputs.to(self.device, self.dtype))
            return grad.cpu()

        return await self._run(compute)

    def open_session(self, start: int, end: int, batch_size: int, max_length: int) -> InferenceSession:
        blocks = self._blocks(start, end)
        per_block = LayerCache.bytes_needed(self.config, batch_size, max_length, self.dtype)
        nbytes = per_block * len(blocks)
        self.budget.reserve(nbytes)
        try:
            caches = [
                LayerCache(self.config, batch_size, max_length, self.dtype, self.device) for _ in blocks
            ]
        except BaseException:
            self.budget.release(nbytes)
            raise
        session = InferenceSession(start, end, batch_size, max_length, caches, nbytes)
        self.sessions[session.id] = session
        return session

    def close_session(self, session: InferenceSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            session.caches.clear()
            self.budget.release(session.nbytes)

    async def step(self, session: InferenceSession, hidden: torch.Tensor, position: int) -> torch.Tensor:
        self._check_hidden(hidden)
        batch, new_tokens, _ = hidden.shape
        if batch != session.batch_size:
            raise ProtocolError(f"session was opened for batch {session.batch_size}, step has batch {batch}")
        if position != session.length:
            raise ProtocolError(
                f"step position {position} does not match the {session.length} tokens this session holds"
            )
        if session.length + new_tokens > session.max_length:
            raise LimitExceeded(
                f"session max_length {session.max_length} exceeded: holds {session.length}, "
                f"step adds {new_tokens}"
            )
        blocks = self._blocks(session.start, session.end)

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                h = hidden.to(self.device, self.dtype)
                for block, cache in zip(blocks, session.caches, strict=True):
                    h = block(h, start=position, cache=cache)
                return h.cpu()

        return await self._run(compute)
