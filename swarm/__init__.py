"""Swarm: run and train large transformer models on pooled volunteer hardware."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# gRPC core logs INFO lines such as "Other threads are currently calling into gRPC, skipping fork()
# handlers" whenever a process with live gRPC threads forks (a DHT, a node subprocess), unless its
# verbosity is set before grpc is first imported; a user's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig
    from swarm.client.model import DistributedModelForCausalLM


def __getattr__(name: str) -> Any:
    # Imported lazily: `import swarm` must stay cheap for the node and the CLI.
    if name == "DistributedModelForCausalLM":
        from swarm.client.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    if name == "ClientConfig":
        from swarm.client.config import ClientConfig

        return ClientConfig
    raise AttributeError(name)


__all__ = ["PROTOCOL_VERSION", "ClientConfig", "DistributedModelForCausalLM", "__version__"]
