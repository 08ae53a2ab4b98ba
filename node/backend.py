"""Execution of the served blocks: one compute worker per device, and the KV-cache budget.

All compute runs on one worker thread per backend, so the asyncio event loop (gRPC, DHT
announcements) never blocks on a matrix multiply and requests never race on the device;
torch releases the GIL inside its kernels, so the loop stays responsive.

The worker takes work by priority: inference steps (a person is waiting for the next
token) before forward passes before backward passes; FIFO within a priority. When it takes
a forward or backward request it also takes the queued requests of the same kind, span and
sequence length, up to `batch_tokens`, and runs them as one batch: on a device the cost of a
pass over a span is dominated by reading its weights, so eight small requests cost little
more than one. Merging is exact: attention, norms and MLPs work on each sample on its own.

A request whose deadline passed while it waited is dropped with `DeadlineExceeded`; one
whose caller went away (its coroutine was cancelled) is dropped silently. Neither is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from swarm.adapters import tensor_name
from swarm.errors import ConfigError, DeadlineExceeded, LimitExceeded, ProtocolError, SwarmError
from swarm.models.llama import BlockLora, LayerCache, LlamaBlock, LlamaConfig, hf_block_prefix
from swarm.node.adapters import Adapter, AdapterCache
from swarm.request_parsing import caller

T = TypeVar("T")
log = logging.getLogger(__name__)

INFERENCE, FORWARD, BACKWARD = 0, 1, 2  # priorities: lower runs first
KINDS = ("inference", "forward", "backward")  # names by priority, as metrics label them
DEFAULT_BATCH_TOKENS = 8192

# on_batch(kind, n_requests, tokens, queue_wait_s): called on the worker thread just before a
# batch runs; queue_wait_s is how long its oldest request waited. It must be quick and thread-safe.
OnBatch = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class BackwardResult:
    """What Backward answers: d(loss)/d(inputs), and for a tuned request its tuning's gradients."""

    grad_inputs: Tensor
    grad_prompts: Tensor | None = None
    adapter_grads: dict[str, Tensor] = field(default_factory=dict)  # tensor name -> grad, float32


# What a task computes: its inputs (on the device, in the compute dtype, possibly several
# requests concatenated along the batch dim) -> one output of the same batch size. A task
# that always runs alone (key None) may return a BackwardResult, already on the CPU.
Result = Tensor | BackwardResult | dict[str, Tensor]
Compute = Callable[[list[Tensor]], Result]
# on_gradients(grads, samples, step): called on the worker thread with the weight gradients of one
# training Backward (of its mean loss over `samples` sequences), in the blocks' parameter order,
# and the optimizer step the request is tagged with (None: untagged).
OnGradients = Callable[[list[Tensor], int, int | None], None]


def deadline_after(seconds: float | None) -> float | None:
    """The deadline `seconds` from now, on the clock the backend checks (time.monotonic)."""
    return None if seconds is None else time.monotonic() + seconds


class BackendClosed(SwarmError):
    """The node is shutting down; the request was not run. Another node can take it."""

    retryable = True


class CacheBudget:
    """Bytes of KV cache all sessions together may hold; a session that does not fit is refused.

    Fair share: one owner (a client connection) may always open a first session that fits, but
    its further sessions may only bring it up to `share` of the budget, so a client that opens
    sessions in a loop leaves the rest to the clients after it. (A first session is not capped:
    one long session may legitimately need the whole cache of a small node.)
    """

    def __init__(self, total_bytes: int, share: float = 1.0) -> None:
        self.total = total_bytes
        self.share = share
        self.used = 0
        self.held: dict[str, int] = {}  # owner -> bytes its open sessions hold

    def reserve(self, nbytes: int, owner: str | None = None) -> None:
        if self.used + nbytes > self.total:
            raise LimitExceeded(
                f"KV cache full: the session needs {nbytes} bytes, {self.total - self.used} of "
                f"{self.total} are free; use a shorter max_length or another server"
            )
        if owner is not None:
            held, cap = self.held.get(owner, 0), int(self.share * self.total)
            if held and held + nbytes > cap:
                raise LimitExceeded(
                    f"this connection's sessions hold {held} of this node's {self.total} KV-cache bytes; "
                    f"one connection may hold at most {cap} ({self.share:.0%}) beyond its first session "
                    "so that other clients get served: close a session or use another server"
                )
            self.held[owner] = held + nbytes
        self.used += nbytes

    def release(self, nbytes: int, owner: str | None = None) -> None:
        self.used = max(0, self.used - nbytes)
        if owner is not None:
            left = self.held.pop(owner, 0) - nbytes
            if left > 0:
                self.held[owner] = left


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
    adapter: Adapter | None = None
    owner: str | None = None  # the client connection, for its fair share of the cache
    id: int = field(default_factory=lambda: next(_session_ids))

    @property
    def length(self) -> int:
        return self.caches[0].length if self.caches else 0


