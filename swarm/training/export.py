"""`swarm export`: gather a model trained on the swarm into one transformers checkpoint.

The blocks live on the training nodes, one stage per peer group; the client parts (embeddings,
final norm, LM head) live with the trainer, which saves them in its trainer.pt. Export asks one
online peer of every stage for its weights (GetState, a block per message), takes the client
parts from the trainer's checkpoint, and writes config.json + safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads and `swarm-node join` serves.

The peers of a stage are kept in step, so any one of them will do; the one hivemind last saw at
the highest epoch is asked first, and if it fails the next one is. Stages are fetched at once
and each may be at its own epoch (a step can land between two downloads): `ExportResult.epochs`
says which epoch of each stage was taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from hivemind.dht import DHT
from torch import Tensor

import swarm
from swarm import checkpoint, wire
from swarm._proto import swarm_pb2
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.remote import ChannelPool, translate_rpc_error
from swarm.dht import dht_call
from swarm.errors import ConfigError, MissingBlocksError, ProtocolError, SwarmError
from swarm.models.llama import ClientParts, LlamaBlock, LlamaConfig, LlamaForCausalLM, hf_block_prefix
from swarm.records import ServerRecord, ServerState, fetch_records, latest_per_peer
from swarm.training.peers import membership_key, signed_entries
from swarm.training.stages import model_name, read_config, run_id
from swarm.training.trainer import TRAINER_CHECKPOINT, load_trainer_checkpoint

log = logging.getLogger("swarm.training")


class ExportError(SwarmError):
    """A stage's weights could not be fetched from any of its peers (the message says why)."""

    retryable = True


@dataclass(frozen=True)
class ExportResult:
    path: Path
    epochs: dict[int, int]  # stage -> epoch of the state taken
    peers: dict[int, str]  # stage -> peer id it was taken from
    num_blocks: int
    trainer_step: int  # the step of the trainer checkpoint the client parts came from


@dataclass(frozen=True)
class BlockState:
    """What GetState gave for one stage."""

    tensors: dict[str, Tensor]  # transformers names: "model.layers.3.mlp.up_proj.weight"
    epoch: int
    peer_id: str


