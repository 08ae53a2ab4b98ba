"""Server-to-server push in inference sessions (client -> A -> B -> client).

The client tells node A, with each step, where the step's output goes next (a PushTarget: node B's
address, the certificate B's signed record pins, B's session id and the step's id there). A opens
one `Push` stream per session to B, over the same pinned TLS as every other dial (swarm.tls), and
writes each output to it right after computing it, before answering its own client. B's session,
opened with a push id, takes its inputs from two places: its client's stream (the step's position,
step id and `keep`, and, when a push failed, the client's own copy of the input) and pushes. It
computes each step once, on whichever copy of the input arrives first.

The address comes from the client, so a node dials it only once the swarm vouches for it
(PushGate): a signed, ONLINE record of this node's model, of the target's peer id, announcing the
target's address and certificate, whose span holds the block where this session's ends (the next
hop of a route). Anything else is refused before any connection is made: a client cannot turn
volunteers' nodes into dialers of arbitrary host:ports. Answers are cached briefly
(PUSH_CHECK_TTL), so a target costs one bounded DHT lookup (PUSH_CHECK_TIMEOUT) per TTL at most.

Everything here is bounded: pushes waiting in a session (MAX_QUEUED_PUSHES), client messages read
ahead (MAX_READ_AHEAD), the time a push write may take (PUSH_WRITE_TIMEOUT), channels to other
nodes (MAX_PUSH_CHANNELS). A push that cannot be made is never waited for: the answer says
`pushed: false` and the client sends the input itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final

import grpc
from hivemind.dht import DHT

from swarm import tls
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import LimitExceeded, ProtocolError, SwarmError
from swarm.records import ServerRecord, ServerState, fetch_records, latest_per_peer

log = logging.getLogger(__name__)

PUSH_ID_BYTES: Final = 16  # random: only the client and the previous node of its route know it
MAX_QUEUED_PUSHES: Final = 4  # a session runs one step at a time; a few may race ahead of it
MAX_READ_AHEAD: Final = 4  # client messages read from the stream before the session takes them
PUSH_WRITE_TIMEOUT: Final = 1.0  # seconds; a write blocks only when the next node stopped reading
PUSH_DIAL_TIMEOUT: Final = 5.0  # seconds to take the next node's certificate and open the channel
MAX_PUSH_CHANNELS: Final = 64  # channels to other nodes kept open, least recently used first out
GRPC_OPTIONS: Final = (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000))
PUSH_CHECK_TTL: Final = 30.0  # seconds a push target's check (either answer) is reused
PUSH_CHECK_TIMEOUT: Final = 5.0  # seconds for the DHT lookup; a target not vouched for in time is refused
MAX_PUSH_CHECKS: Final = 1024  # cached answers, least recently checked first out

# Whether this node may dial a push target for a session ending at block `next_block`.
Allowed = Callable[[swarm_pb2.PushTarget, int], Awaitable[bool]]
Key = tuple[str, str, str, int]  # a push target's (peer id, address, pin, next block)
# The signed records of one block of this node's model (records.fetch_records).
Lookup = Callable[[int], Awaitable[list[ServerRecord]]]


class _End:
    """The client's stream ended (`error`: how, when it failed)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


Item = swarm_pb2.InferenceRequest | swarm_pb2.PushMessage | _End


