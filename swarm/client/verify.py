"""Spot checks: re-run a sample of a server's work on another server of its blocks (issue 12).

`SpotChecker` is one per client. It decides what to check (coordinator/trust.py's `TrustPolicy`),
re-runs it on a second server, and on a mismatch asks a third: the server that disagrees with the
other two is convicted (banned for the client's life), and the caller gets the majority's answer,
so what the user gets is what an honest swarm returns. When the liar's answer carries its signed
receipt, the checker publishes it as evidence in the DHT; `review_reports` reads what other clients
published and bans a server only after checking its signature and reproducing the mismatch itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from hivemind.dht import DHT

from swarm import receipts, wire
from swarm._proto import swarm_pb2
from swarm.adapters import AdapterPayload
from swarm.client.config import ClientConfig
from swarm.client.remote import BackwardReply, ChannelPool, Tuning, call_backward, call_forward
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.coordinator.trust import TrustPolicy, Verdict, agree, tolerance, verdict
from swarm.errors import SwarmError
from swarm.records import ServerRecord

log = logging.getLogger(__name__)
A = TypeVar("A")  # what a re-run returns besides the compared tensor (a response, a reply)
PUBLISH_TIMEOUT = 10.0  # seconds to store evidence; a client does not wait longer on the DHT


@dataclass(frozen=True)
class Rerun(Generic[A]):
    """One server's answer to a re-run: the tensor compared, and the rest of its answer."""

    server: ServerRecord
    output: torch.Tensor
    answer: A
    epoch: int | None = None  # a training peer's: the stage epoch of the weights it used


@dataclass(frozen=True)
class Judgement(Generic[A]):
    """The outcome of a check: the answer to use, and whether the checked server lied."""

    output: torch.Tensor
    answer: A | None  # the honest re-run's answer when the checked server lied; else None
    checked_lied: bool