def block_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """A block's tensor names (LlamaBlock's, so without the "model.layers.{i}." prefix) and shapes."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {name: t.shape for name, t in LlamaBlock(config).state_dict().items()}


async def gather_blocks(
    dht: DHT, model: str, config: LlamaConfig, *, timeout: float = 60.0
) -> tuple[dict[str, Tensor], dict[int, int], dict[int, str]]:
    """Every block's weights from the swarm's online training peers: (tensors by transformers name,
    stage -> epoch taken, stage -> peer id taken from). `model` is the name the swarm knows.

    Raises MissingBlocksError if no online training peer serves some blocks, ExportError if every
    peer of a stage failed.
    """
    n = config.num_hidden_layers
    records = await fetch_records(dht, model, list(range(n)), timeout=timeout)
    online = [
        r
        for r in latest_per_peer(x for rs in records.values() for x in rs)
        if r.state == ServerState.ONLINE and r.trainable_stage is not None
    ]
    _check_covered(model, n, {b for r in online for b in range(r.start, r.end)})
    by_stage: dict[int, list[ServerRecord]] = defaultdict(list)
    for r in online:
        assert r.trainable_stage is not None  # filtered above; for mypy
        by_stage[r.trainable_stage].append(r)

    pool = ChannelPool(ClientConfig())  # its channels take messages of up to 256 MiB
    stages = sorted(by_stage)
    tasks = [
        asyncio.ensure_future(_fetch_stage(pool, dht, model, config, k, by_stage[k], timeout)) for k in stages
    ]
    try:
        states = await asyncio.gather(*tasks)
    finally:  # one stage failed (or we were cancelled): the others' downloads are of no use
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
    tensors = {name: t for state in states for name, t in state.tensors.items()}
    # "model.layers.{i}.…": each peer's span was checked whole, so one name per block tells
    _check_covered(model, n, {int(name.split(".")[2]) for name in tensors})
    return (
        tensors,
        {k: s.epoch for k, s in zip(stages, states, strict=True)},
        {k: s.peer_id for k, s in zip(stages, states, strict=True)},
    )


def _check_covered(model: str, num_blocks: int, covered: set[int]) -> None:
    missing = [b for b in range(num_blocks) if b not in covered]
    if missing:
        raise MissingBlocksError(model, missing)


async def _fetch_stage(
    pool: ChannelPool,
    dht: DHT,
    model: str,
    config: LlamaConfig,
    stage: int,
    peers: list[ServerRecord],
    timeout: float,
) -> BlockState:
    """The state of one stage, from the first of its peers that gives a whole one."""
    epochs = await _reported_epochs(dht, model, stage, timeout)
    ordered = sorted(peers, key=lambda r: -epochs.get(r.peer_id, -1))
    errors = []
    for record in ordered:
        try:
            state = await _fetch_peer(pool, model, config, record, timeout)
        except SwarmError as e:  # unreachable, failed mid-stream, or sent something else
            log.warning("stage %d: could not take the state of %s: %s", stage, record.peer_id, e)
            errors.append(f"{record.peer_id}: {e}")
            continue
        log.info(
            "stage %d: blocks %d:%d at epoch %d from %s",
            stage,
            record.start,
            record.end,
            state.epoch,
            record.peer_id,
        )
        return state
    raise ExportError(
        f"could not fetch the weights of stage {stage} from any of its {len(peers)} peer(s): "
        + "; ".join(errors)
    )


async def _fetch_peer(
    pool: ChannelPool, model: str, config: LlamaConfig, record: ServerRecord, timeout: float
) -> BlockState:
    """GetState of one peer, checked to hold exactly its span's tensors, with the config's shapes."""
    if not 0 <= record.start < record.end <= config.num_hidden_layers:
        raise ProtocolError(
            f"announces blocks {record.start}:{record.end}, outside the config's "
            f"{config.num_hidden_layers} blocks (another config?)"
        )
    request = swarm_pb2.StateRequest(protocol_version=swarm.PROTOCOL_VERSION, model=model)
    tensors: dict[str, Tensor] = {}
    epoch = 0
    try:
        stub = await pool.stub(record)
        async for chunk in stub.GetState(request, timeout=timeout):
            epoch = chunk.epoch  # every chunk carries the epoch its weights were copied at
            for named in chunk.tensors:
                tensors[named.name] = wire.decode_tensor(named.tensor)
    except grpc.aio.AioRpcError as e:
        raise translate_rpc_error(record.peer_id, e) from e
    shapes = {
        hf_block_prefix(i) + name: shape
        for i in range(record.start, record.end)
        for name, shape in block_shapes(config).items()
    }
    missing, extra = sorted(shapes.keys() - tensors.keys()), sorted(tensors.keys() - shapes.keys())
    if missing or extra:
        raise ProtocolError(
            f"the state of blocks {record.start}:{record.end} lacks {len(missing)} tensor(s) "
            f"{missing[:3]} and has {len(extra)} unexpected {extra[:3]}"
        )
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise ProtocolError(
                f"{name} has shape {list(tensors[name].shape)}, the config expects {list(shape)}"
            )
    return BlockState(tensors, epoch, record.peer_id)


async def _reported_epochs(dht: DHT, model: str, stage: int, timeout: float) -> dict[str, int]:
    """Peer id -> epoch, as each peer of the stage last published it with its membership of the
    stage's collaboration. Only orders the peers to try, so anything unreadable leaves it empty:
    the epoch taken is the one GetState reports."""
    try:
        future = dht.get(membership_key(run_id(model, stage)), latest=True, return_future=True)
        found: Any = await dht_call(future, timeout=timeout)
        entries = signed_entries(found, f"a membership of stage {stage}")
        return {peer: v["epoch"] for peer, v in entries.items() if isinstance(v.get("epoch"), int)}
    except Exception as e:  # a hiccup of the DHT, or a peer of another version
        log.debug("stage %d: no epochs from the membership records (%s)", stage, e)
        return {}


def export_model(
    dht: DHT, model: str, trainer_checkpoint: Path, out: Path, *, timeout: float = 60.0
) -> ExportResult:
    """Gather the swarm's blocks and the trainer's client parts into a transformers checkpoint.

    model: the training nodes' --model (config.json, or a directory holding it).
    trainer_checkpoint: the trainer's --checkpoint-dir, or the trainer.pt in it.
    """
    config = read_config(model)
    path = Path(trainer_checkpoint)
    if path.suffix != ".pt":  # a directory, as `swarm train --checkpoint-dir` takes
        path = path / TRAINER_CHECKPOINT
    # Before anything is downloaded: without the trainer's parts there is nothing to export.
    saved = load_trainer_checkpoint(path)
    parts = ClientParts(config)
    try:
        parts.load_state_dict(saved["parts"])
    except RuntimeError as e:  # load_state_dict's error for wrong names or shapes
        raise ConfigError(f"{path} does not hold client parts of the model in {model}: {e}") from e
    parts.tie_weights()

    name = model_name(model)
    tensors, epochs, peers = run_sync(gather_blocks(dht, name, config, timeout=timeout))
    full = assemble(config, tensors, parts)
    checkpoint.save_checkpoint(full, Path(out))
    log.info("exported %s (stage epochs %s, trainer step %d) to %s", name, epochs, saved["step"], out)
    return ExportResult(Path(out), epochs, peers, config.num_hidden_layers, int(saved["step"]))


def assemble(config: LlamaConfig, tensors: dict[str, Tensor], parts: ClientParts) -> LlamaForCausalLM:
    """The whole model from the blocks' tensors (transformers names) and the client parts."""
    with torch.device("meta"):  # no random init: the given tensors become the parameters
        model = LlamaForCausalLM(config)
    state = {f"parts.{k}": v for k, v in parts.state_dict().items()}
    for i in range(config.num_hidden_layers):
        for name in block_shapes(config):
            state[f"blocks.{i}.{name}"] = tensors[hf_block_prefix(i) + name]
    model.load_state_dict(state, strict=True, assign=True)
    model.parts.tie_weights()  # assign=True replaced the shared Parameter with two
    return model
