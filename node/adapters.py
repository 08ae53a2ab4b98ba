"""The node's store of client-owned LoRA adapters, bounded in bytes, least recently used out.

A client sends its adapter once per node (LoadAdapter) and then names it by content hash in
each request. Training changes the adapter every optimizer step, so old versions pile up;
the budget evicts them. A request naming an evicted adapter gets NOT_FOUND and the client
sends it again. An inference session keeps its adapter object, so eviction never breaks it.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarm import adapters
from swarm._proto import swarm_pb2
from swarm.errors import AdapterNotLoaded, LimitExceeded, ProtocolError
from swarm.models.llama import BlockLora, LlamaConfig

_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Adapter:
    hash: str
    blocks: dict[int, BlockLora]  # absolute block index -> its LoRA, on the node's device
    nbytes: int


class AdapterCache:
    """Fair share: the adapters one owner (a client connection) loaded may fill at most `share` of
    the budget; a load beyond that evicts that owner's own least recently used adapters first, so
    a client that loads adapters in a loop cannot push every other client's adapter out."""

    def __init__(self, budget_bytes: int, share: float = 1.0) -> None:
        if budget_bytes < 0:
            raise ValueError(f"adapter budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.share = share
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        self._owners: dict[str, str | None] = {}  # adapter hash -> the connection that loaded it
        self._lock = threading.Lock()  # metrics read `used` from another thread

    @property
    def used(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)

    def get(self, key: str) -> Adapter:
        """The adapter with this hash, now the most recently used; AdapterNotLoaded if absent."""
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is None:
                raise AdapterNotLoaded(
                    f"adapter {key[:12]} is not loaded on this node (never sent, or evicted); send it with "
                    "LoadAdapter"
                )
            self._adapters.move_to_end(key)
            return adapter

    def load(
        self,
        request: swarm_pb2.LoadAdapterRequest,
        config: LlamaConfig,
        span: tuple[int, int],
        device: torch.device,
        owner: str | None = None,
    ) -> Adapter:
        """Check a LoadAdapter request against the span and the budget, then keep the adapter."""
        if not _HASH.fullmatch(request.hash):
            raise ProtocolError(f"adapter hash must be 64 lowercase hex digits, got {request.hash[:80]!r}")
        with self._lock:
            known = self._adapters.get(request.hash)
        if known is not None:  # the same content again (a retry, or another client)
            return self.get(request.hash)
        if not math.isfinite(request.scaling):
            raise ProtocolError(f"adapter scaling must be finite, got {request.scaling}")
        declared = sum(math.prod(t.tensor.shape) for t in request.tensors) * 4  # float32 on arrival
        if declared > self.budget:
            raise LimitExceeded(
                f"the adapter needs {declared} bytes, this node keeps at most {self.budget} bytes of "
                "adapters; use a lower rank or fewer target modules"
            )
        tensors = adapters.decode_named(request.tensors, max_elements=self.budget // 4)
        if adapters.adapter_hash(tensors, request.scaling) != request.hash:
            raise ProtocolError("adapter hash does not match its content")
        grouped = adapters.check_adapter(tensors, config, *span)
        on_device = {
            block: {name: (a.to(device), b.to(device)) for name, (a, b) in pairs.items()}
            for block, pairs in grouped.items()
        }
        adapter = Adapter(request.hash, adapters.block_loras(on_device, request.scaling), declared)
        self._keep(adapter, owner)
        return adapter

    def _keep(self, adapter: Adapter, owner: str | None = None) -> None:
        with self._lock:
            self._adapters[adapter.hash] = adapter
            self._owners[adapter.hash] = owner
            if owner is not None:  # over its share: the owner's own oldest adapters go first
                mine = [a for h, a in self._adapters.items() if self._owners.get(h) == owner]
                held = sum(a.nbytes for a in mine)
                for old in mine[:-1]:  # never the newest
                    if held <= self.share * self.budget:
                        break
                    self._drop(old.hash)
                    held -= old.nbytes
            used = sum(a.nbytes for a in self._adapters.values())
            while used > self.budget:  # the newest always fits: load() checked it against the budget
                evicted = next(iter(self._adapters.values()))
                self._drop(evicted.hash)
                used -= evicted.nbytes

    def _drop(self, key: str) -> None:
        del self._adapters[key]
        self._owners.pop(key, None)
