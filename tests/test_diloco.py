"""DiLoCo averaging inside a stage, and 8-bit averaging payloads with error feedback.

Without a network: when outer steps are due, the outer Nesterov step, error feedback's bounded
residual. On real processes (`swarm-node join --train --averaging diloco`, a real trainer, a real
SIGKILL): two peers of a stage drift apart between outer steps by a bounded distance and hold
identical weights right after each one; one is killed midway and its replacement starts from the
stage's last outer state (its anchor) and then steps in step with the survivor.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from swarm import tls
from swarm.errors import ConfigError, PeerUnavailable
from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.training.averaging import AveragingConfig, LocalState
from swarm.training.collaboration import Collaboration
from swarm.training.diloco import ErrorFeedback, OuterState, outer_between, outer_due
from swarm.training.trainer import Progress
from tests.test_training_node import config_dir as config_dir  # the module's fixture
from tests.test_training_node import get_state, trainer_for

H = 3  # outer step every 3 steps: several rounds within a short run
LR = 3e-3


def test_outer_steps_fall_every_h_epochs_and_a_peer_behind_knows_whether_it_missed_one() -> None:
    assert [e for e in range(10) if outer_due(e, 4)] == [3, 7]  # closing epoch 3 takes the stage to 4
    assert not outer_between(4, 7, 4)  # epochs 5..7: inner steps only
    assert outer_between(3, 4, 4) and outer_between(6, 9, 4)


def test_the_outer_step_is_nesterov_on_the_mean_delta_and_moves_the_weights_to_the_anchor() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    outer = OuterState([w], lr=0.5, momentum=0.9)
    with torch.no_grad():
        w.sub_(torch.tensor([0.2, 0.4]))  # inner steps moved the weights
    (delta,) = outer.delta()
    assert torch.allclose(delta, torch.tensor([0.2, 0.4]))
    outer.step([delta])  # v = d; anchor -= 0.5 (d + 0.9 d)
    expected = torch.tensor([1.0, 2.0]) - 0.5 * 1.9 * torch.tensor([0.2, 0.4])
    assert torch.allclose(w.detach(), expected) and torch.equal(outer.anchor[0], w.detach())
    outer.step([torch.zeros(2)])  # momentum alone keeps moving: v = 0.9 d; anchor -= 0.5 (0.81 d)
    assert torch.allclose(w.detach(), expected - 0.5 * 0.81 * torch.tensor([0.2, 0.4]))
    with pytest.raises(ConfigError, match="momentum in"):
        OuterState([w], lr=0.5, momentum=1.0)


def test_error_feedback_keeps_the_int8_rounding_from_adding_up() -> None:
    torch.manual_seed(0)
    payloads = [torch.randn(1000) * 1e-3 for _ in range(50)]
    ef, lossless = ErrorFeedback("int8"), ErrorFeedback("none")
    sent = torch.zeros(1000)
    for p in payloads:
        messages, decoded = ef.encode([p])
        assert messages[0].ByteSize() < 1000 * 1.2  # 8-bit: about one byte per value
        sent += decoded[0]
        assert lossless.encode([p])[0][0].ByteSize() > 1000 * 4
    total = torch.stack(payloads).sum(0)
    # What arrived in total differs from what was meant by one payload's rounding, not fifty.
    assert ef.residual is not None
    assert torch.allclose(sent + ef.residual[0], total, atol=1e-6)
    assert (sent - total).abs().max() < payloads[0].abs().max() / 50


def test_a_lone_diloco_peer_steps_inner_adamw_and_an_outer_step_every_h() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = AveragingConfig(target_batch_size=8, lr=1e-2, mode="diloco", outer_every=2, outer_momentum=0.0)
    state = LocalState(list(model.parameters()), cfg)
    assert state.outer is not None
    start = [p.detach().clone() for p in model.parameters()]
    state.step([torch.ones_like(p) for p in model.parameters()])  # an inner epoch
    assert state.epoch == 1 and torch.equal(state.outer.anchor[0], start[0])
    state.inner_step([torch.ones_like(p) for p in model.parameters()])
    moved = [start[i] - p.detach() for i, p in enumerate(model.parameters())]
    state.outer_step(state.outer.delta())  # lr 0.7, no momentum: 70 % of the way
    assert state.epoch == 2
    for i, p in enumerate(model.parameters()):
        assert torch.allclose(p.detach(), start[i] - 0.7 * moved[i], atol=1e-6)
        assert torch.equal(state.outer.anchor[i], p.detach())
    handed = state.tensors()  # a joiner takes the anchor and the outer momentum
    assert {"anchor.0", "outer_velocity.0", "param.0"} <= set(handed)


async def tick(collab: Collaboration) -> None:
    """One round of the collaboration's loop, then its channels closed."""
    try:
        await collab._tick()
    finally:
        for channel in collab._channels.values():
            await channel.close()
        collab._channels.clear()


