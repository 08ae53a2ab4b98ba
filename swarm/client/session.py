"""An inference session through a pipeline of remote spans, with failover.

The session keeps, per hop, every input it has sent. When a hop fails, its peer is
banned for the session, only that span is re-routed, and the stored inputs are replayed
to rebuild the KV cache on the replacement before the current step continues. The same
greedy prompt therefore gives the same tokens with or without a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from functools import partial
from itertools import pairwise

import torch

from swarm import receipts, wire
from swarm._proto import swarm_pb2
from swarm.client.config import ClientConfig
from swarm.client.lora import RemoteLora
from swarm.client.remote import ChannelPool, InferenceStream, Tuning, call_forward, forward_request
from swarm.client.verify import Rerun, SpotChecker
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop, min_latency_route
from swarm.coordinator.rtt import RttTable
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.coordinator.trust import agree, first_disagreement
from swarm.errors import MissingBlocksError, PeerUnavailable, RemoteError, SwarmError

log = logging.getLogger(__name__)

# Steps of up to this many tokens are decoding steps (one token, or a speculative verification of
# a few drafts): their time is tracked, and a hung peer is caught by a deadline derived from it.
# Longer ones (prompts, replays) get the general request timeout.
SHORT_STEP_TOKENS = 16


class InferenceSession:
    def __init__(
        self,
        pool: ChannelPool,
        swarm_map: SwarmMapCache,
        config: ClientConfig,
        *,
        batch_size: int,
        max_length: int,
        bans: BanList | None = None,
        rtts: RttTable | None = None,
        adapter: RemoteLora | None = None,
        prompts: torch.Tensor | None = None,
        checker: SpotChecker | None = None,
    ) -> None:
        self.pool, self.swarm_map, self.config = pool, swarm_map, config
        # Tuning of every hop: the client's LoRA, and deep prompts [num_blocks, batch or 1, prefix,
        # hidden] that each stream sends with the steps reaching into the prefix (replays included).
        self.adapter = adapter
        self.prompts = prompts.detach() if prompts is not None else None
        self.batch_size, self.max_length = batch_size, max_length
        self.streams: list[InferenceStream] = []
        self.history: list[list[torch.Tensor]] = []  # inputs sent to each stream, in order
        self.outputs: list[list[torch.Tensor]] = []  # what each stream answered, in order
        # Spot checks: a check re-runs a stream's whole input so far on another server, without
        # cache, and compares every position it answered. Checks run beside the token loop; one
        # that convicts the stream's server records the first wrong position in `rollback`, and
        # generate() redoes the tokens from there (`restart`).
        self.checker = checker
        self.verified: dict[InferenceStream, int] = {}  # positions of each stream checked right
        self._checks: dict[InferenceStream, asyncio.Task[None]] = {}
        self._shadows: dict[InferenceStream, InferenceStream] = {}  # each stream's checker, once needed
        self.wrong_from: int | None = None  # first position a convicted server answered wrong
        self._rollbacks: list[int] = []  # every rollback's `keep`, in order (see _check)
        self._shadow_inputs: dict[InferenceStream, torch.Tensor] = {}  # what each shadow holds
        self.step_seconds: list[float | None] = []  # each stream's usual decoding step time
        self.banned: set[str] = set()  # never again in this session
        self.bans = bans if bans is not None else BanList(config.ban_base, config.ban_limit)
        self.rtts = rtts if rtts is not None else RttTable()
        self.position = 0
        # Server-to-server push (ClientConfig.push): not with deep prompts, whose per-hop prompts
        # ride on the client's own messages; off for good after a push that did not add up.
        self._push_off = not config.push or self.prompts is not None
        self.push_fallbacks = 0  # pushed steps whose input the client had to send itself

    def _avoid(self) -> frozenset[str]:
        return frozenset(self.banned) | self.bans.banned()

    async def _route(self, start: int = 0, end: int | None = None) -> list[Hop]:
        """The fastest route by measured RTT, over servers with room for this session's cache."""
        snapshot = await self.swarm_map.get(refresh=start != 0 or end is not None)
        rtt = await self.rtts.measure(snapshot.index.servers, self.pool.stub)  # the online ones
        avoid = self._avoid()
        try:
            return min_latency_route(
                snapshot, start, end, banned=avoid, rtt=rtt, cache_tokens=self.batch_size * self.max_length
            )
        except MissingBlocksError:
            # Free cache is announced every few seconds and may be stale; a node that is really
            # full refuses the session with RESOURCE_EXHAUSTED and the retry goes elsewhere.
            return min_latency_route(snapshot, start, end, banned=avoid, rtt=rtt)

    async def open(self) -> None:
        self.streams = [self._stream(hop) for hop in await self._route()]
        self.history = [[] for _ in self.streams]
        self.outputs = [[] for _ in self.streams]
        self.step_seconds = [None for _ in self.streams]

    def _stream(self, hop: Hop) -> InferenceStream:
        tuning = Tuning(
            self.adapter.payload(hop.start, hop.end) if self.adapter is not None else None,
            self.prompts[hop.start : hop.end] if self.prompts is not None else None,
        )
        return InferenceStream(
            self.pool,
            self.swarm_map.model,
            hop,
            self.config,
            self.batch_size,
            self.max_length,
            tuning,
            push=not self._push_off,
        )

    @property
    def route(self) -> list[str]:
        return [f"{s.hop.peer_id}[{s.hop.start}:{s.hop.end}]" for s in self.streams]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run new hidden states [batch, new_tokens, hidden] through every block of the model."""
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(
                f"inference session max_length {self.max_length} exceeded: holds {self.position}, "
                f"step adds {hidden.shape[1]}"
            )
        if self._can_push():
            out = await self._pushed_step(hidden)
        else:
            out, i = hidden, 0
            while i < len(self.streams):  # the list grows when a failed span is re-routed
                out = (await self._hop(i, out, None, None))[0]
                i += 1
        self.position += hidden.shape[1]
        return out

    def _can_push(self) -> bool:
        """Push this step? Some two consecutive hops must take pushes (older nodes do not), and
        every hop must hold the session's tokens (one that failed a step is re-routed plainly first)."""
        streams = self.streams
        return (
            not self._push_off
            and any(a.accepts_push and b.accepts_push for a, b in pairwise(streams))
            and all(s.position == self.position for s in streams)
        )

    def _dial_next(self, i: int) -> swarm_pb2.PushTarget | None:
        """On the plain path, let hop i open its push link to the next hop ahead of the first
        pushed step (a session's first step does this), so that step finds it ready."""
        if self._push_off or i + 1 >= len(self.streams) or self.streams[i + 1].accepts_push:
            return None
        return self.streams[i + 1].push_target(dial_only=True)

    async def _pushed_step(self, hidden: torch.Tensor) -> torch.Tensor:
        """One step with server-to-server push: the client sends the input to the first hop and
        tells every hop that the hop before pushes to (both take pushes) that its input comes by
        push (each such hop's step names the next hop's session as its PushTarget). Then it reads
        every hop's answer in route order, sending an input itself where a push did not happen
        (and to a hop after one that does not push), and re-routing a hop that fails as in the
        plain path."""
        streams, tokens = list(self.streams), hidden.shape[1]
        targets: dict[InferenceStream, swarm_pb2.PushTarget] = {
            a: b.push_target() for a, b in pairwise(streams) if a.accepts_push and b.accepts_push
        }
        first = wire.encode_tensor(hidden, self.config.codec)
        expects: dict[InferenceStream, bool] = {}  # sent this step; True: its input comes by push
        try:
            for i, stream in enumerate(streams):
                fed = i > 0 and streams[i - 1] in targets
                if i == 0 or fed:
                    await stream.send(None if fed else first, tokens, targets.get(stream))
                    expects[stream] = fed
        except SwarmError as e:  # this stream (and those after it) take the plain path below
            log.debug("could not send a pushed step: %s", e)
        out, out_msg = hidden, first
        delivered = False  # whether the previous hop pushed its output to the current one
        i = 0
        while i < len(self.streams):
            out, reply = await self._hop(i, out, out_msg, (expects, delivered), targets)
            nxt = self.streams[i + 1] if i + 1 < len(self.streams) else None
            delivered = reply.pushed and nxt is not None and expects.get(nxt, False)
            out_msg = reply.hidden_states
            i += 1
        return out

    async def _hop(
        self,
        i: int,
        x: torch.Tensor,
        x_msg: swarm_pb2.Tensor | None,
        pushed: tuple[dict[InferenceStream, bool], bool] | None,
        targets: dict[InferenceStream, swarm_pb2.PushTarget] | None = None,
    ) -> tuple[torch.Tensor, swarm_pb2.InferenceResponse]:
        """Stream i's answer for input x (x_msg: as the previous hop answered it), retried on other
        servers of its span (re-routed, inputs replayed) when it fails. `pushed`: the streams sent
        this step already and whether x was pushed to stream i (None: a plain step); `targets`: where
        each stream pushes its output this step (a stream not sent yet still pushes when it runs)."""
        sent = pushed[0].pop(self.streams[i], None) if pushed is not None else None
        delivered = pushed is not None and pushed[1]
        failure: SwarmError | None = None  # the previous attempt's

        async def attempt(n: int) -> swarm_pb2.InferenceResponse:
            nonlocal failure
            if n > 1:
                await self._reroute(i, refused=isinstance(failure, RemoteError) and failure.over_a_limit)
            try:
                return await answer(n)
            except SwarmError as e:
                failure = e
                raise

        async def answer(n: int) -> swarm_pb2.InferenceResponse:
            stream = self.streams[i]
            if n > 1 or sent is None or x_msg is None:
                push = (targets or {}).get(stream) if n == 1 else None
                push = push or self._dial_next(i)
                return await self._timed(i, x.shape[1], stream.step_reply(x, push))
            if sent and not delivered:  # the previous hop did not push: send the input ourselves
                self.push_fallbacks += 1
                await stream.send_copy(x_msg)
            reply = await self._timed(i, x.shape[1], stream.receive())
            if sent and reply.input_sha256 != receipts.message_digest(x_msg):
                self._push_off = True  # whoever is wrong, this session stops trusting pushes
                raise PeerUnavailable(
                    f"{stream.hop.peer_id} computed a step on another input than the previous hop "
                    "answered (a wrong push?); re-routing it, and pushing no more in this session"
                )
            return reply

        reply = await self.config.retry.run(attempt)
        out = wire.decode_tensor(reply.hidden_states)
        self.history[i].append(x)
        self.outputs[i].append(out)
        stream, checker = self.streams[i], self.checker
        if checker is not None and stream not in self._checks and checker.sample_stream(stream.hop.peer_id):
            self._schedule_check(i)
        return out, reply

    def rollback(self, keep: int) -> None:
        """Forget every token from position `keep` on (drafts the client rejected).

        Each stream tells its node with its next step (no extra round trip), and each hop's stored
        inputs are cut to `keep` tokens, so a replacement after a failure replays accepted tokens only.
        """
        if not 0 <= keep <= self.position:
            raise SwarmError(f"cannot keep {keep} tokens of a session holding {self.position}")
        for i, stream in enumerate(self.streams):
            stream.rollback(keep)
            _truncate(self.history[i], keep)
            _truncate(self.outputs[i], keep)
            self.verified[stream] = min(self.verified.get(stream, 0), keep)
        self._rollbacks.append(keep)  # a check in flight verifies nothing past it (see _check)
        self.position = keep

    async def _timed(
        self, i: int, tokens: int, answer: Awaitable[swarm_pb2.InferenceResponse]
    ) -> swarm_pb2.InferenceResponse:
        """Await stream i's answer under a deadline derived from its own measured step time (with
        push: the time from the previous hop's answer to this one's)."""
        stream, usual = self.streams[i], self.step_seconds[i]
        short = tokens <= SHORT_STEP_TOKENS
        if short and usual is not None:
            deadline = max(self.config.step_timeout_floor, self.config.step_timeout_factor * usual)
        else:  # a prompt, or no measurement yet: the general request timeout
            deadline = self.config.request_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline):  # not wait_for: no extra task per hop and token
                out = await answer
        except TimeoutError:
            raise PeerUnavailable(
                f"{stream.hop.peer_id} did not answer a step within {deadline:.1f} s (hung?)"
            ) from None
        took = time.monotonic() - started
        self.bans.forgive(stream.hop.peer_id)  # it answers: a later failure starts a short ban again
        if usual is None:  # a prompt takes longer than a decoding step: a safe first estimate
            self.step_seconds[i] = took
        elif short:  # a moving average, so one slow step does not make the deadline jumpy
            self.step_seconds[i] = 0.8 * usual + 0.2 * took
        return out

    async def _reroute(self, i: int, refused: bool = False) -> None:
        """Replace stream i (whose peer just failed) by a fresh route over the same span. `refused`:
        the peer refused this session as over one of its limits (a longer session than it takes, a
        full cache): it is avoided in this session only, not banned for the client's other work."""
        failed = self.streams[i]
        if failed.hop.peer_id not in self.banned and not refused:  # one failure, one ban: no stacking
            self.bans.ban(failed.hop.peer_id)
        self.banned.add(failed.hop.peer_id)
        await failed.close()
        hops = await self._route(failed.hop.start, failed.hop.end)
        log.warning(
            "peer %s %s; re-routing blocks %d:%d via %s",
            failed.hop.peer_id,
            "refused the session (over one of its limits)" if refused else "failed",
            failed.hop.start,
            failed.hop.end,
            [h.peer_id for h in hops],
        )
        replacements = [self._stream(hop) for hop in hops]
        histories: list[list[torch.Tensor]] = []
        outputs: list[list[torch.Tensor]] = []
        past = torch.cat(self.history[i], dim=1) if self.history[i] else None
        for stream in replacements:
            histories.append([past] if past is not None else [])
            if past is None:
                outputs.append([])
            else:
                try:
                    past = await stream.step(past)
                except SwarmError:
                    self.banned.add(stream.hop.peer_id)
                    self.bans.ban(stream.hop.peer_id)
                    for s in replacements:
                        await s.close()
                    raise
                outputs.append([past])
        self.streams[i : i + 1] = replacements
        self.history[i : i + 1] = histories
        self.outputs[i : i + 1] = outputs
        self.step_seconds[i : i + 1] = [None] * len(replacements)

    # ---- spot checks -----------------------------------------------------------------------

    def _schedule_check(self, i: int) -> None:
        stream = self.streams[i]  # what it was sent and answered so far: a snapshot, as lists grow
        task = self._check(stream, list(self.history[i]), list(self.outputs[i]), len(self._rollbacks))
        self._checks[stream] = asyncio.create_task(task)

    async def _check(
        self, stream: InferenceStream, history: list[torch.Tensor], outputs: list[torch.Tensor], mark: int
    ) -> None:
        """Check a stream's answers since its last check against a *shadow* stream: a session of its
        own on another server of the span, fed the same inputs (only the new ones each time, so a
        check costs one batched step there). On a mismatch a referee recomputes the whole input
        without cache; if the stream's server is convicted, its first wrong position goes to
        `rollback`."""
        assert self.checker is not None  # only scheduled with a checker
        checker, config, hop = self.checker, self.config, stream.hop
        try:
            inputs, answered = torch.cat(history, dim=1), torch.cat(outputs, dim=1)
            shadow = self._shadows.get(stream) or await self._open_shadow(stream)
            if shadow is None:
                return  # no other server of the span: nothing to compare with
            fed = self._shadow_prefix(stream, shadow, inputs)
            if fed >= inputs.shape[1]:
                return  # nothing the shadow has not seen (a rollback cut the rest)
            try:
                second = Rerun(shadow.hop.server, await shadow.step(inputs[:, fed:]), None)
                self._shadow_inputs[stream] = inputs
            except SwarmError as e:  # a failing checker is no verdict on the checked server
                log.debug("shadow of %s on %s failed: %s", hop.peer_id, shadow.hop.peer_id, e)
                await self._drop_shadow(stream)
                return
            checker.checks += 1
            rerun = partial(self._fresh_forward, stream, inputs, fed)
            referees = partial(checker.others, hop.start, hop.end, {hop.peer_id, shadow.hop.peer_id})
            judged = await checker.settle(hop, answered[:, fed:], second, rerun, referees, codec=config.codec)
            if judged.checked_lied:
                tol = checker.tolerance([hop.server], config.codec)
                bad = first_disagreement(answered[:, fed:], judged.output, tol)
                bad = fed + (bad or 0)
                self.wrong_from = bad if self.wrong_from is None else min(self.wrong_from, bad)
            elif checker.bans.convicted(shadow.hop.peer_id) or not agree(
                answered[:, fed:],
                second.output,
                checker.tolerance([hop.server, shadow.hop.server], config.codec),
            ):
                await self._drop_shadow(stream)  # the shadow lied, or nobody could tell: a new one
            else:
                checker.policy.passed(hop.peer_id, max(0, len(history) - 1))
                # A rollback since the snapshot (speculative decoding) replaced what came after its
                # `keep`: those positions hold other tokens now, not the ones checked here.
                good = min([answered.shape[1], *self._rollbacks[mark:]])
                self.verified[stream] = max(self.verified.get(stream, 0), good)
        except SwarmError as e:  # a check that cannot run is no verdict
            log.debug("spot check of %s failed: %s", hop.peer_id, e)
        finally:
            self._checks.pop(stream, None)

    async def _open_shadow(self, stream: InferenceStream) -> InferenceStream | None:
        assert self.checker is not None
        others = await self.checker.others(stream.hop.start, stream.hop.end, {stream.hop.peer_id})
        if not others:
            return None
        hop = Hop(others[0], stream.hop.start, stream.hop.end)
        shadow = InferenceStream(
            self.pool, self.swarm_map.model, hop, self.config, self.batch_size, self.max_length, stream.tuning
        )
        self._shadows[stream] = shadow
        return shadow

    def _shadow_prefix(self, stream: InferenceStream, shadow: InferenceStream, inputs: torch.Tensor) -> int:
        """How much of `inputs` the shadow already holds. After a rollback (speculative decoding's
        rejected drafts) it may hold inputs the stream no longer has: the shadow drops those too."""
        held = self._shadow_inputs.get(stream)
        if held is None:
            return shadow.position
        n = min(held.shape[1], inputs.shape[1])
        same = (held[:, :n] == inputs[:, :n]).flatten(2).all(dim=2).all(dim=0)  # per position
        common = n if bool(same.all()) else int((~same).nonzero()[0])
        if common < shadow.position:
            shadow.rollback(common)
            self._shadow_inputs[stream] = held[:, :common]
        return common

    async def _drop_shadow(self, stream: InferenceStream) -> None:
        self._shadow_inputs.pop(stream, None)
        shadow = self._shadows.pop(stream, None)
        if shadow is not None:
            await shadow.close()

    async def _fresh_forward(
        self, stream: InferenceStream, inputs: torch.Tensor, since: int, referee: Hop
    ) -> Rerun[None]:
        """The referee's answer: the stream's whole input recomputed without cache (one Forward),
        from position `since` on."""
        model, config = self.swarm_map.model, self.config
        request = forward_request(model, referee, inputs, config, stream.tuning)
        request.header.check = True
        response = await call_forward(self.pool, model, referee, request, config, stream.tuning.adapter)
        return Rerun(referee.server, wire.decode_tensor(response.hidden_states)[:, since:], None)

    async def verify(self) -> None:
        """Check every stream's answers not yet checked (called once a generation is complete)."""
        if self.checker is None:
            return
        await asyncio.gather(*self._checks.values(), return_exceptions=True)
        for i, stream in enumerate(self.streams):
            held = sum(x.shape[1] for x in self.history[i])
            if held > self.verified.get(stream, 0) and stream not in self._checks:
                self._schedule_check(i)
        await asyncio.gather(*self._checks.values(), return_exceptions=True)

    def take_rollback(self) -> int | None:
        """The first position a convicted server answered wrong since the last call, if any."""
        bad, self.wrong_from = self.wrong_from, None
        return bad

    async def restart(self) -> None:
        """Drop every stream and open a new route (convicted servers are banned): the caller feeds
        the session again from position 0."""
        await self._cancel_checks()
        for stream in self.streams:
            await stream.close()
        self.position = 0
        self.verified = {}
        await self.open()

    async def _cancel_checks(self) -> None:
        checks, self._checks = list(self._checks.values()), {}
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        for stream in list(self._shadows):
            await self._drop_shadow(stream)

    async def close(self) -> None:
        await self._cancel_checks()
        for stream in self.streams:
            await stream.close()
        self.streams, self.history, self.outputs = [], [], []


def _truncate(history: list[torch.Tensor], keep: int) -> None:
    """Cut a hop's stored tensors (each [batch, tokens, hidden], in order) to their first `keep` tokens."""
    total = sum(x.shape[1] for x in history)
    while total > keep:
        last = history.pop()
        total -= last.shape[1]
        if total < keep:  # the cut falls inside this step's tokens
            history.append(last[:, : keep - total])
            total = keep