class SpotChecker:
    def __init__(
        self,
        pool: ChannelPool,
        swarm_map: SwarmMapCache,
        config: ClientConfig,
        bans: BanList,
        dht: DHT | None,
        *,
        eligible: Callable[[ServerRecord], bool] | None = None,
    ) -> None:
        self.pool, self.swarm_map, self.config, self.bans, self.dht = pool, swarm_map, config, bans, dht
        # Which servers may check others (the trainer: training peers only, whose weights are the
        # stage's; a plain server of the same blocks holds other weights). None: any.
        self.eligible = eligible
        self.policy = TrustPolicy(config.verify_rate, config.verify_probation)
        self.rng = random.Random()
        self.convicted: list[str] = []  # in the order caught (tests, benchmarks)
        self.checks = 0  # re-runs done
        self.disagreements = 0  # checks whose second server answered otherwise (a referee was asked)
        # Training peers' answers are compared only when computed with the same stage weights
        # (Forward/BackwardResponse.epoch): a mate one optimizer step ahead answers otherwise,
        # honestly. Set when `eligible` limits checks to training peers.
        self.same_weights_only = eligible is not None
        self.incomparable = 0  # checks skipped because the answers came from different weights
        self._reviewed: set[str] = set()  # evidence digests already judged
        self._last_review = -float("inf")
        self._background: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def sample(self, peer_id: str) -> bool:
        return self.rng.random() < self.policy.check_probability(peer_id)

    def sample_stream(self, peer_id: str) -> bool:
        return self.rng.random() < self.policy.stream_check_probability(peer_id)

    def tolerance(self, servers: list[ServerRecord], codec: str) -> float:
        if self.config.verify_tolerance is not None:
            return self.config.verify_tolerance
        return tolerance([s.dtype if s.quant == "none" else "bfloat16" for s in servers], codec)

    async def others(self, start: int, end: int, exclude: set[str]) -> list[ServerRecord]:
        """Online servers holding all of blocks [start, end), not banned, not in `exclude`; shuffled."""
        snapshot = await self.swarm_map.get()
        avoid = self.bans.banned() | exclude
        found = [
            s
            for s in snapshot.online()
            if s.start <= start and end <= s.end and s.peer_id not in avoid
            if self.eligible is None or self.eligible(s)
        ]
        self.rng.shuffle(found)
        return found

    async def judge(
        self,
        hop: Hop,
        output: torch.Tensor,
        rerun: Callable[[Hop], Awaitable[Rerun[A]]],
        *,
        codec: str,
        evidence: Callable[[Rerun[A] | None], receipts.Evidence | None] = lambda r: None,
        epoch: int | None = None,
    ) -> Judgement[A]:
        """Check `output`, hop's server's answer (computed at training `epoch`), against `rerun` on
        other servers of its blocks.

        `evidence(None)` is the checked server's evidence, `evidence(r)` that of a lying verifier.
        With no other server, or only failing ones, the answer stands unchecked.
        """
        candidates = await self.others(hop.start, hop.end, {hop.peer_id})
        second = await self._first_answer(hop, candidates, rerun)
        if second is None:
            return Judgement(output, None, False)
        if not self._comparable(epoch, second.epoch):
            self.incomparable += 1
            log.debug(
                "no check of blocks %d:%d: answers from epochs %s and %s",
                hop.start,
                hop.end,
                epoch,
                second.epoch,
            )
            return Judgement(output, None, False)
        return await self.settle(
            hop, output, second, rerun, lambda: _ready(candidates), codec=codec, evidence=evidence
        )

    def _comparable(self, *epochs: int | None) -> bool:
        """Whether answers computed at these training epochs came from the same weights."""
        return not self.same_weights_only or (None not in epochs and len(set(epochs)) == 1)

    async def settle(
        self,
        hop: Hop,
        output: torch.Tensor,
        second: Rerun[A],
        rerun: Callable[[Hop], Awaitable[Rerun[A]]],
        referees: Callable[[], Awaitable[list[ServerRecord]]],
        *,
        codec: str,
        evidence: Callable[[Rerun[A] | None], receipts.Evidence | None] = lambda r: None,
    ) -> Judgement[A]:
        """Compare hop's `output` with a `second` server's; on a mismatch, `rerun` on a referee (the
        first of `referees()` that answers) decides."""
        tol = self.tolerance([hop.server, second.server], codec)
        if agree(output, second.output, tol):
            self.policy.passed(hop.peer_id)
            self.policy.passed(second.server.peer_id)
            return Judgement(output, None, False)
        self.disagreements += 1
        third = await self._first_answer(hop, await referees(), rerun)
        if third is not None and not self._comparable(second.epoch, third.epoch):
            third = None  # a referee on other weights cannot settle it
        tol = self.tolerance([hop.server, second.server, *([third.server] if third else [])], codec)
        decided = verdict(output, second.output, third.output if third else None, tol)
        referee = third.server.peer_id if third else "nobody"
        if decided is Verdict.CHECKED_LIES:
            await self._convict(hop, hop.peer_id, second.server.peer_id, referee, evidence(None))
            return Judgement(second.output, second.answer, True)
        if decided is Verdict.VERIFIER_LIES:
            await self._convict(hop, second.server.peer_id, hop.peer_id, referee, evidence(second))
            return Judgement(output, None, False)
        for peer in (hop.peer_id, second.server.peer_id):
            self.policy.suspect(peer)
        log.warning(
            "peers %s and %s disagree on blocks %d:%d and referee %s did not settle it; both are checked "
            "on every request again",
            hop.peer_id,
            second.server.peer_id,
            hop.start,
            hop.end,
            referee,
        )
        return Judgement(output, None, False)

    async def _first_answer(
        self, hop: Hop, candidates: list[ServerRecord], rerun: Callable[[Hop], Awaitable[Rerun[A]]]
    ) -> Rerun[A] | None:
        """The answer of the first candidate (taken from the list) that gives one."""
        while candidates:
            server = candidates.pop()
            self.checks += 1
            try:
                return await rerun(Hop(server, hop.start, hop.end))
            except SwarmError as e:  # a failing checker is no verdict on the checked server
                log.debug(
                    "spot check of blocks %d:%d on %s failed: %s", hop.start, hop.end, server.peer_id, e
                )
        return None

    async def _convict(
        self, hop: Hop, liar: str, honest: str, referee: str, evidence: receipts.Evidence | None
    ) -> None:
        if self.bans.convicted(liar):
            return
        self.bans.convict(liar)
        self.policy.suspect(liar)
        self.convicted.append(liar)
        log.warning(
            "peer %s returned wrong results for blocks %d:%d (%s and %s agree otherwise); banned for this "
            "client, its work redone on %s",
            liar,
            hop.start,
            hop.end,
            honest,
            referee,
            honest,
        )
        if evidence is not None and self.dht is not None:
            self._reviewed.add(evidence.digest)  # our own report: nothing to re-check
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    stored = await receipts.publish_evidence(self.dht, evidence)
            except (SwarmError, TimeoutError) as e:
                log.warning("could not publish the evidence against %s: %s", liar, e)
                return
            if not stored:
                log.info("the evidence against %s is too large for the DHT; it stays a local ban", liar)

    # ---- unary Forward ------------------------------------------------------------------------

    async def check_forward(
        self,
        model: str,
        hop: Hop,
        request: swarm_pb2.ForwardRequest,
        response: swarm_pb2.ForwardResponse,
        adapter: AdapterPayload | None,
        codec: str,
    ) -> torch.Tensor:
        """The majority's output for `request`, of which `response` is hop's server's answer."""
        output = wire.decode_tensor(response.hidden_states)

        async def rerun(other: Hop) -> Rerun[tuple[swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse]]:
            sent = as_check(request)
            answer = await call_forward(self.pool, model, other, sent, self.config, adapter)
            epoch = answer.epoch if answer.HasField("epoch") else None
            return Rerun(other.server, wire.decode_tensor(answer.hidden_states), (sent, answer), epoch)

        def evidence(
            lying: Rerun[tuple[swarm_pb2.ForwardRequest, swarm_pb2.ForwardResponse]] | None,
        ) -> receipts.Evidence | None:
            if adapter is not None:  # nobody else holds the client's adapter: it could not re-run
                return None
            if lying is None:
                accused, (sent, answer) = hop.peer_id, (request, response)
            else:
                accused, (sent, answer) = lying.server.peer_id, lying.answer
            if not receipts.verify_receipt(accused, "Forward", receipts.message_digest(sent), answer):
                log.info("%s did not sign its wrong answer; it stays a local ban", accused)
                return None
            return receipts.Evidence(
                model=model,
                accused=accused,
                method="Forward",
                request=sent.SerializeToString(deterministic=True),
                response=answer.SerializeToString(deterministic=True),
            )

        epoch = response.epoch if response.HasField("epoch") else None
        judged = await self.judge(hop, output, rerun, codec=codec, evidence=evidence, epoch=epoch)
        return judged.output

    async def check_backward(
        self,
        model: str,
        hop: Hop,
        request: swarm_pb2.BackwardRequest,
        reply: BackwardReply,
        tuning: Tuning,
        codec: str,
    ) -> BackwardReply:
        """The majority's reply to `request` (compared on the input gradients), of which `reply` is
        hop's server's. Gradients are not published as evidence: the ban stays local."""

        async def rerun(other: Hop) -> Rerun[BackwardReply]:
            answer = await call_backward(self.pool, model, other, as_check(request), self.config, tuning)
            return Rerun(other.server, answer.grad_inputs, answer, answer.epoch)

        judged = await self.judge(hop, reply.grad_inputs, rerun, codec=codec, epoch=reply.epoch)
        return judged.answer if judged.answer is not None else reply

    # ---- evidence published by others --------------------------------------------------------

    async def review_reports(self, *, every: float = 0.0) -> list[str]:
        """Read the evidence other clients published about this model; ban each accused server whose
        signed wrong answer this client reproduces (an honest server answers otherwise). Returns the
        servers banned now. At most once per `every` seconds."""
        if self.dht is None or not self.enabled or time.monotonic() - self._last_review < every:
            return []
        self._last_review = time.monotonic()
        try:
            reports = await receipts.fetch_evidence(self.dht, self.swarm_map.model)
        except SwarmError as e:
            log.debug("could not read published evidence: %s", e)
            return []
        banned = []
        for report in reports:
            if report.digest in self._reviewed or self.bans.convicted(report.accused):
                continue
            outcome = await self._review(report)
            if outcome is not None:
                self._reviewed.add(report.digest)
            if outcome:
                banned.append(report.accused)
        return banned

    async def _review(self, report: receipts.Evidence) -> bool | None:
        """True: the report holds (accused banned); False: it does not; None: cannot tell yet."""
        parsed = report.parsed()
        if parsed is None or not report.signed_by_accused():
            log.info(
                "ignoring a report against %s: its answer is not signed by %s", report.accused, report.accused
            )
            return False
        request, response = parsed
        start, end = request.header.span.start, request.header.span.end
        candidates = await self.others(start, end, {report.accused})
        if not candidates:
            return None
        claimed = wire.decode_tensor(response.hidden_states)
        for server in candidates:
            try:
                answer = await call_forward(
                    self.pool, report.model, Hop(server, start, end), as_check(request), self.config
                )
            except SwarmError as e:
                log.debug(
                    "re-running a report against %s on %s failed: %s", report.accused, server.peer_id, e
                )
                continue
            self.checks += 1
            codec = wire.codec_label(request.header.response_codec)
            tol = self.tolerance([server], codec)
            if agree(claimed, wire.decode_tensor(answer.hidden_states), tol):
                log.info(
                    "a published report against %s did not reproduce on %s; ignoring it",
                    report.accused,
                    server.peer_id,
                )
                return False
            self.bans.convict(report.accused)
            self.convicted.append(report.accused)
            log.warning(
                "peer %s banned: a published signed answer of it for blocks %d:%d is wrong (re-run on %s)",
                report.accused,
                start,
                end,
                server.peer_id,
            )
            return True
        return None


async def _ready(servers: list[ServerRecord]) -> list[ServerRecord]:
    return servers


Req = TypeVar("Req", swarm_pb2.ForwardRequest, swarm_pb2.BackwardRequest)


def as_check(request: Req) -> Req:
    """A copy of `request` marked as a check (a training node adds nothing to its gradients)."""
    sent = type(request)()
    sent.CopyFrom(request)
    sent.header.check = True
    return sent
