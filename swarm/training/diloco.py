"""Low-communication averaging inside a stage (DiLoCo), and 8-bit averaging payloads with error feedback.

With `--averaging diloco` every peer of a stage steps its own inner AdamW on the gradients of the
micro-batches it served (the collaboration still closes each step together, so the stage's epoch
stays aligned with the trainers' steps, but no gradient travels). Every `outer_every` steps the
peers hand in their parameter delta since the last outer step (anchor - weights), the leader
averages them and every peer applies the same outer Nesterov step to the same anchor, so right
after it the peers hold identical weights again. Between outer steps they drift apart by what
their own micro-batches taught them.

`ErrorFeedback` sends averaging payloads (deltas, gradients, their mean) as int8 blockwise
(swarm.wire) and keeps what the quantization lost, adding it to the next payload, so rounding
errors do not accumulate into a bias.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from swarm import wire
from swarm._proto import swarm_pb2
from swarm.errors import ConfigError

AVERAGING_MODES = ("gradients", "diloco")
AVERAGING_CODECS = ("none", "int8")


# ---- pure decisions ---------------------------------------------------------------------------


def outer_due(epoch: int, every: int) -> bool:
    """Whether the step that closes `epoch` (taking the stage to epoch + 1) ends with an outer step."""
    return (epoch + 1) % every == 0


def outer_between(mine: int, theirs: int, every: int) -> bool:
    """Whether the stage took an outer step between epochs `mine` and `theirs` (mine < theirs): a
    peer that fell behind across one must load the stage's outer state; one that fell behind only
    within an inner stretch just moves its epoch on and keeps its own weights."""
    return theirs // every > mine // every


# ---- the outer state --------------------------------------------------------------------------


class OuterState:
    """The weights after the last outer step (the anchor) and the outer Nesterov momentum.

    Every peer of a stage holds the same OuterState, and applies the same averaged delta to it, so
    that `step` leaves them all with identical weights."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ConfigError(f"outer lr must be > 0 and momentum in [0, 1), got {lr} and {momentum}")
        self.params, self.lr, self.momentum = params, lr, momentum
        self.anchor = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        self.velocity = [torch.zeros_like(a) for a in self.anchor]

    def delta(self) -> list[torch.Tensor]:
        """What the inner steps moved since the anchor, as an outer gradient: anchor - weights."""
        pairs = zip(self.anchor, self.params, strict=True)
        return [a - p.detach().to("cpu", torch.float32) for a, p in pairs]

    def step(self, mean_delta: list[torch.Tensor]) -> None:
        """Nesterov: v = mu v + d; anchor -= lr (d + mu v); weights = anchor. Call exclusively."""
        with torch.no_grad():
            for a, v, d, p in zip(self.anchor, self.velocity, mean_delta, self.params, strict=True):
                v.mul_(self.momentum).add_(d)
                a.sub_(d.add(v, alpha=self.momentum), alpha=self.lr)
                p.copy_(a.to(p.device, p.dtype))

    def reset_to_anchor(self) -> None:
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params, strict=True):
                p.copy_(a.to(p.device, p.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"anchor.{i}": a.clone() for i, a in enumerate(self.anchor)}
        out.update({f"outer_velocity.{i}": v.clone() for i, v in enumerate(self.velocity)})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take over another peer's outer state and move the weights to its anchor."""
        for i, a in enumerate(self.anchor):
            src = tensors.get(f"anchor.{i}")
            if src is None or src.shape != a.shape:
                raise ConfigError(f"the downloaded outer state lacks anchor {i} or has another shape")
            a.copy_(src)
            self.velocity[i].copy_(tensors[f"outer_velocity.{i}"])
        self.reset_to_anchor()


# ---- 8-bit payloads with error feedback ------------------------------------------------------------


class ErrorFeedback:
    """Encodes one stream of averaging payloads (a peer's deltas, a leader's means) in `codec`,
    carrying each payload's quantization error into the next one. With codec "none" it is the
    lossless float32 encoding and keeps nothing."""

    def __init__(self, codec: str) -> None:
        if codec not in AVERAGING_CODECS:
            raise ConfigError(f"averaging codec must be one of {AVERAGING_CODECS}, got {codec!r}")
        self.codec = codec
        self.residual: list[torch.Tensor] | None = None

    def encode(self, tensors: Iterable[torch.Tensor]) -> tuple[list[swarm_pb2.Tensor], list[torch.Tensor]]:
        """(messages, what the receiver decodes from them): a sender that acts on its own payload
        (the leader on the mean it sends) must act on the decoded one to stay equal to the others."""
        tensors = [t.detach().to("cpu", torch.float32) for t in tensors]
        if self.codec == "none":
            return [wire.encode_tensor(t) for t in tensors], tensors
        if self.residual is None or [r.shape for r in self.residual] != [t.shape for t in tensors]:
            self.residual = [torch.zeros_like(t) for t in tensors]
        messages, decoded = [], []
        for t, r in zip(tensors, self.residual, strict=True):
            corrected = t + r
            message = wire.encode_tensor(corrected, "int8")
            back = wire.decode_tensor(message)
            r.copy_(corrected - back)
            messages.append(message)
            decoded.append(back)
        return messages, decoded
