"""Leader-led averaging, without a network: who leads, the weighted mean, the accumulator, the state
a peer hands over, and one peer stepping alone exactly as one process does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from swarm.errors import ConfigError
from swarm.training.averaging import (
    Accumulator,
    AveragingConfig,
    LocalState,
    choose_leader,
    same_weights,
    weighted_mean,
)
from swarm.training.collaboration import Collaboration
from swarm.training.trainer import step_share

CFG = AveragingConfig(target_batch_size=16, lr=1e-2, warmup_steps=2)


def test_the_smallest_unsuspected_id_leads() -> None:
    assert choose_leader("c", ["b", "d"], {}, None, now=0.0) == "b"
    assert choose_leader("c", ["b", "d"], {"b": 10.0}, None, now=5.0) == "c"  # b passed over until 10
    assert choose_leader("c", ["b", "d"], {"b": 10.0}, None, now=11.0) == "b"  # and back after
    assert choose_leader("a", ["b"], {}, ("b", 20.0), now=5.0) == "b"  # told to follow b
    assert choose_leader("a", ["b"], {}, ("b", 20.0), now=25.0) == "a"  # ... until that expires
    assert choose_leader("a", [], {}, None, now=0.0) == "a"


@given(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=6, unique=True))
def test_peers_with_the_same_view_agree_on_the_leader(peers: list[str]) -> None:
    leaders = {choose_leader(me, [p for p in peers if p != me], {}, None, 0.0) for me in peers}
    assert leaders == {min(peers)}


def test_the_weighted_mean_is_the_mean_over_samples() -> None:
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    # sums of gradient x samples: 3 samples with mean g1, 1 sample with mean g2
    mean = weighted_mean([([g1 * 3], 3), ([g2 * 1], 1)])
    assert torch.allclose(mean[0], (3 * g1 + g2) / 4)
    with pytest.raises(ValueError):
        weighted_mean([([g1], 0)])


def test_the_accumulator_sums_gradient_times_samples_and_gives_back_what_was_taken() -> None:
    acc = Accumulator()
    assert acc.add([torch.ones(2)], 8) == 8
    assert acc.add([torch.full((2,), 2.0)], 4) == 12
    sums, samples = acc.take()
    assert samples == 12 and sums is not None and torch.equal(sums[0], torch.full((2,), 16.0))
    assert acc.take() == (None, 0)
    acc.add([torch.ones(2)], 1)
    acc.put_back(sums, samples)  # a round that never finished: nothing is lost
    sums, samples = acc.take()
    assert samples == 13 and sums is not None and torch.equal(sums[0], torch.full((2,), 17.0))


def test_config_errors_show_the_numbers() -> None:
    with pytest.raises(ConfigError, match="target_batch_size must be > 0, got 0"):
        AveragingConfig(target_batch_size=0, lr=1e-3)
    with pytest.raises(ConfigError, match="round_timeout must be > 0, got -1"):
        AveragingConfig(target_batch_size=8, lr=1e-3, round_timeout=-1)


def model_and_state(seed: int = 0) -> tuple[torch.nn.Linear, LocalState]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, LocalState(list(model.parameters()), CFG)


def test_a_downloaded_state_continues_exactly_like_the_original() -> None:
    a_model, a = model_and_state(0)
    b_model, b = model_and_state(1)  # other weights, no optimizer state
    for _ in range(3):
        a.step([torch.randn_like(p) for p in a.params])
    b.load_tensors(a.epoch, a.tensors())
    assert b.epoch == a.epoch == 3
    grads = [torch.randn_like(p) for p in a.params]
    a.step(grads)
    b.step(grads)  # same moments, same step count, same lr: the same numbers
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert same_weights(a.fingerprints[4], b.fingerprints[4], rel=0.0)


def test_a_state_from_another_model_is_refused() -> None:
    _, a = model_and_state()
    other = LocalState(list(torch.nn.Linear(5, 3).parameters()), CFG)
    with pytest.raises(ConfigError, match="parameter 0: downloaded"):
        other.load_tensors(1, a.tensors())


def test_a_peer_without_mates_steps_exactly_like_one_process() -> None:
    """Micro-batches of 4 towards a target of 16: the collaboration steps after every fourth, on the
    mean of their gradients, with the warm-up schedule: what one AdamW in one process does."""
    torch.manual_seed(0)
    data = [(torch.randn(4, 4), torch.randn(4, 3)) for _ in range(12)]
    swarm_model, state = model_and_state()
    local_model, _ = model_and_state()

    def exclusive(fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return run()

    collab = Collaboration("test-head", "me", state, CFG, exclusive=exclusive, membership=None)
    for x, y in data:
        loss = torch.nn.functional.mse_loss(swarm_model(x), y)
        grads = torch.autograd.grad(loss, list(swarm_model.parameters()))
        collab.accumulate(list(grads), 4)
    assert collab.epoch == 3

    optimizer = torch.optim.AdamW(local_model.parameters(), lr=CFG.lr, weight_decay=CFG.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / 2))
    for step in range(3):
        for x, y in data[step * 4 : step * 4 + 4]:
            (torch.nn.functional.mse_loss(local_model(x), y) / 4).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    for p, q in zip(swarm_model.parameters(), local_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), (p, q)


def test_wait_for_epoch_returns_once_the_peer_steps_and_gives_up_in_bounded_time() -> None:
    _, state = model_and_state()
    cfg = AveragingConfig(target_batch_size=4, lr=1e-2, round_timeout=0.2, leader_timeout=0.1)

    def exclusive(fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return run()

    collab = Collaboration("test-stage0", "me", state, cfg, exclusive=exclusive, membership=None)

    async def main() -> tuple[bool, bool]:
        waiting = asyncio.create_task(collab.wait_for_epoch(1))
        await asyncio.sleep(0)  # let it start waiting
        grads = [torch.ones_like(p) for p in state.params]
        stepper = threading.Thread(target=collab.accumulate, args=(grads, 4))  # as a compute thread does
        stepper.start()
        reached = await asyncio.wait_for(waiting, 5.0)
        stepper.join()
        never = await asyncio.wait_for(collab.wait_for_epoch(5), 5.0)  # nobody steps: gives up at 0.3 s
        return reached, never

    assert asyncio.run(main()) == (True, False)


@given(st.integers(1, 64), st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=6, unique=True))
def test_trainers_split_each_step_evenly_and_wholly(per_step: int, trainers: list[str]) -> None:
    shares = [step_share(per_step, trainers, me) for me in trainers]
    assert sum(shares) == per_step  # together, exactly one step's micro-batches
    assert max(shares) - min(shares) <= 1
    assert step_share(per_step, list(reversed(trainers)), trainers[0]) == shares[0]  # order-free


def test_a_lone_trainer_takes_the_whole_step_and_a_stranger_is_refused() -> None:
    assert step_share(8, ["a"], "a") == 8
    assert [step_share(9, ["b", "a"], me) for me in ("a", "b")] == [5, 4]
    with pytest.raises(ValueError, match="not among"):
        step_share(8, ["a"], "b")


def test_a_micro_batch_of_a_closed_step_joins_the_next_without_moving_its_boundary() -> None:
    """A trainer that took more than its share of step 0 (it thought it was alone) sends a micro-batch
    tagged 0 after step 0 closed: its gradient joins step 1, but step 1 still closes only when the
    samples of step 1's own micro-batches reach the target, so the stage stays in step with the trainers."""
    _, state = model_and_state()
    collab = Collaboration("test-stage", "me", state, CFG, exclusive=lambda fn: fn(), membership=None)
    ones = [torch.ones_like(p) for p in state.params]
    for _ in range(4):
        collab.accumulate(ones, 4, step=0)
    assert collab.epoch == 1
    collab.accumulate([2 * g for g in ones], 4, step=0)  # late: counts towards nothing
    assert (collab.accumulator.samples, collab.accumulator.counted) == (4, 0)
    for _ in range(3):
        collab.accumulate(ones, 4, step=1)
    assert collab.epoch == 1  # 16 samples held, but only 12 of step 1's own
    collab.accumulate(ones, 4)  # untagged requests (asynchronous trainers) always count
    assert collab.epoch == 2 and collab.accumulator.samples == 0
