"""`swarm serve` and `swarm monitor`: one ASGI app (FastAPI on uvicorn) per process.

serve:   the OpenAI API over the swarm + the status page, /api/status and /metrics.
monitor: the status page, /api/status and /metrics only (no model weights loaded).

Both announce readiness once the socket listens: a line on stdout and, with --ready-file, the same
as JSON, so scripts and tests wait on it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from swarm.serve.status import StatusBoard


def create_app(
    board: StatusBoard,
    extra: Callable[[FastAPI], None] | None = None,
    extra_status: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The status page, /api/status and /metrics; `extra` adds routes (the OpenAI API) and
    `extra_status` facts to /api/status (the server's own load)."""
    registry = CollectorRegistry()
    registry.register(board)
    page = resources.files("swarm.serve").joinpath("status.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await board.start()
        try:
            yield
        finally:
            await board.close()

    app = FastAPI(title="Swarm", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def status_page() -> HTMLResponse:
        return HTMLResponse(page)

    async def status() -> JSONResponse:
        body = board.to_json() | (extra_status() if extra_status else {})
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/", status_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/status", status_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/api/status", status, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    if extra is not None:
        extra(app)
    return app


async def run_http(
    app: FastAPI, host: str, port: int, announce: Callable[[str], dict[str, Any]], ready_file: str | None
) -> None:
    """Serve `app` until SIGINT/SIGTERM; once listening, print and write `announce(url)`."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here, so port 0 resolves before the ready line is written
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host
    ready = _when_started(server, lambda: _announce(announce(f"http://{url_host}:{bound}"), ready_file))
    try:
        await asyncio.gather(server.serve(sockets=[sock]), ready)
    finally:
        sock.close()


async def _when_started(server: Any, then: Callable[[], None]) -> None:
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)  # poll uvicorn's flag; bounded by the server's own life
    then()


def _announce(info: dict[str, Any], ready_file: str | None) -> None:
    line = " ".join(f"{k}={v}" for k, v in info.items() if k != "command")
    print(f"{info['command']} ready: {line} ", flush=True)
    if ready_file:
        path = Path(ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: v for k, v in info.items() if k != "command"}))
        tmp.replace(path)  # atomic: a reader never sees half the file
