"""Spot checks and signed evidence (issue 12): a lying node process is caught, its work redone, and
other clients ban it only on evidence they can check themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm import receipts, wire
from swarm._proto import swarm_pb2
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.remote import call_forward, forward_request
from swarm.coordinator.bans import BanList
from swarm.coordinator.routing import Hop
from swarm.coordinator.trust import (
    TrustPolicy,
    Verdict,
    agree,
    first_disagreement,
    requests_to_detection,
    tolerance,
    verdict,
)
from swarm.errors import ConfigError
from swarm.generation import Decoder, SamplingConfig
from swarm.localswarm import LocalSwarm
from swarm.node.server import corrupt
from swarm.records import NodeIdentity
from tests.checkpoints import make_checkpoint

# ---- pure decisions -------------------------------------------------------------------------------


def test_new_servers_are_checked_on_every_request_until_trusted() -> None:
    policy = TrustPolicy(rate=0.05, probation=3)
    assert policy.check_probability("new") == 1.0
    policy.passed("new", 3)
    assert policy.check_probability("new") == 0.05
    policy.suspect("new")  # a check it was part of could not be decided
    assert policy.check_probability("new") == 1.0
    assert TrustPolicy(rate=0.0).check_probability("new") == 0.0  # off


def test_a_liar_corrupting_a_tenth_of_answers_is_caught_within_50_requests() -> None:
    rng = torch.Generator().manual_seed(0)
    trials = 2000
    caught = sum(
        requests_to_detection(0.1, TrustPolicy(rate=0.05, probation=50), rng, max_requests=50) is not None
        for _ in range(trials)
    )
    assert caught / trials >= 0.99


def test_tolerance_separates_float_noise_from_a_lie() -> None:
    torch.manual_seed(0)
    honest = torch.randn(2, 7, 64)
    assert (
        tolerance(["float32"], "none") < tolerance(["bfloat16"], "none") <= tolerance(["float32"], "int8") + 1
    )
    noisy = honest + 1e-6 * torch.randn_like(honest)
    assert agree(honest, noisy, tolerance(["float32"], "none"))
    bf16 = honest.to(torch.bfloat16).float()
    assert agree(honest, bf16, tolerance(["bfloat16"], "none"))
    lie = honest.clone()
    lie[:, 4:] = corrupt(honest[:, 4:])
    assert not agree(honest, lie, tolerance(["bfloat16"], "int8"))
    assert first_disagreement(lie, honest, tolerance(["float32"], "none")) == 4
    assert verdict(lie, honest, honest.clone(), 1e-3) is Verdict.CHECKED_LIES
    assert verdict(honest, lie, honest.clone(), 1e-3) is Verdict.VERIFIER_LIES
    assert verdict(lie, honest, None, 1e-3) is Verdict.UNDECIDED


def test_client_config_validates_the_spot_check_knobs() -> None:
    with pytest.raises(ConfigError, match=r"verify_rate must be in \[0, 1\].*got 1.5"):
        ClientConfig(verify_rate=1.5)
    with pytest.raises(ConfigError, match=r"verify_probation must be >= 0 answers, got -1"):
        ClientConfig(verify_probation=-1)
    with pytest.raises(ConfigError, match=r"verify_tolerance must be in \(0, 1\), got 0"):
        ClientConfig(verify_tolerance=0.0)


def test_a_convicted_peer_stays_banned_after_a_success() -> None:
    bans = BanList()
    bans.convict("liar")
    bans.forgive("liar")  # what an answered step does
    assert "liar" in bans.banned()


def test_decoder_rewinds_to_a_position_and_refeeds_what_it_keeps() -> None:
    decoder = Decoder(torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=5))
    for token in (7, 8, 9):
        logits = torch.zeros(1, 16)
        logits[0, token] = 1
        decoder.advance(logits)
    assert decoder.out.tolist() == [[1, 2, 3, 7, 8, 9]]
    assert decoder.rewind(4) == 4
    assert decoder.out.tolist() == [[1, 2, 3, 7]] and decoder.position == 0
    assert decoder.new_ids.tolist() == [[1, 2, 3, 7]]
    assert decoder.rewind(0) == 3  # never the prompt


# ---- receipts -------------------------------------------------------------------------------------


def test_a_receipt_verifies_only_for_its_signer_request_and_response() -> None:
    identity = NodeIdentity.generate()
    request = swarm_pb2.ForwardRequest(hidden_states=wire.encode_tensor(torch.ones(1, 2, 4), "none"))
    response = swarm_pb2.ForwardResponse(hidden_states=wire.encode_tensor(torch.zeros(1, 2, 4), "none"))
    receipts.sign_response(
        receipts.ReceiptSigner(identity.private_key), "Forward", receipts.message_digest(request), response
    )
    digest = receipts.message_digest(request)
    assert receipts.verify_receipt(identity.peer_id, "Forward", digest, response)
    assert not receipts.verify_receipt(NodeIdentity.generate().peer_id, "Forward", digest, response)
    other = swarm_pb2.ForwardRequest(hidden_states=wire.encode_tensor(torch.zeros(1, 2, 4), "none"))
    assert not receipts.verify_receipt(identity.peer_id, "Forward", receipts.message_digest(other), response)
    tampered = swarm_pb2.ForwardResponse()
    tampered.CopyFrom(response)
    tampered.hidden_states.CopyFrom(wire.encode_tensor(torch.ones(1, 2, 4), "none"))
    assert not receipts.verify_receipt(identity.peer_id, "Forward", digest, tampered)
    # signed by another key but carrying this node's public key: refused
    forged = swarm_pb2.ForwardResponse()
    forged.CopyFrom(response)
    forged.receipt.signature = RSAPrivateKey().sign(b"anything")
    assert not receipts.verify_receipt(identity.peer_id, "Forward", digest, forged)
    # a receipt key that this node's RSA key did not endorse: refused, though its signature is right
    stranger = receipts.ReceiptSigner(RSAPrivateKey())
    impostor = swarm_pb2.ForwardResponse()
    impostor.CopyFrom(response)
    impostor.ClearField("receipt")
    stranger.sign("Forward", digest, impostor)
    impostor.receipt.public_key = response.receipt.public_key
    assert not receipts.verify_receipt(identity.peer_id, "Forward", digest, impostor)
    impostor.receipt.receipt_key_signature = response.receipt.receipt_key_signature
    assert not receipts.verify_receipt(identity.peer_id, "Forward", digest, impostor)


def test_a_receipt_of_a_node_without_a_receipt_key_still_verifies() -> None:
    """Nodes before receipt keys signed each answer with their RSA key: such receipts stay valid."""
    identity = NodeIdentity.generate()
    request = swarm_pb2.ForwardRequest(hidden_states=wire.encode_tensor(torch.ones(1, 2, 4), "none"))
    response = swarm_pb2.ForwardResponse(hidden_states=wire.encode_tensor(torch.zeros(1, 2, 4), "none"))
    digest = receipts.message_digest(request)
    signed = receipts._signed_bytes("Forward", digest, receipts.message_digest(response))
    response.receipt.public_key = identity.private_key.get_public_key().to_bytes()
    response.receipt.signature = identity.private_key.sign(signed)
    assert receipts.verify_receipt(identity.peer_id, "Forward", digest, response)
    assert not receipts.verify_receipt(identity.peer_id, "Backward", digest, response)


# ---- real node processes --------------------------------------------------------------------------

PROMPT = torch.tensor([[5, 9, 31, 77, 2, 40]])
NEW_TOKENS = 16


def _swarm_with_a_liar(local: LocalSwarm, model_path: Path) -> tuple[str, list[str]]:
    """Blocks 0:2 on one honest node; 2:4 on two honest nodes and a liar that announces itself the
    fastest (so routes go through it) and perturbs every answer."""
    local.start_dht()
    local.start_node(model_path, "0:2", name="head")
    honest = [local.start_node(model_path, "2:4", "--throughput", "10", name=f"honest-{i}") for i in range(2)]
    liar = local.start_node(model_path, "2:4", "--throughput", "100000", "--corrupt-rate", "1", name="liar")
    return liar.info["peer_id"], [h.info["peer_id"] for h in honest]


def test_a_lying_node_changes_no_token_and_ends_banned(tmp_path: Path) -> None:
    model_path = make_checkpoint(tmp_path / "trust-llama", "llama", num_layers=4, eos_token_id=[])
    with LocalSwarm(tmp_path / "swarm") as local:
        local.start_dht()
        local.start_node(model_path, "0:2", name="head")
        for i in range(2):
            local.start_node(model_path, "2:4", "--throughput", "10", name=f"honest-{i}")
        off = ClientConfig(verify_rate=0.0)
        with DistributedModelForCausalLM.from_pretrained(
            model_path, local.initial_peers, client_config=off
        ) as c:
            expected = c.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        liar = local.start_node(
            model_path, "2:4", "--throughput", "100000", "--corrupt-rate", "1", name="liar"
        )
        liar_id = liar.info["peer_id"]
        with DistributedModelForCausalLM.from_pretrained(
            model_path, local.initial_peers, client_config=off
        ) as c:
            with c.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
                assert liar_id in {s.hop.peer_id for s in session.streams}  # routes do take the liar
            unchecked = c.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert not torch.equal(unchecked, expected)  # without checks the liar changes the tokens
        with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client:
            got = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            assert torch.equal(got, expected)
            assert client.checker.convicted == [liar_id]
            assert liar_id in client.bans.banned()
            assert torch.equal(client.generate(PROMPT, max_new_tokens=NEW_TOKENS), expected)
        # Speculative decoding is checked the same way: drafts rolled back on the liar and on the
        # shadow, and a conviction re-decodes from the first wrong position.
        with DistributedModelForCausalLM.from_pretrained(model_path, local.initial_peers) as client:
            got = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, speculative="lookup", draft_tokens=4)
            assert torch.equal(got, expected)
            assert client.checker.convicted == [liar_id]


def test_published_evidence_bans_a_liar_and_a_forged_report_bans_nobody(tmp_path: Path) -> None:
    model_path = make_checkpoint(tmp_path / "trust-llama", "llama", num_layers=4, eos_token_id=[])
    with LocalSwarm(tmp_path / "swarm") as local:
        liar_id, honest_ids = _swarm_with_a_liar(local, model_path)
        peers = local.initial_peers
        # A client runs forward passes (unary Forward): it catches the liar and publishes its signed answer.
        with DistributedModelForCausalLM.from_pretrained(model_path, peers) as first:
            for _ in range(3):
                first.forward(PROMPT)
                if first.checker.convicted:
                    break
            assert first.checker.convicted == [liar_id]
            reports = run_sync(receipts.fetch_evidence(first.dht, first.model_name))
            assert [r.accused for r in reports] == [liar_id]

            # A dishonest client accuses an honest node with that node's own, correct, signed answer.
            snapshot = run_sync(first.swarm_map.get(refresh=True))
            honest = next(s for s in snapshot.online() if s.peer_id == honest_ids[0])
            hop = Hop(honest, 2, 4)
            request = forward_request(first.model_name, hop, torch.randn(1, 6, 64), first.client_config)
            response = run_sync(call_forward(first.pool, first.model_name, hop, request, first.client_config))
            genuine = receipts.Evidence(
                model=first.model_name,
                accused=honest.peer_id,
                method="Forward",
                request=request.SerializeToString(deterministic=True),
                response=response.SerializeToString(deterministic=True),
            )
            # ... and the same answer, altered (its receipt no longer matches).
            altered = swarm_pb2.ForwardResponse()
            altered.CopyFrom(response)
            altered.hidden_states.CopyFrom(wire.encode_tensor(torch.randn(1, 6, 64), "none"))
            tampered = genuine.model_copy(update={"response": altered.SerializeToString(deterministic=True)})
            for forged in (genuine, tampered):
                assert run_sync(receipts.publish_evidence(first.dht, forged))

        # A second client that never talked to the liar reads the reports before its first request.
        with DistributedModelForCausalLM.from_pretrained(model_path, peers) as second:
            banned = run_sync(second.review_reports())
            assert banned == [liar_id]
            assert second.bans.banned() == {liar_id}
            assert not set(honest_ids) & second.bans.banned()
