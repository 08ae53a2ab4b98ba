"""Client-owned LoRA on remote blocks: peft's format both ways, exact gradients, a real fine-tune.

The reference is peft itself on the transformers model loaded from the same checkpoint, so
these tests check interoperability and correctness at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers

from swarm import adapters
from swarm._proto import swarm_pb2
from swarm.client.autograd import run_remote_blocks
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.lora import LoraConfig, RemoteLora
from swarm.client.model import DistributedModelForCausalLM, causal_lm_loss
from swarm.coordinator.routing import Hop
from swarm.errors import AdapterNotLoaded, ConfigError, LimitExceeded, ProtocolError
from swarm.localswarm import LocalSwarm
from swarm.models.llama import LlamaConfig
from swarm.node.adapters import AdapterCache
from tests.checkpoints import make_checkpoint

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One rank-4 adapter on every projection of a node's 4 blocks is 64 KiB: the nodes keep one, not two.
ADAPTER_BUDGET = 100_000


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "lora-llama", "llama", num_layers=8, eos_token_id=[]
    )


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LocalSwarm]:
    budget = ("--dtype", "float32", "--adapter-cache-bytes", str(ADAPTER_BUDGET))
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as local:
        local.start_dht()
        local.start_node(model_path, "0:4", *budget, name="first")
        local.start_node(model_path, "4:8", *budget, name="second")
        yield local


@pytest.fixture(scope="module")
def client(local_swarm: LocalSwarm, model_path: Path) -> Iterator[DistributedModelForCausalLM]:
    exact = ClientConfig(training_codec="none")  # gradients comparable to float rounding
    with DistributedModelForCausalLM.from_pretrained(
        model_path, local_swarm.initial_peers, client_config=exact
    ) as model:
        yield model


def hf_model(model_path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def random_adapter(
    client: DistributedModelForCausalLM, seed: int, targets: tuple[str, ...] = ALL
) -> RemoteLora:
    """A new adapter with B drawn at random too, so it changes the outputs (peft's B = 0 would not)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return client.add_adapter(config, seed=seed)


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def wire_name(peft_name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight'
    -> '3.self_attn.q_proj.lora_A'."""
    parts = peft_name.split(".")
    i = parts.index("layers")
    return ".".join(parts[i + 1 : i + 5])


# ---- the swarm against peft ------------------------------------------------------------------


def test_saved_adapter_loads_in_peft_with_the_same_logits(
    client: DistributedModelForCausalLM, model_path: Path, tmp_path: Path
) -> None:
    random_adapter(client, seed=1)
    input_ids = ids(2, 10, seed=0)
    with torch.no_grad():
        got = client(input_ids)
        client.save_adapter(tmp_path / "adapter")
        reference = peft.PeftModel.from_pretrained(hf_model(model_path), tmp_path / "adapter").eval()
        expected = reference(input_ids).logits
        plain = hf_model(model_path)(input_ids).logits
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert relative_error(got, expected) <= 1e-5
    assert relative_error(plain, expected) > 1e-2  # the adapter really changes the model


def test_peft_adapter_runs_on_the_swarm_for_generation(
    client: DistributedModelForCausalLM, model_path: Path, tmp_path: Path
) -> None:
    """peft -> swarm: an adapter made by peft, loaded by the client, generates peft's tokens."""
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(5)
    reference = peft.get_peft_model(hf_model(model_path), config).eval()
    reference.save_pretrained(str(tmp_path / "from-peft"))
    client.load_adapter(tmp_path / "from-peft")

    prompt = ids(1, 6, seed=3)
    expected = prompt
    with torch.no_grad():
        for _ in range(12):  # greedy, one full forward per token: the plainest reference
            next_id = reference(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert client.generate(prompt, max_new_tokens=12).tolist() == expected.tolist()
    client.disable_adapters()
    try:
        assert client.generate(prompt, max_new_tokens=12).tolist() != expected.tolist()
    finally:
        client.enable_adapters()


def test_lora_gradients_through_the_swarm_equal_peft(
    client: DistributedModelForCausalLM, model_path: Path, tmp_path: Path
) -> None:
    adapter = random_adapter(client, seed=2)
    client.save_adapter(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(hf_model(model_path), tmp_path / "adapter", is_trainable=True)
    input_ids = ids(2, 9, seed=4)

    adapter.zero_grad(set_to_none=True)
    loss = client(input_ids, labels=input_ids).loss
    loss.backward()
    expected = causal_lm_loss(reference(input_ids).logits, input_ids)
    expected.backward()

    assert relative_error(loss.detach(), expected.detach()) <= 1e-5
    local = {wire_name(n): p.grad for n, p in reference.named_parameters() if p.grad is not None}
    remote = {n: p.grad for n, p in adapter.named_tensors().items()}
    assert set(remote) == set(local) and len(remote) == 8 * 7 * 2
    for name, grad in remote.items():
        assert grad is not None, name
        assert relative_error(grad, local[name]) <= 1e-4, name


def test_fine_tuning_an_adapter_halves_the_loss(client: DistributedModelForCausalLM) -> None:
    """Teach the random model to continue a fixed pattern, training only the LoRA."""
    pattern = torch.tensor([7, 19, 3, 88, 41, 60])
    batch = torch.stack([pattern.roll(-shift).repeat(4) for shift in range(4)])  # [4, 24]
    adapter = client.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=ALL), seed=0)
    for p in client.parts.parameters():
        p.requires_grad_(False)
    try:
        optimizer = torch.optim.Adam(adapter.parameters(), lr=2e-2)
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            out = client(batch, labels=batch)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
    finally:
        for p in client.parts.parameters():
            p.requires_grad_(True)
    print(f"lora fine-tune: loss {losses[0]:.2f} -> {losses[-1]:.2f} in {len(losses)} steps")
    assert losses[-1] <= 0.5 * losses[0], losses
    # the trained adapter also drives generation: the pattern continues
    generated = client.generate(batch[:1, :8], max_new_tokens=6)
    assert generated[0, 8:].tolist() == batch[0, 8:14].tolist()


def test_node_that_dropped_an_adapter_gets_it_again(
    client: DistributedModelForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node keeps one of these adapters: alternating two forces NOT_FOUND and a resend."""
    first = random_adapter(client, seed=11)
    first.save_pretrained(tmp_path / "first")
    input_ids = ids(1, 7, seed=8)
    resent: list[str] = []
    ensure = client.pool.ensure_adapter

    async def counting(model: str, hop: Any, payload: Any, *, again: bool = False) -> None:
        if again:
            resent.append(hop.peer_id)
        await ensure(model, hop, payload, again=again)

    monkeypatch.setattr(client.pool, "ensure_adapter", counting)
    with torch.no_grad():
        a1 = client(input_ids)
        random_adapter(client, seed=12)
        b = client(input_ids)
        client.load_adapter(tmp_path / "first")  # the nodes evicted it for the second one
        a2 = client(input_ids)
        with client.inference_session(max_length=8) as session:  # a session opens with it too
            logits = client.next_token_logits(session, client.parts.embed(input_ids))
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(logits, a1[:, -1])
    assert len(resent) == 2  # both nodes had dropped the first adapter, and each got it again
    assert relative_error(b, a1) > 1e-2


# ---- config and format checks ----------------------------------------------------------------


def test_lora_config_from_peft_and_errors() -> None:
    ours = LoraConfig.from_peft(peft.LoraConfig(r=16, lora_alpha=32, target_modules=["v_proj", "q_proj"]))
    assert (ours.r, ours.lora_alpha, ours.target_modules, ours.scaling) == (
        16,
        32.0,
        ("q_proj", "v_proj"),
        2.0,
    )
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig.from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="lm_head"):
        LoraConfig(target_modules=("q_proj", "lm_head"))
    with pytest.raises(ConfigError, match="r must be >= 1"):
        LoraConfig(r=0)


def test_target_modules_regex_and_layers(model_path: Path) -> None:
    config = LlamaConfig.from_hf_dict(json.loads((model_path / "config.json").read_text()))
    regex = LoraConfig(target_modules=r".*layers\.(1|2)\.self_attn\.(q|k)_proj")
    assert regex.targets(config) == [(1, "q_proj"), (1, "k_proj"), (2, "q_proj"), (2, "k_proj")]
    some = LoraConfig(target_modules=("o_proj",), layers_to_transform=(3, 0))
    assert some.targets(config) == [(0, "o_proj"), (3, "o_proj")]
    assert len(LoraConfig(target_modules="all-linear").targets(config)) == 8 * 7
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoraConfig(layers_to_transform=(9,)).targets(config)


def test_adapter_directory_errors(model_path: Path, tmp_path: Path) -> None:
    config = LlamaConfig.from_hf_dict(json.loads((model_path / "config.json").read_text()))
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        RemoteLora.load_pretrained(tmp_path, config)
    adapter = RemoteLora(config, LoraConfig(r=2))
    adapter.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 3, "target_modules": ["q_proj", "v_proj"]}'
    )
    with pytest.raises(ConfigError, match="expected"):  # rank 2 tensors, config says 3
        RemoteLora.load_pretrained(tmp_path / "a", config)


# ---- the node's adapter store ----------------------------------------------------------------


def small_config() -> LlamaConfig:
    return LlamaConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
        }
    )


def load_request(
    config: LlamaConfig, blocks: range, seed: int, rank: int = 2
) -> swarm_pb2.LoadAdapterRequest:
    adapter = RemoteLora(config, LoraConfig(r=rank, target_modules=("q_proj", "down_proj")), seed=seed)
    payload = adapter.payload(blocks.start, blocks.stop)
    assert payload is not None
    return payload.to_request(1, "m")


def test_adapter_store_is_bounded_least_recently_used_first() -> None:
    config = small_config()
    one = load_request(config, range(0, 2), seed=0)
    size = sum(len(t.tensor.data) for t in one.tensors)  # float32 bytes
    store = AdapterCache(budget_bytes=2 * size)
    first = store.load(one, config, (0, 2), torch.device("cpu"))
    second = store.load(load_request(config, range(0, 2), seed=1), config, (0, 2), torch.device("cpu"))
    assert store.used == 2 * size and first.hash != second.hash
    store.get(first.hash)  # first is now the most recently used
    store.load(load_request(config, range(0, 2), seed=2), config, (0, 2), torch.device("cpu"))
    assert store.used == 2 * size
    assert store.get(first.hash) is first
    with pytest.raises(AdapterNotLoaded, match="LoadAdapter"):
        store.get(second.hash)
    lora = first.blocks[0]
    assert set(lora.pairs) == {"q_proj", "down_proj"} and lora.scaling == 4.0  # alpha 8 / r 2


def test_adapter_store_rejects_bad_adapters() -> None:
    config = small_config()
    cpu = torch.device("cpu")
    store = AdapterCache(budget_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="outside this span"):
        store.load(load_request(config, range(0, 4), seed=0), config, (0, 2), cpu)
    tampered = load_request(config, range(0, 2), seed=0)
    tampered.scaling = 100.0
    with pytest.raises(ProtocolError, match="hash does not match"):
        store.load(tampered, config, (0, 2), cpu)
    with pytest.raises(LimitExceeded, match="at most 100 bytes"):
        AdapterCache(budget_bytes=100).load(load_request(config, range(0, 2), seed=0), config, (0, 2), cpu)
    wrong_shape = {
        "0.self_attn.q_proj.lora_A": torch.zeros(2, 15),
        "0.self_attn.q_proj.lora_B": torch.zeros(16, 2),
    }
    with pytest.raises(ProtocolError, match=r"lora_A must be \[r, 16\]"):
        adapters.check_adapter(wrong_shape, config, 0, 2)
    with pytest.raises(ProtocolError, match="partner"):
        adapters.check_adapter({"0.mlp.up_proj.lora_A": torch.zeros(2, 16)}, config, 0, 2)
    with pytest.raises(ProtocolError, match="is not"):
        adapters.parse_name("0.mlp.q_proj.lora_A")  # q_proj lives in self_attn
    assert len(store) == 0


def test_cli_generate_applies_an_adapter(
    local_swarm: LocalSwarm, client: DistributedModelForCausalLM, model_path: Path, tmp_path: Path
) -> None:
    random_adapter(client, seed=21)
    client.save_adapter(tmp_path / "adapter")
    prompt = [3, 17, 42]
    expected = client.generate(torch.tensor([prompt]), max_new_tokens=6)[0, 3:].tolist()
    command = [sys.executable, "-m", "swarm.cli", "generate", "--model", str(model_path)]
    command += ["--initial-peers", *local_swarm.initial_peers, "--prompt-ids", *map(str, prompt)]
    command += ["--max-new-tokens", "6", "--adapter", str(tmp_path / "adapter")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=True)
    assert [int(t) for t in result.stdout.split()] == expected
    client.disable_adapters()
    try:  # the adapter made the difference
        assert client.generate(torch.tensor([prompt]), max_new_tokens=6)[0, 3:].tolist() != expected
    finally:
        client.enable_adapters()


def test_lora_backward_goes_elsewhere_when_a_server_dies(
    local_swarm: LocalSwarm, client: DistributedModelForCausalLM, model_path: Path, tmp_path: Path
) -> None:
    """A server of blocks 4:8 is SIGKILLed between forward and backward: the retry sends the adapter
    to the other server of that span, and the gradients still equal peft's."""
    budget = ("--dtype", "float32", "--adapter-cache-bytes", str(ADAPTER_BUDGET))
    spare = local_swarm.start_node(model_path, "4:8", *budget, name="spare")
    spare_id = spare.info["peer_id"]
    snapshot = run_sync(client.swarm_map.get(refresh=True))
    spare_record = next(s for s in snapshot.online() if s.peer_id == spare_id)

    adapter = random_adapter(client, seed=31)
    client.save_adapter(tmp_path / "adapter")
    pipeline = client.remote_pipeline(randomized=True)
    pipeline.route[-1] = Hop(spare_record, 4, 8)  # the forward pass runs 4:8 on the spare node
    input_ids = ids(2, 9, seed=5)
    adapter.zero_grad(set_to_none=True)
    hidden = run_remote_blocks(client.parts.embed(input_ids), pipeline)
    loss = causal_lm_loss(client.parts.logits(hidden), input_ids)
    local_swarm.stop(spare, signal.SIGKILL)
    loss.backward()
    assert pipeline.route[-1].peer_id != spare_id  # backward went to the surviving server

    reference = peft.PeftModel.from_pretrained(hf_model(model_path), tmp_path / "adapter", is_trainable=True)
    causal_lm_loss(reference(input_ids).logits, input_ids).backward()
    local = {wire_name(n): p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, param in adapter.named_tensors().items():
        assert param.grad is not None, name
        assert relative_error(param.grad, local[name]) <= 1e-4, name
