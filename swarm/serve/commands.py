"""What `swarm serve` and `swarm monitor` run: connect to the swarm, build the app, serve it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from swarm import checkpoint
from swarm.serve.app import create_app, run_http
from swarm.serve.config import MonitorConfig, ServeConfig
from swarm.serve.status import StatusBoard
from swarm.serve.text import TextModel


def text_model_for(model: str) -> TextModel:
    """The tokenizer of a local checkpoint, or of a Hub model (only its tokenizer files are fetched)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return TextModel(path)
    from huggingface_hub import hf_hub_download

    files = [hf_hub_download(model, "tokenizer.json")]
    for optional in ("tokenizer_config.json", "chat_template.jinja"):
        with contextlib.suppress(Exception):  # optional files: any hub error means "absent"
            files.append(hf_hub_download(model, optional))
    return TextModel(Path(files[0]).parent)


def serve(cfg: ServeConfig) -> int:
    from swarm.client.config import ClientConfig
    from swarm.client.model import DistributedModelForCausalLM
    from swarm.serve.engine import Admission, Engine
    from swarm.serve.openai_api import OpenAIServer, install_error_handlers

    text_model = text_model_for(cfg.model)
    client_config = ClientConfig(wait_for_blocks=cfg.wait_for_blocks, require_tls=cfg.require_tls)
    with DistributedModelForCausalLM.from_pretrained(
        cfg.model, cfg.initial_peers, client_config=client_config
    ) as model:
        name = model.model_name
        board = StatusBoard(model.dht, {name: model.config.num_hidden_layers}, cfg.status_interval)

        async def main() -> None:
            # Admission's semaphore belongs to the server's loop: build the engine inside it.
            engine = Engine(model, Admission(cfg.max_sessions, cfg.max_queue))
            api = OpenAIServer(engine, text_model, name, aliases=(cfg.model,))

            def add_api(app: FastAPI) -> None:
                install_error_handlers(app)
                app.include_router(api.router())

            def info(url: str) -> dict[str, Any]:
                return {"command": "swarm serve", "url": url, "model": name}

            def load() -> dict[str, Any]:
                return {"serve": {"in_flight": engine.admission.in_flight, "queued": engine.admission.queued}}

            app = create_app(board, add_api, load)
            try:
                await run_http(app, cfg.host, cfg.port, info, cfg.ready_file)
            finally:
                engine.shutdown()

        asyncio.run(main())
    return 0


def monitor(cfg: MonitorConfig) -> int:
    from swarm.dht import start_dht
    from swarm.serve.status import Discover, discover_models

    models = {
        checkpoint.model_name(m): checkpoint.open_checkpoint(m).config.num_hidden_layers for m in cfg.model
    }
    dht = start_dht(initial_peers=cfg.initial_peers, client_mode=True)
    try:
        # Without --model: every model the swarm's registry lists, followed as nodes come and go.
        watch: dict[str, int] | Discover = models or discover_models(dht)
        board = StatusBoard(dht, watch, cfg.status_interval)

        def info(url: str) -> dict[str, Any]:
            # Discovering, the first refresh (before the server listens) has usually found them.
            found = ",".join(board.maps) or "none-yet"
            return {"command": "swarm monitor", "url": url, "models": found} | (
                {"discovery": "on"} if board.discovering else {}
            )

        asyncio.run(run_http(create_app(board), cfg.host, cfg.port, info, cfg.ready_file))
    finally:
        dht.shutdown()
    return 0