class SessionInbox:
    """The inputs of one push-enabled session: its client's messages and the pushes for it, in one
    queue read by the session's handler. One reader task per session (not per step) moves the
    client's messages in, so the handler can wait on both sources at once."""

    def __init__(self, requests: AsyncIterator[swarm_pb2.InferenceRequest]) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_READ_AHEAD)  # client messages in the queue
        self._pushes = 0  # pushes in the queue
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[swarm_pb2.InferenceRequest]) -> None:
        try:
            async for request in requests:
                await self._room.acquire()  # a client far ahead waits on gRPC's flow control
                self._queue.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream broke: the handler ends the session
            self._queue.put_nowait(_End(e))
        else:
            self._queue.put_nowait(_End(None))

    def deliver(self, message: swarm_pb2.PushMessage) -> None:
        """Queue a push (called by the Push handler); LimitExceeded when too many wait already."""
        if self._pushes >= MAX_QUEUED_PUSHES:
            raise LimitExceeded(
                f"{self._pushes} pushes already wait for this session (at most {MAX_QUEUED_PUSHES})"
            )
        self._pushes += 1
        self._queue.put_nowait(message)

    async def get(self) -> swarm_pb2.InferenceRequest | swarm_pb2.PushMessage | None:
        """The next client message or push; None when the client's stream ended."""
        item = await self._queue.get()
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            return None
        if isinstance(item, swarm_pb2.PushMessage):
            self._pushes -= 1
        else:
            self._room.release()
        return item

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class PushInputs:
    """Which step of a push-enabled session is waiting for its input, and pushes that came before
    their step's message: pure bookkeeping, so the handler reads as one loop."""

    def __init__(self) -> None:
        self.waiting: swarm_pb2.InferenceStep | None = None  # a `pushed` step without its input yet
        self.last_pushed = 0  # step id of the last `pushed` step computed (late copies are dropped)
        self._early: OrderedDict[int, swarm_pb2.Tensor] = OrderedDict()

    def on_push(self, message: swarm_pb2.PushMessage) -> swarm_pb2.Tensor | None:
        """The input for the waiting step, if this push carries it; else kept (or dropped if stale)."""
        if message.step_id <= self.last_pushed:
            return None  # the client's copy came first
        if self.waiting is not None and message.step_id == self.waiting.step_id:
            return message.hidden_states
        self._early[message.step_id] = message.hidden_states
        while len(self._early) > MAX_QUEUED_PUSHES:  # only a confused pusher gets here
            self._early.popitem(last=False)
        return None

    def on_step(self, step: swarm_pb2.InferenceStep) -> tuple[swarm_pb2.Tensor | None, bool]:
        """(input to compute `step` on now, or None to wait; whether that input came by push)."""
        if self.waiting is not None:
            if step.step_id != self.waiting.step_id or step.pushed:
                raise ProtocolError(
                    f"step {step.step_id} sent while step {self.waiting.step_id} still waits for its input"
                )
            return step.hidden_states, False  # the client's own copy
        if step.pushed:
            early = self._early.pop(step.step_id, None)
            if early is None:
                self.waiting = step
            return early, early is not None
        return step.hidden_states, False

    def is_late_copy(self, step: swarm_pb2.InferenceStep) -> bool:
        """A client's copy of an input that a push already delivered (the step is computed)."""
        return self.waiting is None and not step.pushed and 0 < step.step_id <= self.last_pushed

    def computed(self, step_id: int) -> None:
        self.waiting = None
        self.last_pushed = step_id
        for stale in [s for s in self._early if s <= step_id]:
            del self._early[stale]


# ---- which targets a node dials ----------------------------------------------------------------


def record_mismatch(record: ServerRecord, target: swarm_pb2.PushTarget, next_block: int) -> str | None:
    """Why `record` does not vouch for `target` as the next hop of a session ending at `next_block`
    (None: it does). Pure, so that every rule is tested on its own."""
    if record.peer_id != target.peer_id:
        return f"its record is of peer {record.peer_id}, not {target.peer_id}"
    if record.grpc_address != target.address:
        return f"peer {record.peer_id} announces address {record.grpc_address}, not {target.address}"
    if (record.tls_cert_sha256 or "") != target.tls_cert_sha256:
        return (
            f"peer {record.peer_id} pins certificate {record.tls_cert_sha256 or 'none (plaintext)'}, "
            f"not {target.tls_cert_sha256 or 'none (plaintext)'}"
        )
    # Contains, not starts at: routes may enter a node's span mid-way (coordinator.routing), so the
    # next hop of a session ending at block 4 may be a node of blocks 2:8, used from block 4.
    if next_block not in record.blocks:
        return f"peer {record.peer_id} serves blocks {record.start}:{record.end}, not block {next_block}"
    if record.state != ServerState.ONLINE:
        return f"peer {record.peer_id} is {record.state.value}, not online"
    return None


