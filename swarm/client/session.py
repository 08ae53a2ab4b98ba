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

import torch

from swarm.client.config import ClientConfig
from swarm.client.lora import RemoteLora
from swarm.client.remote import ChannelPool, InferenceStream, Tuning
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop, min_latency_route
from swarm.coordinator.rtt import RttTable
from swarm.coordinator.swarm_map import SwarmMapCache
from swarm.errors import MissingBlocksError, PeerUnavailable, SwarmError

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
    ) -> None:
        self.pool, self.swarm_map, self.config = pool, swarm_map, config
        # Tuning of every hop: the client's LoRA, and deep prompts [num_blocks, batch or 1, prefix,
        # hidden] that each stream sends with the steps reaching into the prefix (replays included).
        self.adapter = adapter
        self.prompts = prompts.detach() if prompts is not None else None
        self.batch_size, self.max_length = batch_size, max_length
        self.streams: list[InferenceStream] = []
        self.history: list[list[torch.Tensor]] = []  # inputs sent to each stream, in order
        self.step_seconds: list[float | None] = []  # each stream's usual decoding step time
        self.banned: set[str] = set()  # never again in this session
        self.bans = bans if bans is not None else BanList(config.ban_base, config.ban_limit)
        self.rtts = rtts if rtts is not None else RttTable()
        self.position = 0

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
        self.step_seconds = [None for _ in self.streams]

    def _stream(self, hop: Hop) -> InferenceStream:
        tuning = Tuning(
            self.adapter.payload(hop.start, hop.end) if self.adapter is not None else None,
            self.prompts[hop.start : hop.end] if self.prompts is not None else None,
        )
        return InferenceStream(
            self.pool, self.swarm_map.model, hop, self.config, self.batch_size, self.max_length, tuning
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
        new_tokens = hidden.shape[1]
        i = 0
        while i < len(self.streams):
            x = hidden

            async def attempt(n: int, i: int = i, x: torch.Tensor = x) -> torch.Tensor:
                if n > 1:
                    await self._reroute(i)
                return await self._timed_step(i, x)

            hidden = await self.config.retry.run(attempt)
            self.history[i].append(x)
            i += 1
        self.position += new_tokens
        return hidden

    def rollback(self, keep: int) -> None:
        """Forget every token from position `keep` on (drafts the client rejected).

        Each stream tells its node with its next step (no extra round trip), and each hop's stored
        inputs are cut to `keep` tokens, so a replacement after a failure replays accepted tokens only.
        """
        if not 0 <= keep <= self.position:
            raise SwarmError(f"cannot keep {keep} tokens of a session holding {self.position}")
        for stream, history in zip(self.streams, self.history, strict=True):
            stream.rollback(keep)
            _truncate(history, keep)
        self.position = keep

    async def _timed_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Step stream i under a deadline derived from its own measured step time."""
        stream, usual = self.streams[i], self.step_seconds[i]
        short = x.shape[1] <= SHORT_STEP_TOKENS
        if short and usual is not None:
            deadline = max(self.config.step_timeout_floor, self.config.step_timeout_factor * usual)
        else:  # a prompt, or no measurement yet: the general request timeout
            deadline = self.config.request_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline):  # not wait_for: no extra task per hop and token
                out = await stream.step(x)
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

    async def _reroute(self, i: int) -> None:
        """Replace stream i (whose peer just failed) by a fresh route over the same span."""
        failed = self.streams[i]
        if failed.hop.peer_id not in self.banned:  # one failure, one ban: retries do not stack them
            self.bans.ban(failed.hop.peer_id)
        self.banned.add(failed.hop.peer_id)
        await failed.close()
        hops = await self._route(failed.hop.start, failed.hop.end)
        log.warning(
            "peer %s failed; re-routing blocks %d:%d via %s",
            failed.hop.peer_id,
            failed.hop.start,
            failed.hop.end,
            [h.peer_id for h in hops],
        )
        replacements = [self._stream(hop) for hop in hops]
        histories: list[list[torch.Tensor]] = []
        past = torch.cat(self.history[i], dim=1) if self.history[i] else None
        for stream in replacements:
            histories.append([past] if past is not None else [])
            if past is not None:
                try:
                    past = await stream.step(past)
                except SwarmError:
                    self.banned.add(stream.hop.peer_id)
                    self.bans.ban(stream.hop.peer_id)
                    for s in replacements:
                        await s.close()
                    raise
        self.streams[i : i + 1] = replacements
        self.history[i : i + 1] = histories
        self.step_seconds[i : i + 1] = [None] * len(replacements)

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()
        self.streams, self.history = [], []


def _truncate(history: list[torch.Tensor], keep: int) -> None:
    """Cut a hop's stored inputs (each [batch, tokens, hidden], in order) to their first `keep` tokens."""
    total = sum(x.shape[1] for x in history)
    while total > keep:
        last = history.pop()
        total -= last.shape[1]
        if total < keep:  # the cut falls inside this step's tokens
            history.append(last[:, : keep - total])
            total = keep
