"""Nodes started with no span: they spread over the model, and re-cover it when peers die.

Real DHT, real node processes, SIGKILL. Nodes check the swarm every ~2 s here (the default
is minutes), so the whole story fits in well under a minute.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import torch

from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.coordinator.routing import SwarmMap
from swarm.localswarm import LocalSwarm
from tests.checkpoints import make_checkpoint

NUM_BLOCKS = 8
RECOVERY_BOUND_S = 90.0  # records of the dead expire (5 s), then moves at ~2 s checks with jitter
FAST = ("--announce-period", "2", "--rebalance-period", "2", "--drain-timeout", "5")


def replicas(swarm_map: SwarmMap) -> list[int]:
    counts = Counter(b for s in swarm_map.online() for b in range(s.start, s.end))
    return [counts[b] for b in range(swarm_map.num_blocks)]


def wait_for_coverage(client: DistributedModelForCausalLM, dead: set[str], bound: float) -> SwarmMap:
    """Poll the DHT (each read takes a DHT round trip) until live nodes cover every block."""
    deadline = time.monotonic() + bound
    while True:
        snapshot = run_sync(client.swarm_map.get(refresh=True))
        live = SwarmMap(
            snapshot.model,
            snapshot.num_blocks,
            tuple(s for s in snapshot.servers if s.peer_id not in dead),
        )
        if all(replicas(live)) and not [s for s in snapshot.online() if s.peer_id in dead]:
            return live
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not re-covered within {bound} s: replicas {replicas(live)}")
        time.sleep(0.5)  # poll interval of a bounded wait, not a synchronisation


def test_auto_placed_nodes_cover_the_model_and_recover_from_two_kills(tmp_path: Path) -> None:
    model_path = make_checkpoint(tmp_path / "auto-llama", "llama", num_layers=NUM_BLOCKS, eos_token_id=[])
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        # Varied speeds; the first node measures itself, the others announce a given figure.
        nodes = [local.start_node(model_path, None, "--num-blocks", "4", *FAST, name="auto-0")]
        for i, tp in enumerate((40.0, 25.0, 60.0), start=1):
            nodes.append(
                local.start_node(
                    model_path, None, "--num-blocks", "4", "--throughput", str(tp), *FAST, name=f"auto-{i}"
                )
            )
        spans = [n.info["span"] for n in nodes]
        # Redundancy first: 4 nodes x 4 blocks give every one of the 8 blocks two servers.
        per_block = Counter(b for s in spans for b in range(*map(int, s.split(":"))))
        assert [per_block[b] for b in range(NUM_BLOCKS)] == [2] * NUM_BLOCKS, spans

        with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client:
            expected = client.generate(prompt, max_new_tokens=12)

            # The worst case: both servers of one half die at once.
            victims = [n for n in nodes if n.info["span"] == spans[0]]
            assert len(victims) == 2
            for victim in victims:
                local.stop(victim, signal.SIGKILL)
            dead = {v.info["peer_id"] for v in victims}

            started = time.monotonic()
            recovered = wait_for_coverage(client, dead, RECOVERY_BOUND_S)
            took = time.monotonic() - started
            print(f"re-covered all {NUM_BLOCKS} blocks {took:.1f} s after the kills: {replicas(recovered)}")
            assert client.generate(prompt, max_new_tokens=12).tolist() == expected.tolist()

        survivors = [n for n in nodes if n not in victims]
        moved = [n.name for n in survivors if "moving from blocks" in n.log_path.read_text()]
        assert moved, "a surviving node should have moved to the uncovered half"
