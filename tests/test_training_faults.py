"""Faults during SWARM training, and several trainers at once, on real processes and real signals.

- a stage's leader hangs (SIGSTOP, its connections stay open): its mate passes it over and the
  stage keeps stepping; resumed (SIGCONT), it defers, takes the stage's state and steps in step;
- a trainer is SIGKILLed and `swarm train` resumes from its checkpoint;
- two `swarm train` processes on disjoint shards train one model; one is SIGKILLed midway and the
  other goes on to the end.

After each: nothing issued is lost or counted twice, and the peers of a stage hold equal weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from swarm.localswarm import LocalSwarm, NodeProcess
from swarm.training.trainer import TRAINER_CHECKPOINT, Progress, load_trainer_checkpoint
from tests.test_training_node import TRAIN, get_state, trainer_for
from tests.test_training_node import config_dir as config_dir  # the module's fixture

FAST = (*TRAIN, "--averaging-timeout", "2")  # a silent mate is left out of a round within 2 s


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: Callable[[], None]) -> None:
    """Poll `condition` (each poll blocks in `poll`, e.g. on a process or a progress event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        poll()


def epoch_of(node: NodeProcess) -> int:
    return get_state(node.info)[0]


def assert_same_weights(a: NodeProcess, b: NodeProcess, timeout: float = 30.0) -> int:
    """The two peers reach the same epoch with exactly equal weights (they step on the same numbers)."""
    deadline = time.monotonic() + timeout
    while True:
        (ea, wa, _), (eb, wb, _) = get_state(a.info), get_state(b.info)
        if ea == eb:
            assert wa.keys() == wb.keys()
            for name in wa:
                assert torch.equal(wa[name], wb[name]), f"{name} differs at epoch {ea}"
            return ea
        assert time.monotonic() < deadline, f"peers stay at epochs {ea} and {eb}"


@pytest.fixture
def swarm_2x2(tmp_path: Path, config_dir: Path) -> Iterator[tuple[LocalSwarm, list[NodeProcess]]]:
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        nodes = [
            local.start_node(config_dir, None, *FAST, "--stage", str(stage), name=f"peer-{i}")
            for i, stage in enumerate((0, 1, 0, 1))
        ]
        yield local, nodes


def test_a_hung_stage_leader_is_passed_over_and_catches_up_when_it_resumes(
    swarm_2x2: tuple[LocalSwarm, list[NodeProcess]],
    config_dir: Path,
) -> None:
    local, nodes = swarm_2x2
    stage1 = sorted((nodes[1], nodes[3]), key=lambda n: n.info["peer_id"])
    leader, mate = stage1  # the smallest peer id leads
    trainer, dht = trainer_for(
        local, config_dir, steps=10_000, max_seconds=240, request_timeout=4.0, averaging_timeout=2.0
    )
    progressed = threading.Event()
    outcome: dict[str, object] = {}

    def train() -> None:
        try:
            outcome["progress"] = trainer.train(lambda _: progressed.set())
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e
        finally:
            progressed.set()

    def poll() -> None:
        progressed.wait(5.0)
        progressed.clear()
        assert "error" not in outcome, outcome

    runner = threading.Thread(target=train, name="trainer")
    runner.start()
    stopped = False
    try:
        wait_until(lambda: epoch_of(mate) >= 3, 180, "stage 1's first steps", poll)
        os.kill(leader.pid, signal.SIGSTOP)
        stopped = True
        hung_at = epoch_of(mate)
        wait_until(lambda: epoch_of(mate) >= hung_at + 3, 120, "stage 1 to step without its leader", poll)
        os.kill(leader.pid, signal.SIGCONT)
        stopped = False
        resumed_at = epoch_of(mate)
        wait_until(
            lambda: epoch_of(leader) >= resumed_at + 2, 120, "the resumed peer to catch up and step", poll
        )
    finally:
        if stopped:
            os.kill(leader.pid, signal.SIGCONT)
        trainer.stop()
        runner.join(timeout=120)
        trainer.shutdown()
        dht.shutdown()
    assert "error" not in outcome, outcome
    progress = outcome["progress"]
    assert isinstance(progress, Progress)
    print(
        f"hung: stage 1 stepped from {hung_at} to {resumed_at} without its leader; {progress.resent} re-sent"
    )
    assert progress.issued == progress.completed  # none lost, none counted twice
    assert progress.resent >= 1  # the micro-batches on the hung peer went to its mate
    assert assert_same_weights(leader, mate) >= resumed_at + 2
    assert "took" in leader.log_path.read_text()  # it took the stage's state after resuming


# ---- trainers as real processes ---------------------------------------------------------------------


def start_trainer(
    local: LocalSwarm,
    config_dir: Path,
    name: str,
    steps: int,
    *extra: str,
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = local.workdir / f"{name}.log"
    command = [
        sys.executable, "-m", "swarm.cli", "train", "--model", str(config_dir),
        "--initial-peers", *local.initial_peers, "--steps", str(steps), "--micro-batch-size", "8",
        "--target-batch-size", "32", "--lr", "3e-3", "--warmup-steps", "2", "--seq-len", "64",
        "--codec", "none", "--request-timeout", "10", *extra,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=local.env, start_new_session=True
        )
    return proc, log_path


TRAIN_LINE = re.compile(
    r"train: loss ([\d.]+) -> ([\d.]+) in (\d+) steps, (\d+) micro-batches .* issued (\d+)"
)


def finished(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> re.Match[str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    match = TRAIN_LINE.search(text)
    assert match, text[-3000:]
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    return match


def saved_step(path: Path) -> int:
    try:
        return int(load_trainer_checkpoint(path)["step"])
    except Exception:  # not written yet, or being replaced
        return -1


def kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float) -> None:
    def poll() -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        assert proc.poll() is None, "the trainer ended before it could be killed"

    try:
        wait_until(condition, timeout, "the trainer's progress", poll)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_killed_trainer_resumes_from_its_checkpoint(
    swarm_2x2: tuple[LocalSwarm, list[NodeProcess]],
    config_dir: Path,
) -> None:
    local, nodes = swarm_2x2
    ckpt = local.workdir / "trainer-ckpt"
    flags = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    proc, _ = start_trainer(local, config_dir, "trainer-1", 12, *flags)
    kill_when(proc, lambda: saved_step(ckpt / TRAINER_CHECKPOINT) >= 4, 240)
    saved = load_trainer_checkpoint(ckpt / TRAINER_CHECKPOINT)
    proc, log_path = start_trainer(local, config_dir, "trainer-2", 12, *flags)
    match = finished(proc, log_path, 240)
    text = log_path.read_text()
    assert (
        f"resumed from {ckpt / TRAINER_CHECKPOINT}: step {saved['step']}, micro-batch {saved['next_index']}"
        in text
    )
    steps, completed, issued = int(match[3]), int(match[4]), int(match[5])
    assert steps >= 12 and issued == completed
    # The resumed run did only what was left: the steps after the checkpoint, 4 micro-batches each.
    assert completed == (12 - int(saved["step"])) * 4
    for a, b in ((0, 2), (1, 3)):
        assert_same_weights(nodes[a], nodes[b])


def test_two_trainers_train_one_model_and_one_goes_on_when_the_other_is_killed(
    swarm_2x2: tuple[LocalSwarm, list[NodeProcess]],
    config_dir: Path,
) -> None:
    local, nodes = swarm_2x2
    work = local.workdir
    first, _ = start_trainer(
        local, config_dir, "t0", 14, "--shard", "0", "2", "--checkpoint-dir", str(work / "c0")
    )
    second, log_path = start_trainer(
        local, config_dir, "t1", 14, "--shard", "1", "2", "--checkpoint-dir", str(work / "c1")
    )
    try:
        kill_when(first, lambda: epoch_of(nodes[1]) >= 5, 240)  # both have trained a few steps together
        killed_at = epoch_of(nodes[1])
        match = finished(second, log_path, 240)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    start_loss, end_loss, steps, completed, issued = (
        float(match[1]),
        float(match[2]),
        *map(int, match.groups()[2:]),
    )
    print(f"two trainers: one killed at epoch {killed_at}; the other: {completed} micro-batches")
    print(f"two trainers: loss {start_loss} -> {end_loss}")
    assert steps >= 14 and issued == completed
    assert end_loss < start_loss
    assert epoch_of(nodes[1]) >= 14
    for a, b in ((0, 2), (1, 3)):
        assert_same_weights(nodes[a], nodes[b])