# ----------------------------------------------------------------------------- the worker


@dataclass(eq=False)  # identity equality: deque.remove must find this very task
class _Task:
    kind: int
    inputs: list[Tensor]
    compute: Compute
    key: tuple[object, ...] | None  # equal keys may share one run; None: always runs alone
    tokens: int
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    owner: str | None = None  # the client connection (request_parsing.caller), to serve clients in turn
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the caller went away; set under the worker's lock

    def resolve(self, result: Result | BaseException) -> None:
        """Hand a result to the awaiting coroutine, on its own loop (callable from any thread)."""
        # RuntimeError: that loop is closed, so nobody awaits the result any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set_future, self.future, result)


def _set_future(future: asyncio.Future[Result], result: Result | BaseException) -> None:
    if future.done():  # cancelled while it ran
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class ComputeWorker:
    """One thread that runs submitted tasks by priority, merging compatible ones into batches."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        *,
        batching: bool = True,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        on_batch: OnBatch | None = None,
        slowdown: float = 1.0,
    ) -> None:
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if slowdown < 1:
            raise ConfigError(f"slowdown must be >= 1, got {slowdown}")
        self.slowdown = slowdown  # > 1 emulates a slower device (benchmarks): idle after each batch
        # Work done, for a measured throughput: tokens of the requests run, and seconds they took.
        self.tokens_done = 0
        self.busy_seconds = 0.0
        self.device, self.dtype = device, dtype
        self.batching, self.batch_tokens, self.on_batch = batching, batch_tokens, on_batch
        self._queues: tuple[deque[_Task], ...] = tuple(deque() for _ in KINDS)
        self._served: dict[str | None, int] = {}  # owner -> the turn it was last served in
        self._turn = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a batch is running (on the worker, or inline on the event loop)
        self._thread = threading.Thread(target=self._serve, name="swarm-compute", daemon=True)
        self._thread.start()

    async def submit(
        self,
        kind: int,
        inputs: list[Tensor],
        compute: Compute,
        *,
        key: tuple[object, ...] | None = None,
        deadline: float | None = None,
    ) -> Result:
        """Queue `compute(inputs)` and wait for its result (inputs are [batch, length, ...])."""
        loop = asyncio.get_running_loop()
        tokens = inputs[0].shape[0] * inputs[0].shape[1] if inputs else 0
        task = _Task(kind, inputs, compute, key, tokens, loop.create_future(), loop, deadline, caller.get())
        with self._cond:
            if self._closed:
                raise BackendClosed("this node is shutting down; send the request to another node")
            # An inference step that finds the device idle runs right here, on the event loop: a
            # person waits for this token, and the two thread hand-offs it saves (to the worker and
            # back, each a wake-up) cost more than the step of a small span. The loop is blocked
            # meanwhile, but the device is busy with this step anyway; anything else queues.
            inline = kind == INFERENCE and self.slowdown == 1 and not self._busy and not any(self._queues)
            if inline:
                self._busy = True
            else:
                self._queues[kind].append(task)
                self._cond.notify()
        if inline:
            return self._run_inline(task)
        task.future.add_done_callback(lambda f: self._discard(task) if f.cancelled() else None)
        return await task.future

    def _run_inline(self, task: _Task) -> Result:
        try:
            if self.on_batch is not None:
                _report(self.on_batch, [task], task.enqueued)
            began = time.monotonic()
            out = self._compute([task])[0]
            self.tokens_done += task.tokens
            self.busy_seconds += time.monotonic() - began
            return out
        finally:
            with self._cond:
                self._busy = False
                if any(self._queues):  # work queued meanwhile is the worker's now (else no wake-up)
                    self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> dict[str, int]:
        with self._cond:
            return {name: len(queue) for name, queue in zip(KINDS, self._queues, strict=True)}

    def close(self, timeout: float = 5.0) -> None:
        """Fail every queued task, let a running batch finish, and stop the thread (waits <= timeout)."""
        with self._cond:
            self._closed = True
            dropped = [task for queue in self._queues for task in queue]
            for queue in self._queues:
                queue.clear()
            self._cond.notify_all()
        for task in dropped:
            task.resolve(BackendClosed("this node shut down before running the request; try another node"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _discard(self, task: _Task) -> None:
        """The caller was cancelled: unqueue its task so the worker never computes it."""
        with self._cond:
            task.cancelled = True
            # ValueError: the worker already took it (running or done)
            with contextlib.suppress(ValueError):
                self._queues[task.kind].remove(task)

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except BaseException as e:  # never let the worker die: the node would hang
                log.exception("compute worker failed")
                for task in batch:
                    task.resolve(e)
            finally:
                with self._cond:
                    self._busy = False

    def _take(self) -> list[_Task] | None:
        """Block until there is work; return the next batch, or None once closed."""
        with self._cond:
            while not self._closed and (self._busy or not any(self._queues)):
                self._cond.wait()
            if self._closed:
                return None
            self._busy = True
            queue = next(q for q in self._queues if q)
            head = self._fair_head(queue)
            if not self.batching or head.key is None:
                return [head]
            return [head, *self._companions(head, queue)]

    def _fair_head(self, queue: deque[_Task]) -> _Task:
        """Remove and return the oldest task of the owner served least recently (call under the lock):
        a client that queues a burst of requests does not make the others wait behind all of it."""
        head = queue[0]
        if len(queue) > 1:
            for task in queue:
                if self._served.get(task.owner, -1) < self._served.get(head.owner, -1):
                    head = task
        if head is queue[0]:
            queue.popleft()
        else:
            queue.remove(head)
        if len(self._served) > 4096:  # owners come and go: forget them rather than grow forever
            self._served.clear()
        self._turn += 1
        self._served[head.owner] = self._turn
        return head

    def _companions(self, head: _Task, queue: deque[_Task]) -> list[_Task]:
        """Remove and return queued tasks that can share head's run, FIFO, within the token budget."""
        taken: list[_Task] = []
        tokens = head.tokens
        for task in list(queue):
            if task.key == head.key and tokens + task.tokens <= self.batch_tokens:
                taken.append(task)
                tokens += task.tokens
                queue.remove(task)
        return taken

    def _run(self, batch: list[_Task]) -> None:
        now = time.monotonic()
        live = []
        for task in batch:
            if task.cancelled:
                continue
            if task.deadline is not None and now > task.deadline:
                waited = now - task.enqueued
                task.resolve(
                    DeadlineExceeded(f"deadline passed after {waited:.3f} s in this busy node's queue")
                )
                continue
            live.append(task)
        if not live:
            return
        if self.on_batch is not None:
            _report(self.on_batch, live, now)
        try:
            began = time.monotonic()
            outputs = self._compute(live)
            if self.slowdown > 1:
                time.sleep((self.slowdown - 1) * (time.monotonic() - began))
            tokens = sum(task.tokens for task in live)
            if tokens:
                self.tokens_done += tokens
                self.busy_seconds += time.monotonic() - began
        except Exception as e:  # e.g. out of memory: every request of the batch gets the error
            for task in live:
                task.resolve(e)
            return
        for task, out in zip(live, outputs, strict=True):
            task.resolve(out)

    def _compute(self, live: list[_Task]) -> list[Result]:
        """Concatenate the tasks' inputs along batch, run once, split the output back."""
        n_inputs = len(live[0].inputs)
        inputs = []
        for i in range(n_inputs):
            parts = [t.inputs[i].to(self.device, self.dtype) for t in live]
            inputs.append(torch.cat(parts) if len(parts) > 1 else parts[0])  # alone: no copy
        out = live[0].compute(inputs)
        if len(live) == 1:  # alone: nothing to split (and maybe not a tensor)
            return [out.cpu() if isinstance(out, Tensor) else out]
        assert isinstance(out, Tensor)  # merged tasks compute one batched tensor
        return list(out.cpu().split([t.inputs[0].shape[0] for t in live]))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread between batches, after queued work of higher priority:
        e.g. read weights that no optimizer step is changing meanwhile."""
        box: list[T] = []

        def run(_inputs: list[Tensor]) -> Result:
            box.append(fn())
            return {}

        await self.submit(BACKWARD, [], run)
        return box[0]


def _report(on_batch: OnBatch, live: list[_Task], now: float) -> None:
    try:
        tokens = sum(t.tokens for t in live)
        on_batch(KINDS[live[0].kind], len(live), tokens, now - live[0].enqueued)
    except Exception:  # a metrics bug must not fail requests
        log.exception("on_batch hook failed")


# ----------------------------------------------------------------------------- the backend


Loras = list[BlockLora | None]  # one entry per block of a span: its adapter, if any


def _run(
    blocks: list[LlamaBlock],
    h: Tensor,
    loras: Loras,
    prompts: Tensor | None,
    start: int = 0,
    caches: list[LayerCache] | None = None,
) -> Tensor:
    """The span's blocks in turn; h's first token is at absolute position `start`."""
    for i, block in enumerate(blocks):
        if prompts is not None:
            h = _add_prompt(h, prompts[i], start)
        h = block(h, start, caches[i] if caches is not None else None, loras[i])
    return h


def _add_prompt(h: Tensor, prompt: Tensor, start: int) -> Tensor:
    """Add a deep prompt [b or 1, prefix, D] to those of h's positions [start, start + t) below prefix."""
    covered = min(prompt.shape[1] - start, h.shape[1])
    if covered <= 0:  # every position of this step is past the prefix
        return h
    head = h[:, :covered] + prompt[:, start : start + covered]
    return torch.cat((head, h[:, covered:]), dim=1)


