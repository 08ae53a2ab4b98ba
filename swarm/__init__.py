"""Swarm: run and train large transformer models on pooled volunteer hardware."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
