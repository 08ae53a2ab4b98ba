"""LoRA adapters on the wire: tensor names, the content hash, and checks on what arrives.

A client owns its adapter; the nodes only apply it. Each node receives the tensors of the
blocks it runs for that client, keyed by a hash of their content, so that a request names
the adapter in a few bytes and an updated adapter (after an optimizer step) is a new key.
Client and node both compute the hash with `adapter_hash`; the node checks it on arrival.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from swarm import wire
from swarm._proto import swarm_pb2
from swarm.errors import LimitExceeded, ProtocolError
from swarm.models.llama import LORA_PROJECTIONS, BlockLora, LlamaConfig, projection_shapes

MAX_RANK = 1024  # far above any useful LoRA rank; bounds what one request can make a node allocate
_NAME = re.compile(r"(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])")


def tensor_name(block: int, projection: str, which: str) -> str:
    """'3.self_attn.q_proj.lora_A': the block index is absolute, the rest are peft's names."""
    return f"{block}.{LORA_PROJECTIONS[projection]}.{projection}.lora_{which}"


def parse_name(name: str) -> tuple[int, str, str]:
    """(block, projection, 'A' or 'B') of a tensor name; ProtocolError if it is not one."""
    match = _NAME.fullmatch(name)
    if match is None or LORA_PROJECTIONS.get(match[3]) != match[2]:
        raise ProtocolError(
            f"adapter tensor name {name!r} is not '<block>.<self_attn|mlp>.<projection>.lora_<A|B>' "
            f"with a projection among {list(LORA_PROJECTIONS)}"
        )
    return int(match[1]), match[3], match[4]


def adapter_hash(tensors: Mapping[str, torch.Tensor], scaling: float) -> str:
    """sha256 over the scaling and every tensor's name, shape and float32 bytes, in name order."""
    h = hashlib.sha256(struct.pack("<d", float(scaling)))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterPayload:
    """The part of an adapter one hop needs (blocks [start, end)), ready to send."""

    tensors: dict[str, torch.Tensor]  # name -> float32 CPU tensor
    scaling: float
    hash: str

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor], scaling: float) -> AdapterPayload:
        detached = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
        return cls(detached, float(scaling), adapter_hash(detached, scaling))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_request(self, protocol_version: int, model: str) -> swarm_pb2.LoadAdapterRequest:
        return swarm_pb2.LoadAdapterRequest(
            protocol_version=protocol_version,
            model=model,
            hash=self.hash,
            scaling=self.scaling,
            tensors=encode_named(self.tensors),
        )


def encode_named(tensors: Mapping[str, torch.Tensor]) -> list[swarm_pb2.AdapterTensor]:
    """Named float32 tensors, losslessly (adapter weights and their gradients are small)."""
    return [
        swarm_pb2.AdapterTensor(name=name, tensor=wire.encode_tensor(t.to(torch.float32), "none"))
        for name, t in tensors.items()
    ]


def decode_named(
    items: Iterable[swarm_pb2.AdapterTensor], *, max_elements: int | None = None
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for item in items:
        if item.name in tensors:
            raise ProtocolError(f"adapter tensor {item.name!r} appears twice")
        tensors[item.name] = wire.decode_tensor(item.tensor, max_elements=max_elements)
    return tensors


def check_adapter(
    tensors: Mapping[str, torch.Tensor], config: LlamaConfig, start: int, end: int
) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Validate tensors sent for blocks [start, end); group them as block -> projection -> (A, B)."""
    shapes = projection_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        block, projection, which = parse_name(name)
        if not start <= block < end:
            raise ProtocolError(
                f"adapter tensor {name!r} is for block {block}, outside this span {start}:{end}"
            )
        if not t.is_floating_point() or t.dim() != 2:
            raise ProtocolError(
                f"adapter tensor {name!r} must be a 2-d float tensor, got {t.dtype} {list(t.shape)}"
            )
        halves.setdefault((block, projection), {})[which] = t
    grouped: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (block, projection), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ProtocolError(f"block {block} {projection} has lora_{next(iter(pair))} but not its partner")
        a, b = pair["A"], pair["B"]
        in_features, out_features = shapes[projection]
        rank = a.shape[0]
        if not 0 < rank <= MAX_RANK:
            raise LimitExceeded(f"LoRA rank {rank} of block {block} {projection} is not in 1..{MAX_RANK}")
        if list(a.shape) != [rank, in_features] or list(b.shape) != [out_features, rank]:
            raise ProtocolError(
                f"block {block} {projection}: lora_A must be [r, {in_features}] and lora_B "
                f"[{out_features}, r], got {list(a.shape)} and {list(b.shape)}"
            )
        grouped.setdefault(block, {})[projection] = (a, b)
    return grouped


def block_loras(
    grouped: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], scaling: float
) -> dict[int, BlockLora]:
    return {block: BlockLora(dict(pairs), scaling) for block, pairs in grouped.items()}
