"""Benchmark greedy generation: one process vs a local swarm, with a killed node, and over a WAN.

    python bench/inference.py [--new-tokens 64] [--reps 3] [--out bench/results/inference.json]

All on one machine, in one run, with the demo-size model (swarm/demo.py: a random 8-block
Llama, hidden 512, vocab 4096, float32 on the CPU), and (a)/(b) again with the same blocks and a
32000-token vocabulary (16-token prompt). The one-process baseline uses every core with torch's
default threads, as a user would run it:

(a) local   the model run in this process (checkpoint.load_model + KV caches, as the demo does);
(b) swarm   through 2 nodes on loopback (blocks 0:4 and 4:8), DistributedModelForCausalLM.generate;
            (a) and (b) alternate, `--reps` times each, medians reported;
(c) killed  every span served twice (4 nodes); the node serving the last hop of the session's
            route is SIGKILLed halfway through the generation; the session re-routes and replays.
            Reported: tokens/s and the extra seconds against (b) and against an undisturbed run
            in the same 4-node swarm;
(d) wan     the 2 nodes in a network namespace created here, reached from the client (and the
            DHT peer, both in the root namespace) over a veth pair with `tc netem delay 25ms
            rate 100mbit` on each end, so every hop costs one 50 ms round trip. Achieved decode
            steps/s are compared with the bound 1 / (hops x RTT + compute), compute being the
            per-token time of (a). Needs root, `ip netns` and the netem qdisc. Without them the
            link is emulated by a userspace proxy in front of each node (bench/wan_proxy.py: the
            same one-way delay and rate per direction; nodes announce the proxy's port), and the
            reason is in the table and the JSON; `--wan-no-proxy` skips (d) instead.

(d) is then run again with speculative decoding (bench/spec_wan.py; always over the proxy):
off / lookup / model, alternating `--spec-reps` times, on random text (the demo model) and on
text with repetition, against the one-token-per-round-trip bound; `--speculative-only` runs
just that part, `--skip-speculative` leaves it out.

Every run must give exactly the tokens of (a). The namespace, the veth pair and every process
started here are removed again, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarm import checkpoint
from swarm.client.config import ClientConfig
from swarm.client.loop import run_sync
from swarm.client.model import DistributedModelForCausalLM
from swarm.demo import build_checkpoint
from swarm.dht import start_dht
from swarm.generation import SamplingConfig, generate_tokens
from swarm.localswarm import LocalSwarm, NodeProcess

sys.path.insert(0, str(Path(__file__).parent))
from spec_wan import bench_speculative
from wan_proxy import wan_proxy

PROMPT = [1, 17, 230, 981, 44, 7, 3051, 12]
# The second model: the demo's blocks with a Llama-2-sized vocabulary (head 512 x 32000), 16-token prompt.
BIG_VOCAB = 32000
BIG_PROMPT = [1, 17, 230, 981, 44, 7, 3051, 12, 29871, 13, 450, 4996, 17354, 1701, 29916, 432]
BIG_RATIO_TARGET = 0.85
SPANS = ("0:4", "4:8")
RATIO_TARGET = 0.9  # (b)/(a) and (d)/bound
EXTRA_TARGET_S = 5.0  # (c) extra seconds


@dataclass
class Run:
    case: str  # local | swarm | nopush | swarm4 | killed | wan | wan-nopush (+ 32k cases)
    rep: int
    tokens: int
    seconds: float  # whole generate call, session opening included
    tokens_per_s: float
    decode_steps_per_s: float  # steps after the first token, over the time they took
    match: bool  # same tokens as (a)
    note: str = ""


@dataclass
class Wan:
    ran: bool
    reason: str = ""
    delay_ms: float = 0.0
    rate: str = ""
    hops: int = 2
    rtt_s: float = 0.0
    compute_s: float = 0.0
    bound_steps_per_s: float = 0.0
    steps_per_s: float = 0.0  # with server-to-server push (the default)
    ratio: float = 0.0
    steps_per_s_no_push: float = 0.0  # ClientConfig(push=False): the client relays every hop
    ratio_no_push: float = 0.0
    # With push a token costs one one-way leg per hop plus one back: 1 / ((hops + 1) x RTT/2 + compute).
    push_bound_steps_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Timer:
    """Timestamps of the tokens as they come (generate's on_tokens callback)."""

    def __init__(self, prompt_tokens: int = len(PROMPT)) -> None:
        self.prompt_tokens = prompt_tokens
        self.started = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, _tokens: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def run(
        self, case: str, rep: int, out: torch.Tensor, expected: torch.Tensor | None, note: str = ""
    ) -> Run:
        seconds = time.perf_counter() - self.started
        tokens = out.shape[1] - self.prompt_tokens
        decode = (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0
        match = expected is None or torch.equal(out, expected)
        return Run(case, rep, tokens, seconds, tokens / seconds, decode, match, note)


# ---- (a) local ---------------------------------------------------------------------------------


class Local:
    def __init__(self, path: Path) -> None:
        self.model = checkpoint.load_model(checkpoint.open_checkpoint(path))

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.Tensor, cfg: SamplingConfig, rep: int, expected: torch.Tensor | None
    ) -> tuple[torch.Tensor, Run]:
        timer = Timer(input_ids.shape[1])
        caches = self.model.new_caches(input_ids.shape[0], input_ids.shape[1] + cfg.max_new_tokens)

        def step(ids: torch.Tensor, start: int) -> torch.Tensor:
            return self.model(ids, start=start, caches=caches)[:, -1]

        out = generate_tokens(step, input_ids, cfg, timer)
        return out, timer.run("local", rep, out, expected)


# ---- (b)-(d) through the swarm -----------------------------------------------------------------


def swarm_generate(
    client: DistributedModelForCausalLM,
    input_ids: torch.Tensor,
    n: int,
    case: str,
    rep: int,
    expected: torch.Tensor,
) -> Run:
    timer = Timer(input_ids.shape[1])
    out = client.generate(input_ids, max_new_tokens=n, eos_token_id=[], on_tokens=timer)
    return timer.run(case, rep, out, expected)


def session_generate(
    client: DistributedModelForCausalLM,
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    case: str,
    expected: torch.Tensor,
    before_step: Callable[[Any, int], str] | None = None,
) -> Run:
    """Generate through client.inference_session step by step; before_step(session, start) may act."""
    timer = Timer(input_ids.shape[1])
    notes: list[str] = []
    with client.inference_session(max_length=input_ids.shape[1] + cfg.max_new_tokens) as session:

        def step(ids: torch.Tensor, start: int) -> torch.Tensor:
            if before_step is not None and (note := before_step(session, start)):
                notes.append(note)
            with torch.inference_mode():
                hidden = run_sync(session.step(client.parts.embed(ids)))
                return client.parts.logits(hidden[:, -1:])[:, -1]

        out = generate_tokens(step, input_ids, cfg, timer)
        route = " ".join(f"..{s.hop.peer_id[-6:]}[{s.hop.start}:{s.hop.end}]" for s in session.streams)
    return timer.run(case, 0, out, expected, "; ".join([*notes, f"route {route}"]))


def paired_ratios(runs: list[Run], local: str, swarm: str) -> list[float]:
    """tokens/s of `swarm` over `local` for each rep that ran both."""
    by_rep = {(r.case, r.rep): r.tokens_per_s for r in runs}
    return [
        by_rep[(swarm, rep)] / tps
        for (case, rep), tps in sorted(by_rep.items(), key=lambda kv: kv[0][1])
        if case == local and (swarm, rep) in by_rep
    ]


def alternate(
    local: Local,
    clients: tuple[DistributedModelForCausalLM, DistributedModelForCausalLM],
    input_ids: torch.Tensor,
    cfg: SamplingConfig,
    reps: int,
    expected: torch.Tensor,
    first: Run,
    cases: tuple[str, str, str] = ("local", "swarm", "nopush"),
) -> list[Run]:
    """(a), (b) with push and (b) without push (clients: push on, push off) in turn, `reps` times
    each (the first (a) run is `first`), printed as they come."""
    runs: list[Run] = []
    for client in clients:
        client.generate(input_ids, max_new_tokens=2, eos_token_id=[])  # warm-up: channels, allocations
    for rep in range(reps):
        if rep:
            _, r = local.generate(input_ids, cfg, rep, expected)
        else:
            r = first
        r.case = cases[0]
        runs.append(r)
        print_run(r)
        for client, case in zip(clients, cases[1:], strict=True):
            runs.append(swarm_generate(client, input_ids, cfg.max_new_tokens, case, rep, expected))
            print_run(runs[-1])
    return runs


@contextmanager
def push_on_and_off(
    path: Path, initial_peers: list[str]
) -> Iterator[tuple[DistributedModelForCausalLM, DistributedModelForCausalLM]]:
    """Two clients of one swarm: server-to-server push on (the default) and off."""
    with (
        DistributedModelForCausalLM.from_pretrained(path, initial_peers) as on,
        DistributedModelForCausalLM.from_pretrained(
            path, initial_peers, client_config=ClientConfig(push=False)
        ) as off,
    ):
        yield on, off


def bench_big_vocab(args: argparse.Namespace, workdir: Path) -> list[Run]:
    """(a) and (b) again with the vocab-32000 model: cases local32k / swarm32k."""
    path = build_checkpoint(workdir / "model-32k", vocab_size=BIG_VOCAB)
    input_ids = torch.tensor([BIG_PROMPT])
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
    local = Local(path)
    local.generate(input_ids, SamplingConfig(max_new_tokens=4, eos_token_ids=()), -1, None)  # warm-up
    expected, first = local.generate(input_ids, cfg, 0, None)
    with LocalSwarm(workdir / "swarm-32k") as swarm:
        swarm.start_dht()
        start_nodes(swarm, path, SPANS, node_args(args))
        with push_on_and_off(path, swarm.initial_peers) as (on, off):
            cases = ("local32k", "swarm32k", "nopush32k")
            return alternate(local, (on, off), input_ids, cfg, args.reps, expected, first, cases)


def start_nodes(local: LocalSwarm, path: Path, spans: tuple[str, ...], extra: list[str]) -> list[NodeProcess]:
    """Start nodes concurrently (each waits for its own ready file)."""
    with ThreadPoolExecutor(len(spans)) as pool:
        futures = [
            pool.submit(local.start_node, path, blocks, *extra, name=f"node-{blocks.replace(':', '-')}-{i}")
            for i, blocks in enumerate(spans)
        ]
        return [f.result() for f in futures]


# ---- (d) network namespaces --------------------------------------------------------------------


class NetnsSwarm(LocalSwarm):
    """A LocalSwarm whose DHT peer listens on a given address instead of 127.0.0.1."""

    def start_dht_on(self, host: str, name: str = "dht") -> NodeProcess:
        node = self._start(name, ["dht", "--host", host, "--port", "0"])
        self.initial_peers = list(node.info["maddrs"])
        return node


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _must(*cmd: str) -> None:
    done = _sh(*cmd)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")


def wan_unavailable() -> str:
    """Why (d) cannot run here, or "" if it can (netem itself is probed in wan_namespace)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    return ""


def _netem_hint() -> str:
    try:
        import gzip

        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    except OSError:
        return ""
    return (
        " (kernel built without CONFIG_NET_SCH_NETEM)"
        if "# CONFIG_NET_SCH_NETEM is not set" in config
        else ""
    )


@contextmanager
def wan_namespace(delay_ms: float, rate: str, netem: bool = True) -> Iterator[tuple[str, str, str]]:
    """A namespace joined to the root namespace by a veth pair with netem on both ends.

    Yields (namespace, root-side address, namespace-side address); removes both on exit.
    """
    tag = f"swb{os.getpid()}"
    ns, outer, inner = tag, f"{tag}a", f"{tag}b"
    subnet = f"10.213.{os.getpid() % 250}"
    root_addr, ns_addr = f"{subnet}.1", f"{subnet}.2"
    _must("ip", "netns", "add", ns)
    try:
        _must("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        _must("ip", "addr", "add", f"{root_addr}/30", "dev", outer)
        _must("ip", "link", "set", outer, "up")
        _must("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _must("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", inner)
        _must("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        if netem:
            qdisc = ["qdisc", "add", "dev"]
            shape = ["root", "netem", "delay", f"{delay_ms:g}ms", "rate", rate]
            for prefix, dev in (([], outer), (["ip", "netns", "exec", ns], inner)):
                done = _sh(*prefix, "tc", *qdisc, dev, *shape)
                if done.returncode != 0:
                    raise WanSkipped(f"tc netem unavailable: {done.stderr.strip()}{_netem_hint()}")
        yield ns, root_addr, ns_addr
    finally:
        _sh("ip", "link", "del", outer)  # deletes both ends of the pair
        _sh("ip", "netns", "del", ns)


class WanSkipped(Exception):
    pass


def client_on(
    path: Path, initial_peers: list[str], host: str, config: ClientConfig
) -> DistributedModelForCausalLM:
    """from_pretrained, but with the client's DHT peer listening on `host`.

    from_pretrained's client-mode DHT peer on 127.0.0.1 never joined a DHT peer on the veth
    address here (timed out); a full peer on the veth address joins at once. Same steps otherwise.
    """
    ckpt = checkpoint.open_checkpoint(path)
    parts = checkpoint.load_client_parts(ckpt, dtype=torch.float32)
    dht = start_dht(initial_peers=initial_peers, host=host, client_mode=False)
    client = DistributedModelForCausalLM(checkpoint.model_name(path), ckpt.config, parts, dht, config)
    try:
        run_sync(client._await_coverage())
    except BaseException:
        client.shutdown()
        raise
    return client


def bench_wan(
    args: argparse.Namespace,
    path: Path,
    workdir: Path,
    input_ids: torch.Tensor,
    expected: torch.Tensor,
    compute_s: float,
) -> tuple[Wan, list[Run]]:
    hops = len(SPANS)
    wan = Wan(ran=False, delay_ms=args.wan_delay_ms, rate=args.wan_rate, hops=hops)
    wan.rtt_s = 2 * args.wan_delay_ms / 1000 if not args.wan_no_netem else 0.0
    wan.compute_s = compute_s
    wan.bound_steps_per_s = 1 / (hops * wan.rtt_s + compute_s)
    if reason := wan_unavailable():
        return bench_wan_proxy(args, path, workdir, input_ids, expected, wan, reason)
    runs: list[Run] = []
    try:
        with wan_namespace(args.wan_delay_ms, args.wan_rate, netem=not args.wan_no_netem) as (
            ns,
            root_addr,
            ns_addr,
        ):
            dht_side = NetnsSwarm(workdir / "wan-dht")
            node_side = LocalSwarm(workdir / "wan-nodes", command_prefix=("ip", "netns", "exec", ns))
            try:
                dht_side.start_dht_on(root_addr)
                node_side.initial_peers = dht_side.initial_peers
                extra = [*node_args(args), "--host", ns_addr]
                start_nodes(node_side, path, SPANS, extra)
                with (
                    client_on(path, dht_side.initial_peers, root_addr, ClientConfig()) as on,
                    client_on(path, dht_side.initial_peers, root_addr, ClientConfig(push=False)) as off,
                ):
                    runs += wan_runs(args, (on, off), input_ids, expected)
            finally:
                node_side.close()
                dht_side.close()
    except WanSkipped as e:
        return bench_wan_proxy(args, path, workdir, input_ids, expected, wan, str(e))
    wan.ran = True
    if args.wan_no_netem:
        wan.reason = "--wan-no-netem: namespaces and veth only, no delay (plumbing check)"
    # Caveat: here the nodes share one namespace, so a push between them does not cross the delayed
    # link (the proxy emulation below delays node-to-node traffic too).
    summarize_wan(wan, runs)
    wan.extra["emulation"] = "netns (node-to-node traffic not delayed)"
    return wan, runs


def wan_runs(
    args: argparse.Namespace,
    clients: tuple[DistributedModelForCausalLM, DistributedModelForCausalLM],
    input_ids: torch.Tensor,
    expected: torch.Tensor,
) -> list[Run]:
    """(d) with push and without, alternately, `--wan-reps` times each."""
    runs: list[Run] = []
    for client in clients:
        client.generate(input_ids, max_new_tokens=2, eos_token_id=[])  # warm-up
    for rep in range(args.wan_reps):
        for client, case in zip(clients, ("wan", "wan-nopush"), strict=True):
            runs.append(swarm_generate(client, input_ids, args.new_tokens, case, rep, expected))
            print_run(runs[-1])
    return runs


def summarize_wan(wan: Wan, runs: list[Run]) -> None:
    on = [r for r in runs if r.case == "wan"]
    off = [r for r in runs if r.case == "wan-nopush"]
    wan.push_bound_steps_per_s = 1 / ((wan.hops + 1) * wan.rtt_s / 2 + wan.compute_s)
    wan.steps_per_s = statistics.median(r.decode_steps_per_s for r in on)
    wan.ratio = wan.steps_per_s / wan.bound_steps_per_s
    wan.steps_per_s_no_push = statistics.median(r.decode_steps_per_s for r in off)
    wan.ratio_no_push = wan.steps_per_s_no_push / wan.bound_steps_per_s
    wan.extra = {
        "tokens_per_s_end_to_end": statistics.median(r.tokens_per_s for r in on),
        "tokens_per_s_end_to_end_no_push": statistics.median(r.tokens_per_s for r in off),
    }


def parse_rate(rate: str) -> float:
    """A tc rate ('100mbit', '1gbit', '500kbit', '8bit') in bytes/s."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, bits in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * bits / 8
    raise ValueError(f"rate {rate!r} is not N followed by gbit, mbit, kbit or bit")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def proxied_swarm(args: argparse.Namespace, path: Path, workdir: Path) -> Iterator[LocalSwarm]:
    """2 nodes (SPANS) serving `path`, each behind a WAN proxy whose port it announces (so the
    client's traffic AND node-to-node pushes cross the emulated link)."""
    delay_s, rate = args.wan_delay_ms / 1000, parse_rate(args.wan_rate)
    with LocalSwarm(workdir) as swarm, contextlib.ExitStack() as proxies:
        swarm.start_dht()
        for i, span in enumerate(SPANS):
            port = free_port()
            proxy = proxies.enter_context(wan_proxy(port, delay_s, rate))
            extra = [*node_args(args), "--port", str(port), "--announce-port", str(proxy.port)]
            swarm.start_node(path, span, *extra, name=f"wan-node-{i}")
        yield swarm


@contextmanager
def proxied_client(
    args: argparse.Namespace, path: Path, workdir: Path
) -> Iterator[DistributedModelForCausalLM]:
    """A client (push on) of a proxied_swarm."""
    with (
        proxied_swarm(args, path, workdir) as swarm,
        DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as client,
    ):
        yield client


def bench_wan_proxy(
    args: argparse.Namespace,
    path: Path,
    workdir: Path,
    input_ids: torch.Tensor,
    expected: torch.Tensor,
    wan: Wan,
    why: str,
) -> tuple[Wan, list[Run]]:
    """(d) without netem: each node is reached through a userspace proxy with the same delay and rate.

    The nodes announce the proxy's port (--announce-port), so the client's pings, sessions and
    every activation cross the emulated link; DHT traffic does not (it does not affect decoding).
    """
    if args.wan_no_proxy:
        wan.reason = why
        return wan, []
    wan.rtt_s = 2 * args.wan_delay_ms / 1000
    wan.bound_steps_per_s = 1 / (wan.hops * wan.rtt_s + wan.compute_s)
    with (
        proxied_swarm(args, path, workdir / "wan-proxy") as swarm,
        push_on_and_off(path, swarm.initial_peers) as clients,
    ):
        runs = wan_runs(args, clients, input_ids, expected)
    wan.ran = True
    wan.reason = f"{why}; emulated instead by a userspace proxy per node (bench/wan_proxy.py)"
    summarize_wan(wan, runs)
    wan.extra["emulation"] = "proxy"
    return wan, runs


# ---- output ------------------------------------------------------------------------------------

HEADER = (
    f"{'case':10} {'rep':>3} {'tokens':>6} {'seconds':>8} {'tok/s':>8} {'decode/s':>9} {'match':>5}  note"
)


def print_run(r: Run) -> None:
    print(
        f"{r.case:10} {r.rep:>3} {r.tokens:>6} {r.seconds:>8.2f} {r.tokens_per_s:>8.1f} "
        f"{r.decode_steps_per_s:>9.1f} {'yes' if r.match else 'NO':>5}  {r.note}",
        flush=True,
    )


def node_args(args: argparse.Namespace) -> list[str]:
    # Announced figures instead of measuring them: faster start, same routing for every node.
    return ["--throughput", "1000", "--network-throughput", "1e9", "--device", args.device]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation")
    parser.add_argument("--reps", type=int, default=3, help="alternating (a)/(b) repetitions (median)")
    parser.add_argument("--wan-reps", type=int, default=1, help="repetitions of (d)")
    parser.add_argument("--wan-delay-ms", type=float, default=25.0, help="one-way netem delay per direction")
    parser.add_argument("--wan-rate", default="100mbit", help="netem rate per direction")
    parser.add_argument(
        "--wan-no-netem", action="store_true", help="run (d) without netem (namespace plumbing check only)"
    )
    parser.add_argument(
        "--wan-no-proxy",
        action="store_true",
        help="when netem is unavailable, skip (d) instead of emulating the link with a userspace proxy",
    )
    parser.add_argument("--skip-wan", action="store_true", help="skip (d)")
    parser.add_argument(
        "--skip-speculative",
        action="store_true",
        help="skip (d) with speculative decoding (bench/spec_wan.py)",
    )
    parser.add_argument(
        "--speculative-only", action="store_true", help="run only (d) with speculative decoding"
    )
    parser.add_argument("--spec-reps", type=int, default=2, help="repetitions of each speculative (d) run")
    parser.add_argument("--device", default="cpu", help="device of the nodes: cpu | cuda | auto")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="checkpoint and logs (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    # The one-process baseline runs as a user would run it: all cores, torch's default threads.

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="swarm-bench-inference-")
    workdir = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    try:
        if args.speculative_only:
            return bench_speculative_only(args, workdir)
        return bench(args, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def speculative_wan(args: argparse.Namespace, workdir: Path, path: Path) -> dict[str, Any]:
    """(d) again with speculative decoding (always over the userspace WAN proxy)."""
    print(f"\n(d) with speculative decoding ({args.new_tokens} greedy tokens; bench/spec_wan.py)", flush=True)
    return bench_speculative(
        args,
        workdir / "spec",
        path,
        PROMPT,
        2 * args.wan_delay_ms / 1000,
        len(SPANS),
        lambda model, where: proxied_client(args, model, where),
    )


def bench_speculative_only(args: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    summary = speculative_wan(args, workdir, build_checkpoint(workdir / "model"))
    summary["seconds"] = time.monotonic() - started
    print(f"benchmark took {summary['seconds']:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"wan_speculative": summary}, indent=2) + "\n")
    return 0 if summary["all_match"] else 1


def bench(args: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    path = build_checkpoint(workdir / "model")
    input_ids = torch.tensor([PROMPT])
    n = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n, eos_token_ids=())
    print(
        f"model: demo Llama (8 blocks, hidden 512, vocab 4096, float32), prompt {len(PROMPT)} tokens, "
        f"{n} greedy tokens; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; nodes on {args.device}\n",
        flush=True,
    )
    print(HEADER)
    print("-" * len(HEADER))
    runs: list[Run] = []
    local = Local(path)
    local.generate(input_ids, SamplingConfig(max_new_tokens=4, eos_token_ids=()), -1, None)  # warm-up
    expected, first = local.generate(input_ids, cfg, 0, None)

    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_dht()
        first_half, second_half = start_nodes(swarm, path, SPANS, node_args(args))
        with push_on_and_off(path, swarm.initial_peers) as (on, off):
            runs += alternate(local, (on, off), input_ids, cfg, args.reps, expected, first)

        # (c): serve both spans a second time, then kill the last hop of the route halfway.
        spares = start_nodes(swarm, path, SPANS, node_args(args))
        ours = {p.info["peer_id"]: p for p in (first_half, second_half, *spares)}
        with DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as client:
            client.generate(input_ids, max_new_tokens=2, eos_token_id=[])
            runs.append(session_generate(client, input_ids, cfg, "swarm4", expected))
            print_run(runs[-1])
            kill_at = len(PROMPT) + n // 2

            def kill(session: Any, start: int) -> str:
                if start != kill_at:
                    return ""
                hop = session.streams[-1].hop
                swarm.stop(ours[hop.peer_id], signal.SIGKILL)
                return f"SIGKILL ..{hop.peer_id[-6:]}[{hop.start}:{hop.end}] before token {n // 2 + 1}"

            runs.append(session_generate(client, input_ids, cfg, "killed", expected, kill))
            print_run(runs[-1])

    del local  # its weights: the vocab-32000 model comes next
    print(
        f"\nmodel: the same blocks with vocab {BIG_VOCAB} (LM head 512 x {BIG_VOCAB}), prompt "
        f"{len(BIG_PROMPT)} tokens, {n} greedy tokens",
        flush=True,
    )
    big_runs = bench_big_vocab(args, workdir)
    runs += big_runs
    print()
    local_runs = [r for r in runs if r.case == "local"]
    swarm_runs = [r for r in runs if r.case == "swarm"]
    nopush_tps = statistics.median(r.tokens_per_s for r in runs if r.case == "nopush")
    local_tps = statistics.median(r.tokens_per_s for r in local_runs)
    swarm_tps = statistics.median(r.tokens_per_s for r in swarm_runs)
    swarm_s = statistics.median(r.seconds for r in swarm_runs)
    swarm4, killed = (next(r for r in runs if r.case == case) for case in ("swarm4", "killed"))
    big_local = statistics.median(r.tokens_per_s for r in big_runs if r.case == "local32k")
    big_swarm = statistics.median(r.tokens_per_s for r in big_runs if r.case == "swarm32k")
    big_nopush = statistics.median(r.tokens_per_s for r in big_runs if r.case == "nopush32k")
    compute_s = 1 / statistics.median(r.decode_steps_per_s for r in local_runs)
    # Each rep's (b) over the same rep's (a), run right after it: a second view of B/A that a slow
    # drift of the machine's speed (other tenants) moves less than a ratio of medians.
    paired = paired_ratios(runs, "local", "swarm")
    big_paired = paired_ratios(big_runs, "local32k", "swarm32k")

    if args.skip_wan:
        wan = Wan(ran=False, reason="--skip-wan")
    else:
        wan, wan_runs = bench_wan(args, path, workdir, input_ids, expected, compute_s)
        runs += wan_runs
    if not wan.ran:
        print(f"wan      skipped: {wan.reason}")
    spec = None if args.skip_wan or args.skip_speculative else speculative_wan(args, workdir, path)

    ratio = swarm_tps / local_tps
    extra_s = killed.seconds - swarm_s
    all_match = all(r.match for r in runs) and (spec is None or spec["all_match"])
    print()
    print(
        f"(b)/(a) = {ratio:.2f} (target >= {RATIO_TARGET}), without push {nopush_tps / local_tps:.2f}; "
        f"per-token compute in (a): {compute_s * 1000:.2f} ms"
    )
    print(
        f"vocab {BIG_VOCAB}: (b)/(a) = {big_swarm / big_local:.2f} (target >= {BIG_RATIO_TARGET}), "
        f"without push {big_nopush / big_local:.2f}"
    )
    for label, ratios in (("", paired), (f"vocab {BIG_VOCAB}: ", big_paired)):
        print(
            f"{label}(b)/(a) rep by rep: {' '.join(f'{x:.3f}' for x in ratios)} "
            f"(median {statistics.median(ratios):.3f})"
        )
    print(
        f"(c) killed run: {killed.seconds:.2f} s, {extra_s:+.2f} s vs (b) median, "
        f"{killed.seconds - swarm4.seconds:+.2f} s vs undisturbed 4-node run (target < {EXTRA_TARGET_S:g} s)"
    )
    if wan.ran:
        print(
            f"(d) {wan.steps_per_s:.2f} decode steps/s vs bound 1/({wan.hops} x {wan.rtt_s * 1000:.0f} ms + "
            f"{compute_s * 1000:.1f} ms) = {wan.bound_steps_per_s:.2f}: ratio {wan.ratio:.2f} "
            f"(target >= {RATIO_TARGET}); end to end {wan.extra['tokens_per_s_end_to_end']:.2f} tok/s"
            + (f" [{wan.reason}]" if wan.reason else "")
        )
        print(
            f"(d) without push: {wan.steps_per_s_no_push:.2f} decode steps/s "
            f"(ratio {wan.ratio_no_push:.2f}); "
            f"push bound 1/({wan.hops + 1} x {wan.rtt_s * 500:.0f} ms + {compute_s * 1000:.1f} ms) = "
            f"{wan.push_bound_steps_per_s:.2f}"
        )
    print(f"tokens identical to (a) in every run: {'yes' if all_match else 'NO'}")
    wan_part = (
        f"wan push {wan.steps_per_s:.1f} steps/s, no push {wan.steps_per_s_no_push:.1f} "
        f"(bound {wan.bound_steps_per_s:.1f}, ratio {wan.ratio:.2f})"
        if wan.ran
        else f"wan skipped ({wan.reason})"
    )
    print(
        f"inference: local {local_tps:.1f} tok/s, swarm {swarm_tps:.1f} tok/s "
        f"(B/A={ratio:.2f}, no push {nopush_tps / local_tps:.2f}), "
        f"killed {killed.tokens_per_s:.1f} tok/s ({extra_s:+.2f} s), {wan_part}; "
        f"vocab {BIG_VOCAB}: local {big_local:.1f} tok/s, swarm {big_swarm:.1f} tok/s "
        f"(B/A={big_swarm / big_local:.2f}, no push {big_nopush / big_local:.2f})"
    )
    elapsed = time.monotonic() - started
    print(f"benchmark took {elapsed:.0f} s")

    if args.out is not None:
        report = {
            "model": "demo llama: 8 blocks, hidden 512, vocab 4096 (and 32000), float32",
            "torch_threads": torch.get_num_threads(),
            "prompt_tokens": len(PROMPT),
            "new_tokens": n,
            "reps": args.reps,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "node_device": args.device,
            "runs": [asdict(r) for r in runs],
            "summary": {
                "local_tokens_per_s": local_tps,
                "swarm_tokens_per_s": swarm_tps,
                "swarm_over_local": ratio,
                "swarm_over_local_by_rep": paired,
                "nopush_tokens_per_s": nopush_tps,
                "nopush_over_local": nopush_tps / local_tps,
                "vocab_32000": {
                    "local_tokens_per_s": big_local,
                    "swarm_tokens_per_s": big_swarm,
                    "swarm_over_local": big_swarm / big_local,
                    "swarm_over_local_by_rep": big_paired,
                    "nopush_tokens_per_s": big_nopush,
                    "nopush_over_local": big_nopush / big_local,
                    "prompt_tokens": len(BIG_PROMPT),
                },
                "compute_s_per_token": compute_s,
                "killed_tokens_per_s": killed.tokens_per_s,
                "killed_extra_s_vs_swarm": extra_s,
                "killed_extra_s_vs_undisturbed_4_nodes": killed.seconds - swarm4.seconds,
                "all_tokens_match": all_match,
                "wan": asdict(wan),
                "wan_speculative": spec,
                "seconds": elapsed,
            },
            "targets": {
                "swarm_over_local": RATIO_TARGET,
                "vocab_32000_swarm_over_local": BIG_RATIO_TARGET,
                "killed_extra_s": EXTRA_TARGET_S,
                "wan_over_bound": RATIO_TARGET,
                "met": {
                    "swarm_over_local": ratio >= RATIO_TARGET,
                    "vocab_32000_swarm_over_local": big_swarm / big_local >= BIG_RATIO_TARGET,
                    "killed_extra_s": extra_s < EXTRA_TARGET_S,
                    "wan_over_bound": wan.ratio >= RATIO_TARGET if wan.ran else None,
                },
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())
