"""`swarm-node`: what a volunteer runs.

    swarm-node dht  [--host H] [--port P] [--ready-file F]          a bootstrap DHT peer
    swarm-node join --model M --initial-peers MADDR                 serve the blocks the swarm needs
    swarm-node join --model M --initial-peers MADDR --blocks A:B    serve blocks A..B-1, never move

Both print one line `swarm-node ready: ...` once they serve, and write the same facts as
JSON to --ready-file, so scripts and tests wait for readiness instead of sleeping.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

# Idle OpenMP threads spin for a while after each kernel by default. Several processes on one
# machine (a local swarm, a node beside its user) then steal each other's cores: on 2 cores the
# demo ran at 20 tokens/s instead of 55. Waiting passively costs a node next to nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from swarm.cli_args import add_config_arguments, config_from_args
from swarm.errors import SwarmError
from swarm.node.config import DHTPeerConfig, NodeConfig

log = logging.getLogger("swarm.node")


def _raise_exit(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


def setup_logging() -> None:
    from rich.logging import RichHandler

    level = os.environ.get("SWARM_LOG_LEVEL", "INFO").upper()
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler])
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def announce_ready(facts: dict[str, Any], ready_file: str | None) -> None:
    """Print the ready line and (atomically) write the same facts as JSON."""
    parts = [
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in facts.items()
        if v is not None
    ]
    print("swarm-node ready: " + " ".join(parts), flush=True)
    if ready_file:
        path = Path(ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(path)


def run_dht(cfg: DHTPeerConfig) -> int:
    from swarm.dht import start_dht, visible_maddrs

    dht = start_dht(
        initial_peers=cfg.initial_peers, host=cfg.host, port=cfg.port, startup_timeout=cfg.startup_timeout
    )
    try:
        announce_ready(
            {"peer_id": str(dht.peer_id), "maddrs": visible_maddrs(dht), "pid": os.getpid()}, cfg.ready_file
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(3600):
            pass
        log.info("stopping the DHT peer")
    finally:
        dht.shutdown()
    return 0


def run_join(cfg: NodeConfig, argv: list[str]) -> int:
    import uvloop

    from swarm.dht import start_dht
    from swarm.node.runtime import serve
    from swarm.node.training import serve_training
    from swarm.records import NodeIdentity

    identity = (
        NodeIdentity.load_or_create(Path(cfg.identity_file)) if cfg.identity_file else NodeIdentity.generate()
    )
    # The DHT forks a process: start it before gRPC, torch threads or an event loop exist.
    dht = start_dht(
        initial_peers=cfg.initial_peers,
        host=cfg.host,
        port=cfg.dht_port,
        identity=identity,
        startup_timeout=cfg.startup_timeout,
    )
    on_ready = functools.partial(announce_ready, ready_file=cfg.ready_file)
    try:
        if not cfg.train:
            uvloop.run(serve(cfg, dht, identity, on_ready=on_ready))
            return 0
        move = uvloop.run(serve_training(cfg, dht, identity, on_ready=on_ready))
    finally:
        dht.shutdown()
    if move is not None:  # a fresh process joins the stage that needs it most (the same PID)
        log.info("restarting to join stage %d", move)
        os.execv(sys.executable, [sys.executable, "-m", "swarm.node.cli", *argv])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description="Serve transformer blocks to a Swarm.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_arguments(commands.add_parser("dht", help="run a bootstrap DHT peer"), DHTPeerConfig)
    add_config_arguments(commands.add_parser("join", help="serve blocks of a model"), NodeConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Until the event loop installs its own handlers, SIGTERM ends the process through
    # SystemExit so `finally` blocks still shut the DHT daemon down.
    signal.signal(signal.SIGTERM, _raise_exit)
    started = time.monotonic()
    try:
        if args.command == "dht":
            return run_dht(config_from_args(DHTPeerConfig, args))
        return run_join(config_from_args(NodeConfig, args), list(sys.argv[1:] if argv is None else argv))
    except SwarmError as e:
        log.error("%s", e)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        log.info("stopped after %.1f s", time.monotonic() - started)
        return 0 if code in (0, 128 + signal.SIGTERM, 130) else code


if __name__ == "__main__":
    sys.exit(main())
