"""Start and stop a swarm of local processes: used by `make demo`, the tests and bench/.

Each process is a real `swarm-node` started with `--ready-file`; we wait for that file
(checking the process is still alive) instead of sleeping, and stop only the processes
we started, by PID: SIGTERM first, SIGKILL if they do not exit in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from swarm import tls
from swarm.errors import SwarmError


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def channel(self, timeout: float = 10.0) -> grpc.Channel:
        """A blocking gRPC channel to this node, as its ready line says to dial it (TLS pinned to
        its certificate, or plaintext for a --no-tls node)."""
        return tls.sync_channel(
            self.info["grpc_address"], self.info.get("tls_cert_sha256"), peer=self.name, timeout=timeout
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm:
    def __init__(
        self,
        workdir: Path,
        *,
        ready_timeout: float = 240.0,
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        """`command_prefix` goes before every command, e.g. `("ip", "netns", "exec", NS)`."""
        self.workdir = Path(workdir)
        self.command_prefix = list(command_prefix)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        # Measured throughput is cached per swarm, not in the user's ~/.cache.
        cache = str(self.workdir / "cache")
        # COLUMNS: wide log lines, so an error message is never wrapped mid-flag.
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "400",
            "SWARM_CACHE_DIR": cache,
            **(env or {}),
        }
        self.processes: list[NodeProcess] = []
        self.initial_peers: list[str] = []

    def _start(self, name: str, args: Sequence[str], module: str = "swarm.node.cli") -> NodeProcess:
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        command = [sys.executable, "-m", module, *args, "--ready-file", str(ready)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*self.command_prefix, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal reaches only us; we stop children ourselves
            )
        node = NodeProcess(name, proc, log_path)
        self.processes.append(node)
        node.info = self._await_ready(node, ready)
        return node

    def _await_ready(self, node: NodeProcess, ready: Path) -> dict[str, Any]:
        deadline = time.monotonic() + self.ready_timeout
        while not ready.exists():
            try:
                code = node.proc.wait(timeout=0.05)  # doubles as the poll interval
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise SwarmError(
                    f"{node.name} exited with code {code} before it was ready:\n{node.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise SwarmError(
                    f"{node.name} was not ready within {self.ready_timeout} s:\n{node.log_tail()}"
                )
        info: dict[str, Any] = json.loads(ready.read_text())
        return info

    def start_dht(self, name: str = "dht") -> NodeProcess:
        node = self._start(name, ["dht", "--host", "127.0.0.1", "--port", "0"])
        self.initial_peers = list(node.info["maddrs"])
        return node

    def start_node(
        self, model: str | Path, blocks: str | None, *extra: str, name: str | None = None
    ) -> NodeProcess:
        """Start `swarm-node join`; blocks=None lets the node choose (and move) by itself."""
        if not self.initial_peers:
            raise SwarmError("start_dht() first: nodes need an initial peer")
        label = blocks.replace(":", "-") if blocks else "auto"
        name = name or f"node-{label}-{len(self.processes)}"
        span = ["--blocks", blocks] if blocks else []
        args = ["join", "--model", str(model), *span, "--initial-peers", *self.initial_peers, *extra]
        return self._start(name, args)

    def start_command(self, name: str, *args: str) -> NodeProcess:
        """Start `swarm ARGS` (a command taking --ready-file: serve, monitor) and wait until it is ready."""
        return self._start(name, args, module="swarm.cli")

    def stop(self, node: NodeProcess, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` to one of our processes and wait; SIGKILL if it outlives `timeout`.

        A node forks its DHT daemon. SIGKILL, like a machine dying, takes the node's whole
        process group (ours: it was started in a session of its own), so no orphaned DHT peer
        lingers; after any stop, whatever is left of the group is killed too.
        """
        if node.proc.poll() is None:
            if sig == signal.SIGKILL:
                _kill_group(node.pid)
            else:
                node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        _kill_group(node.pid)
        return node.proc.returncode

    def close(self) -> None:
        for node in reversed(self.processes):  # nodes before the DHT they announce to
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(self.processes):
            self.stop(node)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group we started; nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