def behind_scenario() -> None:
    """A peer behind its stage: within an inner stretch it moves on, across an outer step it must
    download the stage's outer state (its leader never answers here, so that download fails)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = AveragingConfig(target_batch_size=8, lr=1e-2, mode="diloco", outer_every=4, state_timeout=0.5)
    state = LocalState(list(model.parameters()), cfg)
    assert state.outer is not None
    collab = Collaboration("test-stage0", "me", state, cfg, exclusive=inline, membership=None)
    # a mate that leads (its id is smaller) and never answers
    collab.members = {"mate": tls.Endpoint("127.0.0.1:1", None)}
    before = [p.detach().clone() for p in model.parameters()]
    collab.accumulate([torch.ones_like(p) for p in model.parameters()], 4)  # short of the target
    collab._behind("mate", 3)  # the stage closed epochs 0-2 without us: no outer step in between
    asyncio.run(tick(collab))
    assert state.epoch == 3
    assert not torch.equal(before[0], model.weight.detach())  # it stepped on the gradients it held
    assert torch.equal(state.outer.anchor[0], before[0])  # and kept its own weights, anchor untouched
    collab._behind("mate", 5)  # the stage took the outer step of epoch 3 -> 4 without us
    with pytest.raises(PeerUnavailable, match="state download from mate failed"):
        asyncio.run(tick(collab))  # so it loads the stage's outer state (the mate is gone here)
    assert state.epoch == 3


def test_a_diloco_peer_behind_moves_on_within_an_inner_stretch_and_downloads_across_an_outer_step() -> None:
    # In a process of its own: after gRPC's asyncio layer dialled a dead address under asyncio.run
    # in the test process, hivemind DHTs that later tests fork there hung at start (seen in CI).
    child = multiprocessing.get_context("spawn").Process(target=behind_scenario, name="diloco-behind")
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the scenario did not finish within 120 s")
    assert child.exitcode == 0, f"the scenario failed (exit code {child.exitcode}; its traceback is above)"


# ---- two real peers of a stage ---------------------------------------------------------------------

DILOCO = (
    *("--train", "--num-stages", "1", "--target-batch-size", "32", "--lr", str(LR), "--warmup-steps", "2"),
    *("--averaging", "diloco", "--outer-every", str(H), "--averaging-codec", "int8"),
    *("--averaging-timeout", "3"),
)


def prints(node: NodeProcess) -> dict[int, list[float]]:
    return get_state(node.info)[2]


def distance(a: NodeProcess, b: NodeProcess) -> tuple[float, float]:
    """(L2 distance between two peers' weights as they are now, the most it may be).

    AdamW moves each weight by about lr per step (|m/sqrt(v)| stays near 1), so after at most H
    inner steps from the same anchor two peers are at most 2 H lr sqrt(N) apart; the factor 2 more
    covers reading them a step apart (one of them past the next outer step already)."""
    (_, wa, _), (_, wb, _) = get_state(a.info), get_state(b.info)
    diff = sum(float((wa[n] - wb[n]).square().sum()) for n in wa)
    numel = sum(t.numel() for t in wa.values())
    return diff**0.5, 4 * H * LR * numel**0.5


def test_diloco_peers_match_after_every_outer_step_and_a_replacement_loads_the_outer_state(
    tmp_path: Path, config_dir: Path
) -> None:
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        a, b = (local.start_node(config_dir, None, *DILOCO, "--stage", "0", name=f"peer-{i}") for i in "ab")
        trainer, dht = trainer_for(local, config_dir, steps=10_000, max_seconds=150)
        progressed = threading.Condition()
        outcome: dict[str, object] = {}

        def on_progress(_: Progress) -> None:
            with progressed:
                progressed.notify_all()

        def train() -> None:
            try:
                outcome["progress"] = trainer.train(on_progress)
            except BaseException as e:  # reported by the assertions below
                outcome["error"] = e
            finally:
                with progressed:
                    progressed.notify_all()

        def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
            deadline = time.monotonic() + timeout
            with progressed:
                while not condition():
                    assert not outcome, f"training ended while waiting for {what}: {outcome}"
                    assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
                    progressed.wait(timeout=2.0)  # woken by the next micro-batch

        runner = threading.Thread(target=train, name="trainer")
        distances: list[tuple[float, float]] = []
        try:
            runner.start()

            def epoch_at_least(node: NodeProcess, n: int) -> bool:
                distances.append(distance(a, b))
                return get_state(node.info)[0] >= n

            wait_for(lambda: epoch_at_least(a, 2 * H + 1), f"two outer steps ({2 * H} epochs)")
            pa, pb = prints(a), prints(b)
            local.stop(b, signal.SIGKILL)  # midway through an inner stretch, micro-batches in flight
            replacement = local.start_node(config_dir, None, *DILOCO, "--stage", "0", name="replacement")
            joined_at = int(replacement.info["epoch"])
            assert joined_at >= 2 * H  # it loaded the stage's state, not fresh weights
            joined, survivor = prints(replacement), prints(a)
            # An outer step after the join that both hold. Not "its epoch passed the next outer
            # step": a replacement that joins under load can miss that round and catch up by
            # downloading a later epoch's state (rounds are bounded), then take the next one.
            took_part = lambda: any(  # noqa: E731
                e % H == 0 and e > joined_at for e in set(prints(replacement)) & set(prints(a))
            )
            wait_for(took_part, "an outer step that the replacement and the survivor both hold")
        finally:
            trainer.stop()
            runner.join(timeout=120)
            trainer.shutdown()
            dht.shutdown()

        assert "error" not in outcome, outcome
        progress = outcome["progress"]
        assert isinstance(progress, Progress)
        assert progress.issued == progress.completed  # none lost, none counted twice

        # Before the kill: identical right after every outer step, apart (but close) in between.
        shared = sorted(set(pa) & set(pb))
        outer_epochs = [e for e in shared if e % H == 0 and e > 0]
        inner_epochs = [e for e in shared if e % H != 0]
        assert len(outer_epochs) >= 2, shared
        for e in outer_epochs:
            assert pa[e] == pb[e], f"the peers differ right after the outer step that made epoch {e}"
        assert any(pa[e] != pb[e] for e in inner_epochs), "between outer steps the peers trained alike"
        assert all(d <= bound for d, bound in distances), distances  # bounded drift between rounds

        # The replacement started from the stage's anchor: the weights of its last outer step.
        anchor_epoch = joined_at - joined_at % H
        assert joined[joined_at] == survivor[anchor_epoch]
        # ... and matches the survivor after the next outer step.
        pa, pr = prints(a), prints(replacement)
        after = [e for e in set(pa) & set(pr) if e % H == 0 and e > joined_at]
        assert after, (sorted(pa), sorted(pr))
        for e in after:
            assert pa[e] == pr[e], f"replacement and survivor differ after the outer step of epoch {e}"


def inline(fn: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return fn()

    return run()
