"""Thin helpers over hivemind's DHT: start one with clear errors, and await its calls from asyncio.

`hivemind.DHT` runs its node in a forked process and answers through `MPFuture`s. An MPFuture is a
`concurrent.futures.Future` completed by a background thread, so `asyncio.wrap_future` awaits it
without blocking the event loop, whichever loop (or none) was running when it was created. Its own
`__await__` only works on the loop that was current at creation, so we do not rely on it.

Every call into a DHT writes to one unlocked pipe: use a DHT from one thread (the event loop's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import hivemind
from hivemind.dht import DHT
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import DHTError

if TYPE_CHECKING:
    from swarm.records import NodeIdentity

__all__ = ["DHT", "dht_call", "listen_maddr", "start_dht", "visible_maddrs"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_P2PD = Path(hivemind.__file__).parent / "hivemind_cli" / "p2pd"


def listen_maddr(host: str, port: int) -> str:
    """'127.0.0.1', 0 -> '/ip4/127.0.0.1/tcp/0' (IPv6 hosts get /ip6/)."""
    try:
        version = ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        raise DHTError(f"DHT host must be an IP address (e.g. 0.0.0.0 or 127.0.0.1), got {host!r}") from None
    return f"/ip{version}/{host.strip('[]')}/tcp/{port}"


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    identity: NodeIdentity | None = None,
    startup_timeout: float = 120.0,
) -> DHT:
    """Start a DHT node in a background process and wait until it has joined the swarm.

    Records are signed and checked with `identity`'s own key (a fresh one if None; never hivemind's
    process-wide default, which every DHT in a process would share), and the node's libp2p identity
    is that same key, so `dht.peer_id == identity.peer_id`: the peer id that records carry is the
    identity of the key that signs them. Raises DHTError, saying what to check, if the node cannot
    start or reach any initial peer within `startup_timeout` seconds.
    """
    if identity is None:
        from swarm.records import NodeIdentity  # records builds on this module

        identity = NodeIdentity.generate()
    peers = [_check_initial_peer(p) for p in initial_peers]
    maddr = listen_maddr(host, port)
    if port:
        _check_port_free(host, port)
    # p2pd reads its key from a file once, at start: a private temporary one, gone once it runs.
    with tempfile.TemporaryDirectory(prefix="swarm-dht-") as tmp:
        key_path = Path(tmp) / "identity.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.libp2p_key())
        dht = DHT(
            initial_peers=peers,
            start=False,
            client_mode=client_mode,
            record_validators=[identity.validator],
            host_maddrs=[maddr],
            startup_timeout=startup_timeout,  # p2pd's own start; it can be slow on a loaded machine
            identity_path=str(key_path),
            # hivemind would start a second p2pd to ask the swarm whether the id is taken: slow, and
            # a restarted node's own old entry would count as "taken"
            check_if_identity_free=False,
        )
        # The DHT runs in a forked child. Garbage the parent left uncollected (gRPC aio calls and
        # channels, above all) would be finalized there, where gRPC's state is not valid after
        # fork: a child segfaulted in the garbage collector after in-process gRPC tests. Collect it
        # here, before the fork, instead.
        gc.collect()
        try:
            dht.run_in_background(await_ready=True, timeout=startup_timeout)
        except BaseException as e:
            _stop(dht)
            raise DHTError(_startup_hint(e, maddr, peers, startup_timeout)) from e
    if str(dht.peer_id) != identity.peer_id:  # records would name an id that readers reject
        _stop(dht)
        raise DHTError(f"the DHT started as peer {dht.peer_id}, not as its key's peer {identity.peer_id}")
    return dht


def _check_initial_peer(peer: str) -> str:
    try:
        parsed = Multiaddr(peer)
        parsed.value_for_protocol("p2p")
    except Exception:
        raise DHTError(
            f"initial peer {peer!r} is not a full multiaddr; expected something like "
            "/ip4/1.2.3.4/tcp/31337/p2p/Qm... (copy it from the first node's log)"
        ) from None
    return peer


def _check_port_free(host: str, port: int) -> None:
    """p2pd listens with SO_REUSEPORT, so a second node on a busy port starts "fine" and the kernel then
    splits connections between the two. A plain bind still fails on a port someone listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # tolerate TIME_WAIT leftovers
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise DHTError(
                f"cannot listen on {host}:{port} for the DHT ({e.strerror}); is another node using port "
                f"{port}? Pick another port, or 0 for any free one"
            ) from None


def _startup_hint(error: BaseException, maddr: str, peers: list[str], timeout: float) -> str:
    if isinstance(error, concurrent.futures.TimeoutError | TimeoutError):
        what = f"timed out after {timeout:g} s"
    else:
        what = f"{type(error).__name__}: {error}"
    checks = [f"can this host listen on {maddr}?", f"does hivemind's p2pd run here ({_P2PD} --help)?"]
    if peers:
        checks.insert(0, f"are the initial peers reachable from here and still running ({', '.join(peers)})?")
    return f"could not start the DHT node: {what}. Check: " + " ".join(checks)


def _stop(dht: DHT) -> None:
    try:
        dht.shutdown()
    except Exception:  # already broken: make sure the process is gone, and keep the original error
        logger.debug("DHT shutdown after a failed start raised", exc_info=True)
        if dht.is_alive():
            dht.terminate()


def visible_maddrs(dht: DHT) -> list[str]:
    """Multiaddrs other peers can use as --initial-peers for this node (blocks briefly)."""
    return [str(m) for m in dht.get_visible_maddrs()]


def _retrieve(answer: asyncio.Future[Any]) -> None:
    """Mark an answer nobody waits for any more as seen (asyncio would log a lost exception)."""
    if not answer.cancelled():
        answer.exception()


async def dht_call(future: concurrent.futures.Future[T], *, timeout: float | None = None) -> T:
    """Await the MPFuture of `dht.get/store/run_coroutine(..., return_future=True)` without blocking.

    Errors come back as DHTError (a timeout, a dead DHT process, or the DHT's own exception).
    """
    answer = asyncio.wrap_future(future)
    answer.add_done_callback(_retrieve)
    try:
        # Shielded: a caller that stops waiting (cancelled, timed out) leaves the request to finish in
        # the DHT process and drops its answer. Cancelling hivemind's future instead makes the DHT
        # process fail to set its result later, which it logs as an ERROR with two tracebacks.
        return await asyncio.wait_for(asyncio.shield(answer), timeout)
    except TimeoutError:  # asyncio's is the builtin since 3.11
        raise DHTError(f"the DHT did not answer within {timeout} s") from None
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise DHTError(f"DHT request failed: {type(e).__name__}: {e}") from e
