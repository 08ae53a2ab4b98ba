"""Start `swarm serve` / `swarm monitor` / `swarm chat` as real processes for the tests, and poll HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")


@contextlib.contextmanager
def swarm_command(
    workdir: Path, name: str, args: Sequence[str], timeout: float = 120.0
) -> Iterator[dict[str, Any]]:
    """Run `swarm ARGS --ready-file F`; yield the ready file's facts (+ "log"); stop it by PID after."""
    ready = workdir / f"{name}.ready.json"
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.cli", *args, "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its DHT child is in its group: stopped with it
        )
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready (exit code {code}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)  # poll interval, bounded by the deadline
        yield {**json.loads(ready.read_text()), "log": log_path, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError, KeyError, ValueError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {'name{labels}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain TCP listener on 127.0.0.1:0: the third party a forged target points at."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def accepted(sock: socket.socket) -> int:
    """Connections made to `sock` so far (the kernel completes them without an accept call)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1
