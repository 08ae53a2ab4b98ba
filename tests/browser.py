"""Debian's Chromium, headless, driven over the DevTools protocol (a websocket): no browser download.

One page stays open, so a test sees the page change by itself (live refresh), not a reload.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

# Flags for this closed network: without the background-networking ones Chromium keeps trying
# (and failing) to reach Google's hosts.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-allow-origins=*",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        for _ in range(10_000):  # events may arrive before our answer; bounded
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
        raise RuntimeError(f"no answer to {method}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))


@contextlib.contextmanager
def open_page(url: str, workdir: Path, timeout: float = 60.0) -> Iterator[Page]:
    """Start Chromium on `url` and yield its page; Chromium is stopped (by PID) afterwards."""
    import websocket

    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium is not installed: run scripts/system-deps.sh")
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "chromium.log", "wb")  # noqa: SIM115 — closed below
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", url],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = _devtools_port(profile / "DevToolsActivePort", proc, timeout)
        pages = [
            t
            for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            if t["type"] == "page"
        ]
        ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        try:
            yield Page(ws)
        finally:
            ws.close()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _devtools_port(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Chromium writes its DevTools port to the profile once it listens: wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with code {proc.returncode}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(path.read_text().splitlines()[0])
        time.sleep(0.05)
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout} s")
