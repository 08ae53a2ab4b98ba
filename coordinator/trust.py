"""Spot checks of remote computation: how often to re-run a server's work, and what counts as equal.

Pure decisions, no network (the client's `swarm.client.verify` does the calls):

- `TrustPolicy`: the chance that a server's next answer is re-run on another server. A server the
  client has not yet seen answer correctly `probation` times (new, or suspicious since a check it
  was part of could not be decided) is checked on every request; a trusted one at `rate`. A liar
  that corrupts a fraction q of its answers thus meets its first check on each of its first
  `probation` requests: caught within them with probability 1 - (1 - q)^probation.
- `tolerance` and `agree`: two honest servers differ by float noise (another dtype, a batch of
  another size, a KV cache instead of a full recomputation, int8 on the wire); a liar by more.
  Outputs agree when every token's hidden vector is within `tol` of the other's, relative to its
  norm.
- `verdict`: with a referee's answer, which server (if any) disagrees with the majority.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from swarm.errors import ConfigError

# Relative error of a token's hidden vector that two honest servers may show, by compute dtype and
# by wire codec (measured over the test models: float32 recomputations differ by ~1e-6, bfloat16
# ones by ~1e-2, int8 blockwise adds ~1e-2 per transfer); the tolerance is the largest that
# applies, a liar's perturbation (bench/trust.py: relative error ~1) far above any of them.
DTYPE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
CODEC_TOLERANCE = {"none": 0.0, "fp16": 0.01, "bf16": 0.05, "int8": 0.08}
UNKNOWN_DTYPE_TOLERANCE = 0.1


def tolerance(dtypes: list[str], codec: str) -> float:
    """Relative error allowed between honest answers of servers of `dtypes` sent with `codec`."""
    by_dtype = max((DTYPE_TOLERANCE.get(d, UNKNOWN_DTYPE_TOLERANCE) for d in dtypes), default=1e-3)
    return max(by_dtype, CODEC_TOLERANCE.get(codec, CODEC_TOLERANCE["int8"]))


def token_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token [.., tokens]: ||a - b|| / max(||a||, ||b||, tiny) over the last (hidden) dim."""
    a, b = a.detach().float(), b.detach().float()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return (a - b).norm(dim=-1) / scale


def agree(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Whether two answers [batch, tokens, hidden] are equal up to honest float noise."""
    if a.shape != b.shape:
        return False
    errors = token_errors(a, b)
    return bool(torch.isfinite(errors).all()) and float(errors.max()) <= tol if errors.numel() else True


def first_disagreement(a: torch.Tensor, b: torch.Tensor, tol: float) -> int | None:
    """The first token position [batch, tokens, hidden] where `a` and `b` differ beyond `tol`."""
    if a.shape != b.shape:
        return 0
    errors = token_errors(a, b)
    bad = (~(errors <= tol)).any(dim=0)  # over the batch; NaN counts as bad
    positions = bad.nonzero()
    return int(positions[0]) if positions.numel() else None


class Verdict(Enum):
    CHECKED_LIES = "checked"  # the checked server disagrees with the other two
    VERIFIER_LIES = "verifier"  # the checker disagrees with the other two
    UNDECIDED = "undecided"  # no referee, or three different answers


def verdict(
    checked: torch.Tensor, verifier: torch.Tensor, referee: torch.Tensor | None, tol: float
) -> Verdict:
    """Majority of three answers, once the checked and the verifying server disagreed."""
    if referee is None:
        return Verdict.UNDECIDED
    if agree(referee, verifier, tol) and not agree(referee, checked, tol):
        return Verdict.CHECKED_LIES
    if agree(referee, checked, tol) and not agree(referee, verifier, tol):
        return Verdict.VERIFIER_LIES
    return Verdict.UNDECIDED


@dataclass
class TrustPolicy:
    """Per-server check rates of one client: everything new or suspicious is checked, the rest sampled."""

    rate: float = 0.05  # chance that a trusted server's answer is re-run; 0 turns checks off
    probation: int = 50  # answers a server must get right before it is sampled at `rate`
    _passed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ConfigError(f"verify rate must be in [0, 1], got {self.rate}")
        if self.probation < 0:
            raise ConfigError(f"verify probation must be >= 0 answers, got {self.probation}")

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def trusted(self, peer_id: str) -> bool:
        return self._passed.get(peer_id, 0) >= self.probation

    def check_probability(self, peer_id: str) -> float:
        """Chance that this server's next answer is re-run elsewhere."""
        if not self.enabled:
            return 0.0
        return self.rate if self.trusted(peer_id) else 1.0

    def stream_check_probability(self, peer_id: str) -> float:
        """The same for one step of an inference stream, new server or not. A stream check covers
        every earlier step of the session too, and every session is checked to its end before its
        tokens are returned: steps checked on the way only find a liar sooner (less to redo)."""
        return self.rate

    def passed(self, peer_id: str, answers: int = 1) -> None:
        """`answers` of this server were checked and found right."""
        self._passed[peer_id] = self._passed.get(peer_id, 0) + answers

    def suspect(self, peer_id: str) -> None:
        """A check it was part of could not be decided: back to probation."""
        self._passed.pop(peer_id, None)


def requests_to_detection(
    corrupt_rate: float, policy: TrustPolicy, rng: torch.Generator, max_requests: int
) -> int | None:
    """Simulate a liar's unary requests under `policy` (fresh per trial): the 1-based request at which
    a corrupted answer is first re-run (and so caught), or None within `max_requests`. Honest answers
    that pass a check count towards the liar's trust, as they would."""
    peer = "liar"
    for n in range(1, max_requests + 1):
        corrupted = float(torch.rand((), generator=rng)) < corrupt_rate
        checked = float(torch.rand((), generator=rng)) < policy.check_probability(peer)
        if checked and corrupted:
            return n
        if checked:
            policy.passed(peer)
    return None