def _forward(blocks: list[LlamaBlock], loras: Loras, inputs: list[Tensor]) -> Tensor:
    h, *prompts = inputs
    with torch.inference_mode():
        return _run(blocks, h, loras, prompts[0] if prompts else None)


def _backward(blocks: list[LlamaBlock], first: int, loras: Loras, inputs: list[Tensor]) -> Result:
    """Recompute the span under autograd; d(loss)/d(inputs), and of the prompts and adapter if sent.

    Weights are frozen: only the request's own tensors (hidden, prompts, adapter) get gradients.
    """
    hidden, grad_outputs, *rest = inputs
    with torch.enable_grad():
        h_in = hidden.detach().requires_grad_(True)
        prompts = rest[0].detach().requires_grad_(True) if rest else None
        leaves, loras = _leaf_loras(loras, first)
        out = _run(blocks, h_in, loras, prompts)
        wrt = [h_in, *([prompts] if prompts is not None else []), *leaves.values()]
        grads = torch.autograd.grad(out, wrt, grad_outputs, allow_unused=True)
    if prompts is None and not leaves:
        return grads[0]
    grad_prompts = grads[1].cpu() if prompts is not None else None
    tensor_grads = grads[1 + (prompts is not None) :]
    adapter_grads = {
        name: (g if g is not None else torch.zeros_like(leaf)).to("cpu", torch.float32)
        for (name, leaf), g in zip(leaves.items(), tensor_grads, strict=True)
    }
    return BackwardResult(grads[0].cpu(), grad_prompts, adapter_grads)