def target_refusal(
    records: Iterable[ServerRecord], target: swarm_pb2.PushTarget, next_block: int
) -> str | None:
    """Why no record of block `next_block` vouches for `target` (None: its peer's newest one does)."""
    mine = [r for r in latest_per_peer(records) if r.peer_id == target.peer_id]
    if not target.peer_id or not mine:
        return f"no signed record of peer {target.peer_id or '(none)'} serves block {next_block}"
    return record_mismatch(mine[0], target, next_block)


def records_lookup(dht: DHT, model: str) -> Lookup:
    """Read one block's records of `model` from this node's DHT, bounded by PUSH_CHECK_TIMEOUT."""

    async def lookup(block: int) -> list[ServerRecord]:
        found = await fetch_records(dht, model, [block], timeout=PUSH_CHECK_TIMEOUT)
        return found.get(block, [])

    return lookup


async def refuse_all(target: swarm_pb2.PushTarget, next_block: int) -> bool:
    """The check of a node without a DHT to read records from: no target is vouched for."""
    return False


class PushGate:
    """`allowed(target, next_block)`: whether the swarm's signed records vouch for a push target
    (target_refusal). Both answers are cached for PUSH_CHECK_TTL (bounded), and concurrent checks
    of one target share one lookup, so sessions opening together pay one DHT lookup. A refused
    target is logged once (INFO), with the reason, not once per step or session."""

    def __init__(
        self,
        lookup: Lookup,
        *,
        ttl: float = PUSH_CHECK_TTL,
        max_entries: int = MAX_PUSH_CHECKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._answers: OrderedDict[Key, tuple[float, bool]] = OrderedDict()
        self._pending: dict[Key, asyncio.Future[bool]] = {}
        self._reported: set[Key] = set()
        self.lookups = 0  # DHT lookups made (the cache saves the rest)

    async def allowed(self, target: swarm_pb2.PushTarget, next_block: int) -> bool:
        key = (target.peer_id, target.address, target.tls_cert_sha256, next_block)
        cached = self._answers.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._check(key, target, next_block))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)  # one session giving up must not cancel the others' check

    async def _check(self, key: Key, target: swarm_pb2.PushTarget, next_block: int) -> bool:
        self.lookups += 1
        try:
            why = target_refusal(await self._lookup(next_block), target, next_block)
        except SwarmError as e:  # DHTError: the DHT is slow or gone; the client sends the input itself
            why = f"its record could not be read from the DHT ({e})"
        self._answers[key] = (self._clock() + self._ttl, why is None)
        self._answers.move_to_end(key)
        while len(self._answers) > self._max_entries:
            self._answers.popitem(last=False)
        if why is not None and key not in self._reported:
            if len(self._reported) >= self._max_entries:  # bounded: a flood of targets must not grow it
                self._reported.clear()
            self._reported.add(key)
            log.info(
                "not pushing to %s (peer %s) for sessions ending at block %d: %s; "
                "the client sends those inputs itself",
                target.address,
                target.peer_id or "(none)",
                next_block,
                why,
            )
        return why is None


class PushRefused(SwarmError):
    """The swarm's records do not vouch for a push target: it is not dialled (PushGate logged why)."""


# ---- channels and links -------------------------------------------------------------------------


