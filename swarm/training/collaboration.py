"""One peer of a training collaboration: its side of the leader-led averaging (see averaging.py).

`Collaboration.run` is the peer's loop (on the process's event loop): publish membership,
follow or lead, report, run rounds, catch up; its `on_*` methods answer the mates' calls, which
swarm.training.peers.AveragingServicer receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

import swarm
from swarm import tls, wire
from swarm._proto import swarm_pb2, swarm_pb2_grpc
from swarm.errors import PeerUnavailable, SwarmError
from swarm.retry import RetryPolicy
from swarm.training.averaging import (
    Accumulator,
    AveragingConfig,
    Exclusive,
    LocalState,
    choose_leader,
    same_weights,
    weighted_mean,
)
from swarm.training.diloco import ErrorFeedback, outer_between, outer_due
from swarm.training.peers import DHTMembership

log = logging.getLogger("swarm.training")

TICK = 0.05  # seconds between looks at the round when nothing wakes the loop
MEMBERSHIP_PERIOD = 2.0
CHUNK_TENSORS = 16  # tensors per DownloadState message
STATE_RETRY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=4.0)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


@dataclass
class Frozen:
    """Gradients handed to a leader's Collect, kept until its Apply (or put back if it never comes)."""

    epoch: int
    sums: list[torch.Tensor] | None
    samples: int
    since: float = field(default_factory=time.monotonic)
    # diloco outer round: the inner step is taken and this delta sent (a retried Collect gets it again)
    reply: swarm_pb2.CollectResponse | None = None


def mean_of(sums: list[torch.Tensor] | None, samples: int) -> list[torch.Tensor] | None:
    return None if sums is None or samples <= 0 else [s / samples for s in sums]


@dataclass
class RoundStats:
    steps: int = 0
    sent_bytes: int = 0  # averaging rounds (Collect, Apply)
    received_bytes: int = 0
    state_sent_bytes: int = 0  # whole states handed to peers that join or fell behind
    state_received_bytes: int = 0
    samples: int = 0  # samples of the steps this peer took with its stage


