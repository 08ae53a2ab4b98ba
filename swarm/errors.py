"""One exception hierarchy for the whole project.

Callers catch `SwarmError` for anything Swarm raises on purpose. Subclasses say what
went wrong in terms a user can act on; `retryable` tells the single retry policy
(`swarm.retry`) whether trying again, possibly elsewhere, can help.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error Swarm raises deliberately."""

    retryable: bool = False


class ConfigError(SwarmError, ValueError):
    """A configuration value is invalid (the message shows the numbers)."""


class CheckpointError(SwarmError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


class ProtocolError(SwarmError):
    """A message on the wire is malformed, of another protocol version, or out of limits."""


class MalformedRequest(ProtocolError):
    """The bytes of a request do not parse as the message its method takes (answered INVALID_ARGUMENT)."""


class LimitExceeded(ProtocolError):
    """A request is well-formed but exceeds a limit of the node (size, batch, session length, cache).

    Retryable: another node (with more free cache, say) may accept it.
    """

    retryable = True


class DeadlineExceeded(SwarmError):
    """A request's deadline passed before a node could start it (its queue was too long).

    Retryable: a less loaded node may answer in time.
    """

    retryable = True


class PeerUnavailable(SwarmError):
    """A peer could not be reached or failed mid-request; another peer may work."""

    retryable = True


class CertificateMismatch(PeerUnavailable):
    """A node's TLS certificate is not the one its signed DHT record pins: it is refused, and
    counts as a failed peer (banned, its work goes elsewhere)."""


class MissingBlocksError(SwarmError):
    """No server in the swarm currently serves some blocks of the model."""

    retryable = True

    def __init__(self, model: str, blocks: list[int], *, after: str = "") -> None:
        self.model = model
        self.blocks = sorted(blocks)
        # `after`: why the servers that did serve them are out of reach for this request (the first
        # failure the retries saw), e.g. each refused a session longer than its limit.
        self.after = after
        if after:
            hint = f"; the servers tried for them failed first: {after}"
        else:
            hint = "; start a node for them (swarm-node join --blocks START:END) or check --initial-peers"
        blocks_of = f"blocks {_ranges(self.blocks)} of model {model!r}"
        super().__init__(f"no server in the swarm serves {blocks_of}{hint}")

    def after_failure(self, failure: Exception) -> MissingBlocksError:
        """The same error, saying that it came after `failure` (a server of these blocks failed or
        refused), which is then the likelier cause than an empty swarm."""
        return MissingBlocksError(self.model, self.blocks, after=str(failure))


class AdapterNotLoaded(SwarmError):
    """A request names a LoRA adapter the node does not hold (never sent, or evicted): send it again."""


class DHTError(SwarmError):
    """The DHT could not be started or reached."""

    retryable = True


class RemoteError(SwarmError):
    """A node refused or failed a request; `code` is the gRPC status name."""

    def __init__(self, peer: str, code: str, details: str, retryable: bool) -> None:
        self.peer = peer
        self.code = code
        self.details = details
        self.retryable = retryable
        super().__init__(f"{peer}: {code}: {details}")

    @property
    def over_a_limit(self) -> bool:
        """The node refused the request as over one of its limits (session length, a full cache):
        a refusal of this request, not a failure of the node."""
        return self.code == "RESOURCE_EXHAUSTED"


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6' (half-open spans, as the CLI takes them)."""
    spans: list[str] = []
    start = prev = None
    for b in blocks:
        if start is None:
            start = prev = b
        elif prev is not None and b == prev + 1:
            prev = b
        else:
            spans.append(f"{start}:{prev + 1}" if prev is not None else "")
            start = prev = b
    if start is not None and prev is not None:
        spans.append(f"{start}:{prev + 1}")
    return ", ".join(spans)
