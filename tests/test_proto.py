"""The checked-in generated code must match what `make proto` produces from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert written, "no .proto files found under proto/swarm/v1"
    stale = [p.name for p in written if (ROOT / "swarm" / "_proto" / p.name).read_text() != p.read_text()]
    assert not stale, f"swarm/_proto is stale for {stale}: run `make proto` and commit the result"


def test_service_has_the_contracted_rpcs() -> None:
    from swarm._proto import swarm_pb2

    service = swarm_pb2.DESCRIPTOR.services_by_name["BlockService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Info": (False, False),
        "Forward": (False, False),
        "Backward": (False, False),
        "Inference": (True, True),
        "Ping": (False, False),
        "CheckReachability": (False, False),
        "LoadAdapter": (False, False),
        "GetState": (False, True),
        "Push": (True, False),  # server-to-server push: one client stream per session and next node
    }
