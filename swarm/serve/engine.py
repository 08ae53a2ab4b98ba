"""Generation for HTTP requests: admission control, and tokens streamed from the swarm to asyncio.

Each admitted request runs `DistributedModelForCausalLM.generate` in a worker thread, so the
tokens are exactly those `generate` returns; each token is handed to the request's coroutine as
it arrives. A request that is abandoned (client gone, stop string) sets a flag that ends the
decoding loop after the step in flight, and the inference session closes with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from swarm.client.loop import run_on_client_loop
from swarm.client.model import DistributedModelForCausalLM
from swarm.errors import ConfigError, MissingBlocksError, SwarmError


class Overloaded(SwarmError):
    """Every session slot and queue place is taken: the client should retry later."""

    def __init__(self, in_flight: int, queued: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"the server is at capacity ({in_flight} generations in flight, {queued} queued); "
            f"retry in {retry_after} s"
        )


class _Cancelled(Exception):
    """Raised inside the worker's token callback to end generation early (never leaves the engine)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Admission:
    """At most `max_sessions` generations at once and `max_queue` waiting; beyond that, Overloaded."""

    max_sessions: int
    max_queue: int
    retry_after: int = 1
    in_flight: int = 0
    queued: int = 0
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_queue < 0:
            raise ConfigError(
                f"need max_sessions >= 1 and max_queue >= 0, got {self.max_sessions} and {self.max_queue}"
            )
        self._slots = asyncio.Semaphore(self.max_sessions)

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot; returns its release function (idempotent)."""
        if self.in_flight + self.queued >= self.max_sessions + self.max_queue:
            raise Overloaded(self.in_flight, self.queued, self.retry_after)
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self._slots.release()

        return release


class Engine:
    def __init__(self, model: DistributedModelForCausalLM, admission: Admission) -> None:
        self.model = model
        self.admission = admission
        self.context = model.config.max_position_embeddings
        self.executor = ThreadPoolExecutor(admission.max_sessions, thread_name_prefix="swarm-serve")

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1:
            raise ConfigError("the prompt is empty: give at least one token")
        if prompt_tokens + max_tokens > self.context:
            raise ConfigError(
                f"this model's context is {self.context} tokens, but the request asks for "
                f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} max_tokens); "
                "shorten the prompt or lower max_tokens"
            )

    async def check_coverage(self) -> None:
        """MissingBlocksError (-> 503) before any response is sent, rather than mid-stream."""
        snapshot = await run_on_client_loop(self.model.swarm_map.get())
        missing = snapshot.missing_blocks()
        if missing:
            snapshot = await run_on_client_loop(self.model.swarm_map.get(refresh=True))
            missing = snapshot.missing_blocks()
        if missing:
            raise MissingBlocksError(self.model.model_name, missing)

    async def tokens(
        self, ids: list[int], sampling: Sampling, release: Callable[[], None]
    ) -> AsyncGenerator[int, None]:
        """Yield new token ids as the swarm produces them; `release` frees the admission slot.

        The slot is released when the worker thread has finished, i.e. once the inference session
        is closed, whether the caller read to the end or went away early.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_tokens(tokens: torch.Tensor) -> None:
            if cancelled.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, int(tokens[0]))

        def work() -> None:
            result: BaseException | None = None
            try:
                self._generate(ids, sampling, on_tokens)
            except _Cancelled:
                pass
            except BaseException as e:  # handed to the request, which turns it into an HTTP error
                result = e
            loop.call_soon_threadsafe(queue.put_nowait, result)

        try:
            future = loop.run_in_executor(self.executor, work)
        except BaseException:
            release()
            raise
        future.add_done_callback(lambda _: release())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()  # no-op after a normal end; otherwise the worker stops after this step

    def _generate(self, ids: list[int], s: Sampling, on_tokens: Callable[[torch.Tensor], None]) -> None:
        self.model.generate(
            torch.tensor([ids], dtype=torch.long),
            s.max_tokens,
            do_sample=s.temperature > 0,
            temperature=s.temperature if s.temperature > 0 else 1.0,
            top_k=0,  # OpenAI samples from the whole distribution, cut by top_p only
            top_p=s.top_p,
            seed=s.seed,
            on_tokens=on_tokens,
        )

    def is_eos(self, token: int) -> bool:
        return token in self.model.config.eos_token_ids

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