class Collaboration:
    def __init__(
        self,
        run_id: str,
        me: str,
        state: LocalState,
        cfg: AveragingConfig,
        *,
        exclusive: Exclusive,
        membership: DHTMembership | None,
        on_step: Callable[[int], None] = lambda epoch: None,
    ) -> None:
        self.run_id, self.me, self.state, self.cfg = run_id, me, state, cfg
        self.exclusive, self.membership, self.on_step = exclusive, membership, on_step
        self.on_traffic: Callable[[], None] = lambda: None  # after stats changed (for metrics)
        self.accumulator = Accumulator()
        self.members: dict[str, tls.Endpoint] = {}  # peer id -> where it serves (TLS pinned)
        self.suspected: dict[str, float] = {}
        self.follow: tuple[str, float] | None = None
        self.reports: dict[str, tuple[int, int, float]] = {}  # mate -> (epoch, samples, when)
        self.frozen: Frozen | None = None
        self.stats = RoundStats()
        self._catch_up_from: str | None = None
        self._catch_up_epoch: int | None = None  # the epoch we saw it at (None: unknown, download)
        self.uplink = ErrorFeedback(cfg.codec)  # what this peer hands in (gradients or deltas)
        self.downlink = ErrorFeedback(cfg.codec)  # the means it sends as a leader
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[tls.Endpoint, grpc.aio.Channel] = {}
        self._reported: tuple[int, int, float] = (-1, -1, 0.0)
        self._leader_ok = time.monotonic()
        self._followed: str | None = None
        self._stepped = asyncio.Event()  # replaced at every step; see wait_for_epoch
        self._probed: dict[str, float] = {}
        self.leader_epoch = 0  # the leader's epoch, as its last answer to our report said
        self._late_logged = -1

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def live_mates(self, now: float | None = None) -> list[str]:
        """Members this peer does not suspect (of having died or hung)."""
        now = now or time.monotonic()
        return [m for m in self.members if self.suspected.get(m, -math.inf) <= now]

    def leader(self, now: float | None = None) -> str:
        return choose_leader(self.me, self.members, self.suspected, self.follow, now or time.monotonic())

    # ---- called on the compute thread -----------------------------------------------------------

    def accumulate(self, grads: list[torch.Tensor], samples: int, step: int | None = None) -> None:
        """One request's gradients (of its mean loss over `samples` sequences), of optimizer step
        `step` when a synchronous trainer tagged it: one tagged with a step that already closed here
        (a trainer issued more than its share) joins the next step without counting towards it.
        A peer with no mates steps right here once it holds the target batch, as one process would."""
        total = self.accumulator.add(grads, samples, counts=step is None or step >= self.epoch)
        if not self.live_mates() and self.frozen is None and total >= self.cfg.target_batch_size:
            sums, n = self.accumulator.take()
            if sums is not None:
                self._step_alone([s.div_(n) for s in sums], n)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _step_alone(self, mean: list[torch.Tensor], samples: int) -> None:
        if self.cfg.diloco and outer_due(self.epoch, self.cfg.outer_every):
            assert self.state.outer is not None
            self.state.inner_step(mean)
            self._stepped_with(self.state.outer_step(self.state.outer.delta()), samples)
        else:
            self._step(mean, samples)

    def _step(self, grads: list[torch.Tensor] | None, samples: int) -> list[float]:
        return self._stepped_with(self.state.step(grads), samples)

    def _stepped_with(self, fingerprint: list[float], samples: int) -> list[float]:
        self.stats.steps += 1
        self.stats.samples += samples
        self.on_step(self.state.epoch)
        self._announce_epoch()
        return fingerprint

    def _announce_epoch(self) -> None:
        """Wake wait_for_epoch's waiters (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._epoch_changed)

    def _epoch_changed(self) -> None:
        event, self._stepped = self._stepped, asyncio.Event()
        event.set()

    async def reached(self, epoch: int, timeout: float) -> bool:
        """Whether this peer reaches `epoch` within `timeout` seconds (quietly; see wait_for_epoch)."""
        self._loop = self._loop or asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.epoch < epoch:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stepped.wait(), left)
        return True

    async def wait_for_epoch(self, epoch: int, limit: float | None = None) -> bool:
        """Until this peer has reached `epoch`, for at most round_timeout + leader_timeout (a round
        that cannot close, say because a peer died holding some of its gradients, must not stop
        training), or `limit` seconds if that is sooner (a caller's deadline: a request computed a
        step stale beats one that times out and gets this peer banned); False if it had not."""
        bound = self.cfg.round_timeout + self.cfg.leader_timeout
        if await self.reached(epoch, bound if limit is None else max(0.0, min(bound, limit))):
            return True
        if self.leader() != self.me and self.leader_epoch >= epoch:
            # The stage is there and we are not (a catch-up is due): let another peer serve.
            raise PeerUnavailable(f"{self.run_id}: this peer is behind its collaboration")
        if self._late_logged != epoch:
            self._late_logged = epoch
            log.info(
                "%s: epoch %d did not come within %.0f s; computing at epoch %d",
                self.run_id,
                epoch,
                self.cfg.round_timeout + self.cfg.leader_timeout,
                self.epoch,
            )
        return False

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        refresher = asyncio.create_task(self._refresh_members(stop))
        try:
            while not stop.is_set():
                try:
                    await self._tick()
                except SwarmError as e:  # a mate or the DHT failed: the next tick looks again
                    log.info("%s: %s; trying again", self.run_id, e)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TICK)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            if self.membership is not None:
                await self.membership.withdraw()
            for channel in self._channels.values():
                await channel.close()

    async def _refresh_members(self, stop: asyncio.Event) -> None:
        if self.membership is None:
            return
        published = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - published > MEMBERSHIP_PERIOD:
                    self.membership.epoch = self.epoch
                    await self.membership.publish()
                    published = time.monotonic()
                self.members = await self.membership.members()
            except SwarmError as e:  # the DHT hiccuped: keep the last view
                log.debug("%s: could not refresh the members: %s", self.run_id, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _tick(self) -> None:
        if self._catch_up_from is not None:
            peer, their_epoch = self._catch_up_from, self._catch_up_epoch
            if (
                self.cfg.diloco
                and their_epoch is not None
                and not outer_between(self.epoch, their_epoch, self.cfg.outer_every)
            ):
                await self._move_on(their_epoch)
            else:
                await self.catch_up(peer)
            return
        now = time.monotonic()
        leader = self.leader(now)
        if leader != self._followed:
            if self._followed is not None:
                log.info("%s: %s now leads the collaboration", self.run_id, leader)
            self._followed, self._leader_ok = leader, now
        if leader == self.me:
            if self.frozen is not None and now - self.frozen.since > 2 * self.cfg.round_timeout:
                # We took over from a leader that collected our gradients and never applied them.
                frozen, self.frozen = self.frozen, None
                self.accumulator.put_back(frozen.sums, frozen.samples)
            await self._probe_silent(now)
            if self._due(now):
                await self._round()
        else:
            await self._report(leader, now)

    async def _probe_silent(self, now: float) -> None:
        """Report to members that have not reported to us lately: one that passed us over (while we
        hung, say) answers with its own leader and epoch, and we follow it and take its state."""
        silent = [
            peer
            for peer in self.members
            if now - self.reports.get(peer, (0, 0, -math.inf))[2] > self.cfg.leader_timeout
            and now - self._probed.get(peer, -math.inf) > self.cfg.report_period
        ]
        for peer in silent:
            self._probed[peer] = now
        request = swarm_pb2.ReportRequest(header=self._header(self.epoch), samples=self.accumulator.counted)

        async def report(peer: str) -> swarm_pb2.ReportResponse:
            return await (await self._stub(peer)).Report(request, timeout=1.0)

        replies = await asyncio.gather(*(report(peer) for peer in silent), return_exceptions=True)
        for peer, reply in zip(silent, replies, strict=True):
            if isinstance(reply, swarm_pb2.ReportResponse) and reply.leader not in ("", self.me):
                self._refused(peer, int(reply.epoch), reply.leader)

    def _due(self, now: float) -> bool:
        fresh = [
            samples
            for peer, (epoch, samples, when) in self.reports.items()
            if epoch == self.epoch and now - when < self.cfg.fresh_seconds and peer in self.members
        ]
        total = self.accumulator.counted + sum(fresh)
        return total >= self.cfg.target_batch_size and self.frozen is None

    # ---- leading a round --------------------------------------------------------------------------

    async def _round(self) -> None:
        epoch, now = self.epoch, time.monotonic()
        mates = [
            peer
            for peer, (e, _, when) in self.reports.items()
            if e == epoch and now - when < self.cfg.fresh_seconds and peer in self.members
        ]
        own, own_samples = self.accumulator.take()
        replies = await asyncio.gather(*(self._collect(peer, epoch) for peer in mates))
        contributions: list[tuple[list[torch.Tensor] | None, int]] = []
        if own is not None:
            contributions.append((own, own_samples))
        contributors = []
        for peer, reply in zip(mates, replies, strict=True):
            if reply is not None and reply[0] is not None:
                contributions.append((reply[0], reply[1]))
                contributors.append(peer)
            elif reply is not None:  # accepted with nothing: it still steps with us
                contributors.append(peer)
                contributions.append((None, reply[1]))
        total = sum(n for _, n in contributions)
        if not total or self.epoch != epoch:  # nothing to average, or we caught up meanwhile
            self.accumulator.put_back(own, own_samples)
            return
        encoded, fingerprint = await self._close(epoch, own, own_samples, contributions, total)
        for peer in mates:
            self.reports[peer] = (epoch + 1, 0, now)
        await asyncio.gather(
            *(self._apply(peer, epoch, total, encoded, fingerprint) for peer in contributors)
        )
        self.on_traffic()
        log.debug(
            "%s: epoch %d closed with %d samples from %d peers", self.run_id, epoch, total, len(contributions)
        )

    async def _close(
        self,
        epoch: int,
        own: list[torch.Tensor] | None,
        own_samples: int,
        contributions: list[tuple[list[torch.Tensor] | None, int]],
        total: int,
    ) -> tuple[list[swarm_pb2.Tensor], list[float]]:
        """The leader's step closing `epoch`: (what its mates' Apply carries, its weights' fingerprint).

        gradients: everyone steps on the mean of the gradients (as it decodes on the wire).
        diloco, inner epoch: everyone steps on its own gradients; nothing but the count travels.
        diloco, outer epoch: the mates handed in their deltas (after their inner step); the leader
        takes its inner step, averages the deltas with its own and everyone applies the outer step."""
        if not self.cfg.diloco:
            mean = weighted_mean([(g, n) for g, n in contributions if g is not None])
            encoded, decoded = self.downlink.encode(mean)
            return encoded, await self.exclusive(lambda: self._step(decoded, total))
        own_mean = mean_of(own, own_samples)
        if not outer_due(epoch, self.cfg.outer_every):
            return [], await self.exclusive(lambda: self._step(own_mean, total))
        outer = self.state.outer
        assert outer is not None

        def inner_then_delta() -> list[torch.Tensor]:
            if own_mean is not None:
                self.state.inner_step(own_mean)
            return outer.delta()

        deltas = [await self.exclusive(inner_then_delta)]
        deltas += [g for g, _ in contributions[1 if own is not None else 0 :] if g is not None]
        encoded, decoded = self.downlink.encode(weighted_mean([(d, 1) for d in deltas]))
        fingerprint = await self.exclusive(lambda: self._stepped_with(self.state.outer_step(decoded), total))
        return encoded, fingerprint

    async def _collect(self, peer: str, epoch: int) -> tuple[list[torch.Tensor] | None, int] | None:
        """A mate's sums for `epoch` (None for either part when it has none / did not take part)."""
        try:
            stub = await self._stub(peer)
            reply = await stub.Collect(
                swarm_pb2.CollectRequest(header=self._header(epoch)), timeout=self.cfg.round_timeout
            )
        except (grpc.aio.AioRpcError, PeerUnavailable) as e:
            log.info(
                "%s: %s did not hand over its gradients (%s): closing the round without them",
                self.run_id,
                peer,
                _why(e),
            )
            self.reports.pop(peer, None)
            return None
        self.stats.received_bytes += reply.ByteSize()
        if not reply.accepted:
            self._refused(peer, reply.epoch, reply.leader)
            return None
        if not reply.grads:
            return (None, int(reply.samples))
        return [wire.decode_tensor(t) for t in reply.grads], int(reply.samples)

    async def _apply(
        self, peer: str, epoch: int, samples: int, grads: list[swarm_pb2.Tensor], fingerprint: list[float]
    ) -> None:
        request = swarm_pb2.ApplyRequest(
            header=self._header(epoch), samples=samples, grads=grads, fingerprint=fingerprint
        )
        self.stats.sent_bytes += request.ByteSize()
        try:
            reply = await (await self._stub(peer)).Apply(request, timeout=self.cfg.round_timeout)
        except (grpc.aio.AioRpcError, PeerUnavailable) as e:  # it reports again, sees it lags, catches up
            log.info(
                "%s: %s did not apply epoch %d (%s); it will catch up",
                self.run_id,
                peer,
                epoch,
                _why(e),
            )
            self.reports.pop(peer, None)
            return
        if not reply.accepted:
            self._refused(peer, reply.epoch, reply.leader)

    def _refused(self, peer: str, their_epoch: int, their_leader: str) -> None:
        """A mate would not take part: it is ahead of us (catch up from it), or follows another leader
        (follow that one too, and take its state)."""
        if their_leader and their_leader != self.me and their_leader in self.members:
            # It passed us over (we were silent a while, hung say): the collaboration went on
            # without us, so follow its leader and take its state.
            log.info("%s: %s follows %s: following it too", self.run_id, peer, their_leader)
            self.follow = (their_leader, time.monotonic() + self.cfg.suspect_seconds)
            self._catch_up_from, self._catch_up_epoch = their_leader, None
        elif their_epoch > self.epoch:
            self._behind(peer, their_epoch)

    def _behind(self, peer: str, their_epoch: int) -> None:
        """`peer` is at a later epoch than this peer: take its state (or, with diloco and no outer
        step in between, just move the epoch on: see _tick)."""
        if self._catch_up_from is None:
            self._catch_up_from, self._catch_up_epoch = peer, their_epoch

    async def _move_on(self, epoch: int) -> None:
        """diloco: the stage closed inner epochs without us (we missed their Apply): step on what we
        hold and take the stage's epoch, keeping our own weights; the next outer step averages them."""
        self._catch_up_from = self._catch_up_epoch = None
        if self.frozen is not None:
            self.accumulator.put_back(self.frozen.sums, self.frozen.samples)
            self.frozen = None
        sums, samples = self.accumulator.take()
        mean, behind = mean_of(sums, samples), epoch - self.epoch

        def move() -> None:
            if mean is not None:
                self.state.inner_step(mean)
            self.state.epoch = epoch
            self.state.note_epoch()

        await self.exclusive(move)
        self.on_step(self.state.epoch)
        self._announce_epoch()
        log.info(
            "%s: the stage closed %d inner step(s) without this peer: moving on to epoch %d with its own "
            "weights (no outer step was missed)",
            self.run_id,
            behind,
            epoch,
        )

    # ---- following --------------------------------------------------------------------------------

    async def _report(self, leader: str, now: float) -> None:
        samples = self.accumulator.counted
        last_epoch, last_samples, when = self._reported
        if (last_epoch, last_samples) == (self.epoch, samples) and now - when < self.cfg.report_period:
            return
        request = swarm_pb2.ReportRequest(header=self._header(self.epoch), samples=samples)
        try:
            stub = await self._stub(leader)
            reply = await stub.Report(request, timeout=min(1.0, self.cfg.leader_timeout))
        except (grpc.aio.AioRpcError, PeerUnavailable) as e:
            if time.monotonic() - self._leader_ok > self.cfg.leader_timeout:
                self.suspected[leader] = time.monotonic() + self.cfg.suspect_seconds
                log.warning(
                    "%s: leader %s has not answered for %.0f s (%s): passing it over for %.0f s",
                    self.run_id,
                    leader,
                    self.cfg.leader_timeout,
                    _why(e),
                    self.cfg.suspect_seconds,
                )
            return
        self._leader_ok = time.monotonic()
        self._reported = (self.epoch, samples, now)
        self.leader_epoch = int(reply.epoch)
        if reply.leader and reply.leader != leader and reply.leader != self.me:
            self.follow = (reply.leader, now + self.cfg.suspect_seconds)
        applying = self.frozen is not None and now - self.frozen.since < 2 * self.cfg.round_timeout
        if reply.epoch > self.epoch + applying:  # not just the step whose Apply is on its way
            self._behind(leader, int(reply.epoch))
        elif self.frozen is not None and reply.epoch == self.frozen.epoch:
            if now - self.frozen.since > 2 * self.cfg.round_timeout:  # that round never finished
                frozen, self.frozen = self.frozen, None
                self.accumulator.put_back(frozen.sums, frozen.samples)
        elif reply.epoch < self.epoch and reply.leader == leader:
            pass  # the leader is behind: it catches up from us when it sees our report

    async def catch_up(self, peer: str) -> None:
        """Download `peer`'s state (weights, AdamW moments, epoch; with diloco its outer state, whose
        anchor becomes this peer's weights), bounded and retried."""
        self._catch_up_from = self._catch_up_epoch = None

        async def attempt(n: int) -> tuple[int, dict[str, torch.Tensor]]:
            try:
                return await asyncio.wait_for(self._download(peer), self.cfg.state_timeout)
            except (TimeoutError, grpc.aio.AioRpcError) as e:
                raise PeerUnavailable(f"state download from {peer} failed: {e}") from e

        began = time.monotonic()
        try:
            epoch, tensors = await STATE_RETRY.run(attempt)
        except PeerUnavailable:
            self.suspected[peer] = time.monotonic() + self.cfg.suspect_seconds
            raise
        if epoch <= self.epoch and peer != self.leader():
            return
        await self.exclusive(lambda: self.state.load_tensors(epoch, tensors))
        self.frozen = None  # what a leader collected is in the state we took
        self.on_step(self.state.epoch)
        self._announce_epoch()
        log.info(
            "%s: took %s's state at epoch %d in %.1f s", self.run_id, peer, epoch, time.monotonic() - began
        )

    async def _download(self, peer: str) -> tuple[int, dict[str, torch.Tensor]]:
        request = swarm_pb2.DownloadStateRequest(header=self._header(self.epoch))
        tensors: dict[str, torch.Tensor] = {}
        epoch = -1
        stub = await self._stub(peer)
        async for chunk in stub.DownloadState(request, timeout=self.cfg.state_timeout):
            epoch = int(chunk.epoch)
            self.stats.state_received_bytes += chunk.ByteSize()
            for named in chunk.tensors:
                tensors[named.name] = wire.decode_tensor(named.tensor)
        if epoch < 0:
            raise PeerUnavailable(f"{peer} sent no state")
        return epoch, tensors

    # ---- answering mates (AveragingServicer) ------------------------------------------------------

    def on_report(self, sender: str, epoch: int, samples: int) -> tuple[str, int]:
        now = time.monotonic()
        if self.follow is not None and self.follow[0] == sender:
            self.follow = None  # the peer we deferred to takes us for its leader again: lead
        leader = self.leader(now)
        if leader == self.me:
            self.reports[sender] = (epoch, samples, now)
            if epoch > self.epoch:
                self._behind(sender, epoch)  # a mate is ahead of its leader: we missed a step
            self._wake.set()
        return leader, self.epoch

    async def on_collect(self, sender: str, epoch: int) -> swarm_pb2.CollectResponse:
        leader = self.leader()
        if sender != leader or epoch != self.epoch:
            if epoch > self.epoch and sender == leader:
                self._behind(sender, epoch)
            return swarm_pb2.CollectResponse(accepted=False, epoch=self.epoch, leader=leader)
        self._leader_ok = time.monotonic()
        if self.frozen is not None and self.frozen.epoch == epoch and self.frozen.reply is not None:
            reply = self.frozen.reply  # an earlier attempt at this outer round: the same delta again
        else:
            reply = await self._hand_in(leader, epoch)
        self.stats.sent_bytes += reply.ByteSize()
        self.on_traffic()
        return reply

    async def _hand_in(self, leader: str, epoch: int) -> swarm_pb2.CollectResponse:
        """What this peer contributes to the round closing `epoch`: gradients; with diloco nothing
        (inner epoch), or its delta since the anchor after its own inner step (outer epoch)."""
        sums, samples = self.accumulator.take()
        if self.frozen is not None and self.frozen.epoch == epoch:  # an earlier attempt at this round
            self.accumulator.put_back(self.frozen.sums, self.frozen.samples)
            sums, samples = self.accumulator.take()
        grads: list[swarm_pb2.Tensor] = []
        if not self.cfg.diloco:
            grads = self.uplink.encode(sums)[0] if sums is not None else []
        elif outer_due(epoch, self.cfg.outer_every):
            outer, mean = self.state.outer, mean_of(sums, samples)
            assert outer is not None

            def inner_then_delta() -> list[torch.Tensor]:
                if mean is not None:
                    self.state.inner_step(mean)
                return outer.delta()

            grads = self.uplink.encode(await self.exclusive(inner_then_delta))[0]
            sums = None  # stepped on: a round that fails does not give them back
        reply = swarm_pb2.CollectResponse(
            accepted=True, epoch=epoch, leader=leader, samples=samples, grads=grads
        )
        self.frozen = Frozen(epoch, sums, samples, reply=reply if grads and self.cfg.diloco else None)
        return reply

    async def on_apply(self, request: swarm_pb2.ApplyRequest) -> swarm_pb2.ApplyResponse:
        sender, epoch = request.header.sender, int(request.header.epoch)
        leader = self.leader()
        self.stats.received_bytes += request.ByteSize()
        if sender != leader or epoch != self.epoch:
            if epoch > self.epoch and sender == leader:
                self._behind(sender, epoch)
            return swarm_pb2.ApplyResponse(accepted=False, epoch=self.epoch, leader=leader)
        frozen = self.frozen if self.frozen is not None and self.frozen.epoch == epoch else None
        grads = [wire.decode_tensor(t) for t in request.grads]
        samples, inner = int(request.samples), self.cfg.diloco and not outer_due(epoch, self.cfg.outer_every)
        if inner:  # our own gradients, handed to nobody
            own = mean_of(frozen.sums, frozen.samples) if frozen is not None else None
            fingerprint = await self.exclusive(lambda: self._step(own, samples))
        elif self.cfg.diloco:
            fingerprint = await self.exclusive(
                lambda: self._stepped_with(self.state.outer_step(grads), samples)
            )
        else:
            fingerprint = await self.exclusive(lambda: self._step(grads, samples))
        if frozen is not None:
            self.frozen = None
        self._leader_ok = time.monotonic()
        if not inner and not same_weights(fingerprint, list(request.fingerprint)):
            log.warning(
                "%s: weights differ from %s's after epoch %d: taking its state", self.run_id, sender, epoch
            )
            self._catch_up_from = sender
        self._wake.set()
        return swarm_pb2.ApplyResponse(accepted=True, epoch=self.epoch, leader=leader)

    async def state_chunks(self) -> list[swarm_pb2.DownloadStateChunk]:
        epoch, tensors = await self.exclusive(lambda: (self.state.epoch, self.state.tensors()))
        names = sorted(tensors)
        chunks = []
        for i in range(0, max(1, len(names)), CHUNK_TENSORS):
            named = [
                swarm_pb2.NamedTensor(name=n, tensor=wire.encode_tensor(tensors[n]))
                for n in names[i : i + CHUNK_TENSORS]
            ]
            chunks.append(swarm_pb2.DownloadStateChunk(epoch=epoch, tensors=named))
        self.stats.state_sent_bytes += sum(c.ByteSize() for c in chunks)
        self.on_traffic()
        return chunks

    # ---- plumbing ---------------------------------------------------------------------------------

    def _header(self, epoch: int) -> swarm_pb2.AveragingHeader:
        return swarm_pb2.AveragingHeader(
            protocol_version=swarm.PROTOCOL_VERSION, run_id=self.run_id, sender=self.me, epoch=epoch
        )

    async def _stub(self, peer: str) -> swarm_pb2_grpc.AveragingServiceStub:
        """A stub for `peer`'s AveragingService, over TLS pinned to the hash its signed entry
        announces (CertificateMismatch, a PeerUnavailable, when it shows another certificate)."""
        endpoint = self.members.get(peer)
        if endpoint is None:
            raise PeerUnavailable(f"{peer} is not a member of {self.run_id} (any more)")
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = await tls.open_channel(
                endpoint.address, endpoint.cert_sha256, peer=peer, options=CHANNEL_OPTIONS, timeout=5.0
            )
            # Two callers may have dialled at once: keep the first channel, close the other.
            if endpoint in self._channels:
                await channel.close()
            channel = self._channels.setdefault(endpoint, channel)
        return swarm_pb2_grpc.AveragingServiceStub(channel)


def _why(error: BaseException) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else str(error)