class PushChannels:
    """Channels from this node to other nodes, pinned like every dial, shared by all sessions.
    Every dial goes through `allowed` first: a target the swarm does not vouch for is never dialled."""

    def __init__(self, allowed: Allowed = refuse_all) -> None:
        self._allowed = allowed
        self._channels: OrderedDict[tls.Endpoint, grpc.aio.Channel] = OrderedDict()

    async def stub(self, target: swarm_pb2.PushTarget, next_block: int) -> swarm_pb2_grpc.BlockServiceStub:
        """A stub on a channel to `target`; PushRefused (no connection made) when it is not allowed."""
        if not await self._allowed(target, next_block):  # cached: only a session's first step waits on it
            raise PushRefused(f"no signed record vouches for push target {target.address}")
        endpoint = tls.Endpoint(target.address, target.tls_cert_sha256 or None)
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = await tls.open_channel(
                target.address,
                endpoint.cert_sha256,
                peer=target.peer_id,
                options=GRPC_OPTIONS,
                timeout=PUSH_DIAL_TIMEOUT,
            )
            self._channels[endpoint] = channel
            while len(self._channels) > MAX_PUSH_CHANNELS:
                _, old = self._channels.popitem(last=False)
                await old.close()
        self._channels.move_to_end(endpoint)
        return swarm_pb2_grpc.BlockServiceStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, OrderedDict()
        for channel in channels.values():
            await channel.close()


class PushLink:
    """One session's push stream to the next node of its route. The dial runs beside the step's
    computation (one task per target, not per step); a step whose output is ready before the link
    is, or whose write fails, is not pushed and the answer says so."""

    def __init__(self, channels: PushChannels, next_block: int) -> None:
        self._channels = channels
        self._next_block = next_block  # where the session's span ends: the next hop's first block
        self._key: tuple[str, str, bytes] | None = None
        self._opening: asyncio.Task[Any] | None = None
        self._broken = False
        self.refused = False  # the target is not vouched for (not dialled): nothing to push to

    def prepare(self, target: swarm_pb2.PushTarget) -> None:
        """Start dialling `target` unless this link already goes (or went) there."""
        key = (target.address, target.tls_cert_sha256, target.push_id)
        if key == self._key:
            return
        self._drop()
        self._key, self._broken, self.refused = key, False, False
        self._opening = asyncio.create_task(self._open(target))

    async def _open(self, target: swarm_pb2.PushTarget) -> Any:
        stub = await self._channels.stub(target, self._next_block)
        return stub.Push()

    async def send(self, target: swarm_pb2.PushTarget, hidden: swarm_pb2.Tensor) -> bool:
        """Write `hidden` for `target`'s step; False (never an exception) when it cannot be pushed."""
        opening = self._opening
        if self._broken or opening is None or not opening.done():
            return False
        if not opening.cancelled() and isinstance(opening.exception(), PushRefused):
            self._broken = self.refused = True  # PushGate said why, once per target
            return False
        if opening.cancelled() or opening.exception() is not None:
            self._fail(f"could not open a push stream to {target.peer_id}: {opening.exception()}")
            return False
        message = swarm_pb2.PushMessage(push_id=target.push_id, step_id=target.step_id)
        message.hidden_states.CopyFrom(hidden)
        try:
            async with asyncio.timeout(PUSH_WRITE_TIMEOUT):
                await opening.result().write(message)
        except TimeoutError:
            self._fail(f"push to {target.peer_id} took over {PUSH_WRITE_TIMEOUT} s (it stopped reading)")
            return False
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self._fail(f"push stream to {target.peer_id} ended (the node went away, or closed the session)")
            return False
        return True

    def _fail(self, why: str) -> None:
        # The client sends the inputs itself from now on (it sees `pushed: false`): one line, no trace.
        if not self._broken:
            log.info("%s; the client sends this session's inputs itself", why)
        self._broken = True

    def _drop(self) -> None:
        opening, self._opening = self._opening, None
        if opening is None:
            return
        if not opening.done():
            opening.cancel()
        elif not opening.cancelled() and opening.exception() is None:
            opening.result().cancel()  # the next node's Push handler sees the stream end

    def close(self) -> None:
        self._drop()
        self._key = None