def _train_backward(
    blocks: list[LlamaBlock], on_gradients: OnGradients, step: int | None, inputs: list[Tensor]
) -> Result:
    """Training: d(loss)/d(inputs), and the weights' gradients handed to the optimizer hook.

    Runs on the worker thread, so no forward pass reads the weights while the hook (the
    optimizer) changes them.
    """
    hidden, grad_outputs = inputs
    params = [p for block in blocks for p in block.parameters()]
    with torch.enable_grad():
        h_in = hidden.detach().requires_grad_(True)
        out = _run(blocks, h_in, [None] * len(blocks), None)
        grad_in, *grads = torch.autograd.grad(out, [h_in, *params], grad_outputs, allow_unused=True)
    on_gradients(
        [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)],
        hidden.shape[0],
        step,
    )
    return grad_in


def _leaf_loras(loras: Loras, first: int) -> tuple[dict[str, Tensor], Loras]:
    """Copies of the adapter tensors that autograd tracks, by tensor name; blocks start at `first`."""
    leaves: dict[str, Tensor] = {}
    tracked: Loras = []
    for i, lora in enumerate(loras):
        if lora is None:
            tracked.append(None)
            continue
        pairs = {}
        for projection, (a, b) in lora.pairs.items():
            a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            leaves[tensor_name(first + i, projection, "A")] = a
            leaves[tensor_name(first + i, projection, "B")] = b
            pairs[projection] = (a, b)
        tracked.append(BlockLora(pairs, lora.scaling))
    return leaves, tracked


def _step(
    blocks: list[LlamaBlock], caches: list[LayerCache], loras: Loras, position: int, inputs: list[Tensor]
) -> Tensor:
    h, *prompts = inputs
    with torch.inference_mode():
        return _run(blocks, h, loras, prompts[0] if prompts else None, position, caches)


class BlockBackend:
    """The blocks [start, end) of one model on one device, behind a `ComputeWorker`.

    batching/batch_tokens: merge queued forward (and backward) requests of the same span and
    length into batches of up to batch_tokens tokens (batch x length); a larger request runs
    alone. on_batch: see `OnBatch`. forward/backward/step take an optional `deadline`
    (`time.monotonic()` seconds) past which the request is dropped unrun.
    """

    def __init__(
        self,
        config: LlamaConfig,
        blocks: list[LlamaBlock],
        start: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        cache_bytes: int,
        cache_share: float = 1.0,
        adapter_bytes: int = 256 << 20,
        batching: bool = True,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        on_batch: OnBatch | None = None,
        on_gradients: OnGradients | None = None,
        slowdown: float = 1.0,
    ) -> None:
        self.config = config
        self.blocks = blocks
        # Serving: Backward computes input gradients only. Training (on_gradients set): Backward
        # also hands the weights' gradients to on_gradients.
        self.on_gradients = on_gradients
        for block in blocks:
            block.requires_grad_(on_gradients is not None)
        self.start, self.end = start, start + len(blocks)
        self.dtype, self.device = dtype, device
        self.budget = CacheBudget(cache_bytes, cache_share)
        self.adapters = AdapterCache(adapter_bytes, cache_share)  # client LoRA adapters for this span
        self.sessions: dict[int, InferenceSession] = {}
        self.worker = ComputeWorker(
            device, dtype, batching=batching, batch_tokens=batch_tokens, on_batch=on_batch, slowdown=slowdown
        )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Fail queued requests with BackendClosed and stop the worker (a running batch finishes)."""
        self.worker.close(timeout)

    async def state(self, also: Callable[[], T]) -> tuple[dict[str, Tensor], T]:
        """The blocks' weights by transformers name ('model.layers.3.mlp.up_proj.weight'), copied to
        the CPU on the worker thread, so no optimizer step changes them halfway through the copy;
        and `also()`, read at the same moment (e.g. the optimizer's epoch)."""

        def copy() -> tuple[dict[str, Tensor], T]:
            weights = {
                f"{hf_block_prefix(self.start + i)}{name}": t.detach().to("cpu", copy=True)
                for i, block in enumerate(self.blocks)
                for name, t in block.state_dict().items()
            }
            return weights, also()

        return await self.worker.call(copy)

    def queue_depth(self) -> dict[str, int]:
        """Requests waiting (not running) by kind: 'inference', 'forward', 'backward'."""
        return self.worker.depth()

    def _blocks(self, start: int, end: int) -> list[LlamaBlock]:
        if not (self.start <= start < end <= self.end):
            raise ProtocolError(
                f"this node serves blocks {self.start}:{self.end}, the request asks for {start}:{end}"
            )
        return self.blocks[start - self.start : end - self.start]

    def _check_hidden(self, hidden: Tensor, what: str = "hidden_states") -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ProtocolError(
                f"{what} must be [batch, length, {self.config.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise ProtocolError(f"{what} must be a floating-point tensor, got {hidden.dtype}")

    def _check_prompts(self, prompts: Tensor | None, start: int, end: int, batch: int) -> None:
        if prompts is None:
            return
        shape = list(prompts.shape)
        if (
            prompts.dim() != 4
            or shape[0] != end - start
            or shape[1] not in (1, batch)
            or shape[3] != self.config.hidden_size
            or not prompts.is_floating_point()
        ):
            raise ProtocolError(
                f"prompts must be float [span blocks {end - start}, batch {batch} or 1, prefix, "
                f"{self.config.hidden_size}], got {prompts.dtype} {shape}"
            )

    def _loras(self, adapter: Adapter | None, start: int, end: int) -> Loras:
        return (
            [None] * (end - start) if adapter is None else [adapter.blocks.get(i) for i in range(start, end)]
        )

    async def forward(
        self,
        hidden: Tensor,
        start: int,
        end: int,
        *,
        adapter: Adapter | None = None,
        prompts: Tensor | None = None,
        deadline: float | None = None,
    ) -> Tensor:
        blocks = self._blocks(start, end)
        self._check_hidden(hidden)
        self._check_prompts(prompts, start, end, hidden.shape[0])
        # Requests with one adapter batch together; deep prompts are per request, so those run alone.
        key = (start, end, hidden.shape[1], adapter.hash if adapter else "") if prompts is None else None
        compute = partial(_forward, blocks, self._loras(adapter, start, end))
        inputs = [hidden] if prompts is None else [hidden, prompts]
        out = await self.worker.submit(FORWARD, inputs, compute, key=key, deadline=deadline)
        assert isinstance(out, Tensor)  # forward computes a tensor
        return out

    async def backward(
        self,
        hidden: Tensor,
        grad_outputs: Tensor,
        start: int,
        end: int,
        *,
        adapter: Adapter | None = None,
        prompts: Tensor | None = None,
        deadline: float | None = None,
        step: int | None = None,
        accumulate: bool = True,
    ) -> BackwardResult:
        """Stateless backward: recompute the span's forward under autograd; gradients of the inputs,
        and of the prompts and adapter tensors when the request has them. `step`: a training
        request's optimizer step tag, handed to on_gradients. `accumulate=False` (a client's spot
        check of another server): a training node computes but adds nothing to its stage's gradients."""
        blocks = self._blocks(start, end)
        self._check_hidden(hidden)
        self._check_hidden(grad_outputs, "grad_outputs")
        if grad_outputs.shape != hidden.shape:
            raise ProtocolError(
                f"grad_outputs shape {list(grad_outputs.shape)} != hidden_states shape {list(hidden.shape)}"
            )
        self._check_prompts(prompts, start, end, hidden.shape[0])
        # Merged requests would sum their adapter (and prompt) gradients: tuned ones run alone, and
        # so does training, whose optimizer counts samples per request.
        alone = adapter is not None or prompts is not None or self.on_gradients is not None
        key = None if alone else (start, end, hidden.shape[1])
        compute = partial(_backward, blocks, start, self._loras(adapter, start, end))
        if self.on_gradients is not None and accumulate:
            if (start, end) != (self.start, self.end):
                raise ProtocolError(
                    f"a training node runs its whole stage {self.start}:{self.end}, not {start}:{end}"
                )
            compute = partial(_train_backward, blocks, self.on_gradients, step)
        inputs = [hidden, grad_outputs] if prompts is None else [hidden, grad_outputs, prompts]
        out = await self.worker.submit(BACKWARD, inputs, compute, key=key, deadline=deadline)
        if isinstance(out, BackwardResult):
            return out
        assert isinstance(out, Tensor)  # a plain backward computes the input gradient alone
        return BackwardResult(out)

    def open_session(
        self,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        adapter: Adapter | None = None,
        owner: str | None = None,
    ) -> InferenceSession:
        blocks = self._blocks(start, end)
        per_block = LayerCache.bytes_needed(self.config, batch_size, max_length, self.dtype)
        nbytes = per_block * len(blocks)
        self.budget.reserve(nbytes, owner)
        try:
            caches = [
                LayerCache(self.config, batch_size, max_length, self.dtype, self.device) for _ in blocks
            ]
        except BaseException:
            self.budget.release(nbytes, owner)
            raise
        # The session holds its adapter: evicting it from the node's cache does not break the session.
        session = InferenceSession(start, end, batch_size, max_length, caches, nbytes, adapter, owner)
        self.sessions[session.id] = session
        return session

    def close_session(self, session: InferenceSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            session.caches.clear()
            self.budget.release(session.nbytes, session.owner)

    async def step(
        self,
        session: InferenceSession,
        hidden: Tensor,
        position: int,
        *,
        prompts: Tensor | None = None,
        deadline: float | None = None,
        keep: int | None = None,
    ) -> Tensor:
        """Append `hidden` at `position`; with `keep`, first drop every cached token from `keep` on
        (drafts the client rejected: speculative decoding), so that `position` must equal `keep`."""
        self._check_hidden(hidden)
        self._check_prompts(prompts, session.start, session.end, session.batch_size)
        batch, new_tokens, _ = hidden.shape
        if batch != session.batch_size:
            raise ProtocolError(f"session was opened for batch {session.batch_size}, step has batch {batch}")
        if keep is not None:
            if keep > session.length:
                raise ProtocolError(
                    f"step asks to keep {keep} tokens, but this session holds {session.length}"
                )
            # Steps of one session run one at a time (the stream awaits each), so no step of this
            # session is computing while its caches shrink.
            for cache in session.caches:
                cache.truncate(keep)
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
        # The caches are captured now: close_session may clear the list while the step runs.
        caches = list(session.caches)
        compute = partial(
            _step, blocks, caches, self._loras(session.adapter, session.start, session.end), position
        )
        inputs = [hidden] if prompts is None else [hidden, prompts]
        out = await self.worker.submit(INFERENCE, inputs, compute, deadline=deadline)
        assert isinstance(out, Tensor)  # a step computes a tensor
        return out
