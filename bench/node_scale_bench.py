"""Benchmark one node carrying 100, 250, 500 and 1,000 atSigns, and one node in a big cluster.

Starts a real 3-member etcd, a real Consul server and one Consul client agent per node
(stopped by PID at the end, also on errors and SIGTERM), then for each size N:

1. node a1 (`supervisor run`, process runner, ttl 6, default probe interval) starts with N
   atSigns that prefer it: the time until all N pass in Consul;
2. a steady state of ``--steady`` seconds: CPU seconds per second of the supervisor, of
   Consul (the server and a1's agent) and of etcd (all three members), per atSign; the
   supervisor's RSS;
   Consul agent requests/s (the supervisor's own count) and etcd requests/s (gRPC calls
   handled, from etcd's metrics);
3. node b1 starts, and ``supervisor drain`` moves everything from a1 to b1: the drain's
   wall time and each atSign's unavailability (as the drain reports it);
4. both stop (SIGTERM): b1's shutdown time with N atServers.

The atServers are ``bench/standin_atserver.py`` (TLS, prompt, ``info:brief``: the real
probe's round trip; ~15 MB RSS each, most of it shared) because a thousand dev atServers
(33 MB each) do not fit; ``--dev-at`` repeats one size with real dev atServers.

Cluster scale (``--cluster``): light simulated nodes hold C claims in etcd (leases and claim
keys written in bulk, no workloads) while a1 runs its 100; then the simulated nodes move
``--changes`` claims among themselves at a steady rate. a1's CPU per change (above its idle
rate) shows the cost of a change elsewhere, for each C.

Writes ``bench/results/node_scale.json`` and ``bench/results/node_scale.png``.
Run: ``.venv/bin/python bench/node_scale_bench.py`` (about 30 minutes on 2 cores);
``--sizes 100 250 --steady 20 --cluster 10000`` for a short run; ``--replot``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aetcd import rpc  # noqa: E402

from leases import ClaimInfo, Timing  # noqa: E402
from leases.etcd import EtcdBackend  # noqa: E402
from leases.keys import encode_info  # noqa: E402
from testbed.consul import ConsulAgent  # noqa: E402
from testbed.etcd import EtcdCluster  # noqa: E402
from testbed.ports import free_port  # noqa: E402
from testbed.process import ManagedProcess  # noqa: E402
from testbed.tls import TestCA  # noqa: E402

RESULTS = REPO / "bench" / "results"
STANDIN = REPO / "bench" / "standin_atserver.py"
DEBIAN_PYTHON = "/usr/bin/python3"
TTL = 6
NODES = ("a1", "b1")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def etcd_requests(cluster: EtcdCluster) -> float:
    """gRPC calls every member has handled so far."""
    total = 0.0
    for m in cluster.members:
        text = get(m.client_url + "/metrics").decode()
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def metric(api: str, name: str) -> float:
    for line in get(api + "/metrics").decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def passing(consul: ConsulAgent, service: str) -> int:
    try:
        return len(json.loads(get(f"{consul.url}/v1/health/service/{service}?passing=1", 30)))
    except (OSError, ValueError):
        return -1


class Bench:
    """The servers, the CA, and the nodes started so far (all stopped by :meth:`close`)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.etcd = EtcdCluster(base / "etcd", size=3, name="etcd")
        self.consul = ConsulAgent(base / "consul")
        # Each node its own Consul client agent, as in production (the node check lives there).
        self.agents = {n: ConsulAgent(base / "consul", name=n, join=self.consul) for n in NODES}
        self.ca = TestCA(base / "ca")
        self.cert = self.ca.issue("localhost", ("127.0.0.1", "localhost"))
        self.procs: list[ManagedProcess] = []

    def start(self) -> None:
        self.consul.start()
        for agent in self.agents.values():
            agent.start()
        self.etcd.start()

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop(timeout=60)
        for p in self.procs:
            self._reap(p)
        self.etcd.stop()
        for agent in self.agents.values():
            agent.stop()
        self.consul.stop()

    def _reap(self, p: ManagedProcess) -> None:
        """Whatever a node left (its fence, its atServers: own sessions) goes by PID."""
        state = Path(p.argv[-1]).parent / p.name / "state"
        pids: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((state / "fence.pid").read_text()))
        for rec in (state / "workloads").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                pids.append(int(json.loads(rec.read_text())["pid"]))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def node_config(
        self, name: str, cloud: str, prefix: str, service: str, atsigns: list[str], low: int,
        dev: bool, capacity: int,
    ) -> Path:  # fmt: skip
        run = self.base / prefix
        if dev:
            command: list[str] = []
        else:
            command = [
                DEBIAN_PYTHON, "-S", "-I", str(STANDIN), "--atsign", "{atsign}",
                "--host", "{host}", "--port", "{port}", "--fencing-token", "{token}",
                "--cert", "{cert}", "--key", "{key}",
            ]  # fmt: skip
        inventory = run / "inventory.yaml"
        if not inventory.exists():
            inventory.parent.mkdir(parents=True, exist_ok=True)
            inventory.write_text(
                yaml.safe_dump(
                    {
                        "nodes": [{"name": "a1", "cloud": "A"}, {"name": "b1", "cloud": "B"}],
                        "atsigns": [{"atsign": a, "prefer_nodes": ["a1"]} for a in atsigns],
                    }
                )
            )
        cfg = {
            "node": {"name": name, "cloud": cloud, "address": "127.0.0.1"},
            "dcs": {
                "backend": "etcd",
                "prefix": prefix,
                "etcd": {"endpoints": self.etcd.endpoints},
            },
            "timing": {"ttl": TTL},
            "consul": {"url": self.agents[name].url, "service_name": service, "shards": [1]},
            "runner": {
                "kind": "process",
                "command": command,
                "port_range": [low, low + capacity + 100],
                "data_root": str(run / "data"),  # shared: the data follows the claim
                "state_dir": str(run / name / "state"),
                "tls": {
                    "ca": str(self.ca.cert_path),
                    "cert": str(self.cert.cert),
                    "key": str(self.cert.key),
                },
                "stop_timeout": 5,
                "start_timeout": 60,
            },
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "placement": {"capacity": capacity + 10},
            "inventory": {"path": str(inventory)},
        }
        path = run / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start_node(self, name: str, config: Path) -> tuple[ManagedProcess, str]:
        proc = ManagedProcess(
            name,
            [sys.executable, "-m", "supervisor.cli", "run", "--config", str(config)],
            config.parent / f"{name}.log",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )
        proc.start()
        self.procs.append(proc)
        listen = yaml.safe_load(config.read_text())["http"]["listen"]
        return proc, f"http://{listen}"


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:g}s")


def ready(api: str) -> bool:
    try:
        return bool(json.loads(get(api + "/readyz", 2)).get("ready"))
    except (OSError, ValueError):
        return False


def run_size(b: Bench, n: int, steady: float, dev: bool) -> dict[str, Any]:
    tag = f"n{n}{'dev' if dev else ''}-{int(time.time())}"
    service = f"atserver-{tag}"
    atsigns = [f"@s{tag.replace('-', '')}x{i:04d}" for i in range(n)]
    print(f"== {n} atSigns ({'dev atServers' if dev else 'stand-ins'})", flush=True)
    cfg_a = b.node_config("a1", "A", tag, service, atsigns, 20000, dev, n)
    a1, api_a = b.start_node("a1", cfg_a)
    started = time.monotonic()
    all_passing = wait(lambda: passing(b.consul, service) == n, 600, f"{n} passing", 1.0)
    print(f"   all {n} passing after {all_passing:.1f}s", flush=True)
    time.sleep(min(15.0, steady / 4))  # let the start-up settle
    consul_pids = [a.process.pid for a in (b.consul, b.agents["a1"]) if a.process]
    etcd_pids = [m.process.pid for m in b.etcd.members if m.process]
    t0 = time.monotonic()
    c0 = (cpu_of([a1.pid]), cpu_of(consul_pids), cpu_of(etcd_pids))
    r0 = (metric(api_a, "atfailover_consul_agent_requests"), etcd_requests(b.etcd))
    time.sleep(steady)
    dt = time.monotonic() - t0
    c1 = (cpu_of([a1.pid]), cpu_of(consul_pids), cpu_of(etcd_pids))
    r1 = (metric(api_a, "atfailover_consul_agent_requests"), etcd_requests(b.etcd))
    rss = psutil.Process(a1.pid).memory_info().rss
    sup_cpu, consul_cpu, etcd_cpu = ((x1 - x0) / dt for x0, x1 in zip(c0, c1, strict=True))
    consul_rps, etcd_rps = ((y1 - y0) / dt for y0, y1 in zip(r0, r1, strict=True))
    print(
        f"   steady: supervisor {sup_cpu * 1000 / n:.3f} ms/atSign/s, Consul "
        f"{consul_rps / n:.3f} req/atSign/s, RSS {rss / 2**20:.0f} MiB",
        flush=True,
    )
    cfg_b = b.node_config("b1", "B", tag, service, atsigns, 20000 + n + 200, dev, n)
    b1, api_b = b.start_node("b1", cfg_b)
    wait(lambda: ready(api_b), 60, "b1 ready")
    d0 = time.monotonic()
    drain = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "drain", "--config", str(cfg_a),
         "--timeout", "900"],
        capture_output=True, text=True, timeout=960, cwd=REPO,
    )  # fmt: skip
    drain_s = time.monotonic() - d0
    unavailable = [float(m.group(1)) for m in re.finditer(r"unavailable ([0-9.]+)s", drain.stdout)]
    print(
        f"   drain of {n}: {drain_s:.1f}s (rc {drain.returncode}), unavailable p50 "
        f"{pct(unavailable, 0.5):.2f}s p99 {pct(unavailable, 0.99):.2f}s",
        flush=True,
    )
    moved = passing(b.consul, service)
    s0 = time.monotonic()
    b1.stop(timeout=300)
    shutdown_s = time.monotonic() - s0
    a1.stop(timeout=60)
    return {
        "atsigns": n,
        "atservers": "dev" if dev else "standin",
        "all_passing_s": round(all_passing, 2),
        "start_to_steady_s": round(t0 - started, 1),
        "steady_s": round(dt, 1),
        "supervisor_cpu_per_s": round(sup_cpu, 4),
        "supervisor_ms_per_atsign_s": round(sup_cpu * 1000 / n, 4),
        "consul_cpu_per_s": round(consul_cpu, 4),
        "consul_ms_per_atsign_s": round(consul_cpu * 1000 / n, 4),
        "etcd_cpu_per_s": round(etcd_cpu, 4),
        "supervisor_rss_mib": round(rss / 2**20, 1),
        "consul_requests_per_s": round(consul_rps, 2),
        "consul_requests_per_atsign_s": round(consul_rps / n, 4),
        "etcd_requests_per_s": round(etcd_rps, 2),
        "drain_s": round(drain_s, 1),
        "drain_rc": drain.returncode,
        "drain_moved": len(unavailable),
        "passing_after_drain": moved,
        "unavailable_p50_s": round(pct(unavailable, 0.5), 3),
        "unavailable_p99_s": round(pct(unavailable, 0.99), 3),
        "unavailable_max_s": round(max(unavailable), 3) if unavailable else None,
        "shutdown_s": round(shutdown_s, 1),
    }


async def bulk_claims(b: Bench, prefix: str, atsigns: list[str], nodes: int) -> list[int]:
    """Light simulated nodes: one lease each, claim keys written 128 per txn."""
    backend = EtcdBackend(b.etcd.endpoints, prefix, request_timeout=10)
    timing = Timing.for_ttl(1800)  # no renewals needed while the benchmark runs
    sessions = [await backend.open_session(f"sim{i}", timing) for i in range(nodes)]
    leases = [int(s.session_id, 16) for s in sessions]
    for first in range(0, len(atsigns), 128):
        lease = leases[(first // 128) % nodes]
        value = encode_info(ClaimInfo(node=f"sim{(first // 128) % nodes}", cloud="B"))
        ops = [
            rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=backend.layout.claim_key(a).encode(), value=value, lease=lease
                )
            )
            for a in atsigns[first : first + 128]
        ]

        async def txn(m: Any, t: float, md: Any, ops: list[Any] = ops) -> Any:
            return await m.kv.Txn(rpc.TxnRequest(success=ops), timeout=t, metadata=md)

        await backend._call("bulk claims", txn, 30)
    b.sim_sessions = sessions  # type: ignore[attr-defined]
    b.sim_backend = backend  # type: ignore[attr-defined]
    return leases


async def move_claims(
    b: Bench, atsigns: list[str], leases: list[int], count: int, rate: float
) -> None:
    """Move ``count`` claims to another simulated node's lease, ``rate`` per second."""
    backend: EtcdBackend = b.sim_backend  # type: ignore[attr-defined]
    for k in range(count):
        a = atsigns[(k * 7919) % len(atsigns)]
        lease = leases[(k + 1) % len(leases)]
        value = encode_info(ClaimInfo(node=f"sim{(k + 1) % len(leases)}", cloud="B"))
        key = backend.layout.claim_key(a).encode()

        async def put(
            m: Any, t: float, md: Any, key: bytes = key, v: bytes = value, lease: int = lease
        ) -> Any:
            request = rpc.PutRequest(key=key, value=v, lease=lease)
            return await m.kv.Put(request, timeout=t, metadata=md)

        await backend._call("move claim", put, 10)
        await asyncio.sleep(1 / rate)


def run_cluster(b: Bench, claims: int, changes: int, rate: float) -> dict[str, Any]:
    tag = f"c{claims}-{int(time.time())}"
    service = f"atserver-{tag}"
    own = [f"@own{tag.replace('-', '')}x{i:03d}" for i in range(100)]
    others = [f"@sim{tag.replace('-', '')}x{i:06d}" for i in range(claims)]
    print(f"== cluster: {claims} claims elsewhere, a1 runs 100", flush=True)
    loop = asyncio.new_event_loop()
    t = time.monotonic()
    leases = loop.run_until_complete(bulk_claims(b, tag, others, 10))
    print(f"   {claims} claims written in {time.monotonic() - t:.1f}s", flush=True)
    cfg = b.node_config("a1", "A", tag, service, own + others, 20000, False, 100)
    a1, _api = b.start_node("a1", cfg)
    started = time.monotonic()
    wait(lambda: passing(b.consul, service) == 100, 600, "a1's 100 passing", 1.0)
    up_s = time.monotonic() - started
    time.sleep(10)
    idle_window = 20.0
    c0 = cpu_of([a1.pid])
    time.sleep(idle_window)
    idle_rate = (cpu_of([a1.pid]) - c0) / idle_window
    c1 = cpu_of([a1.pid])
    t1 = time.monotonic()
    loop.run_until_complete(move_claims(b, others, leases, changes, rate))
    window = time.monotonic() - t1
    time.sleep(2)
    window += 2
    busy = cpu_of([a1.pid]) - c1
    per_change = max(0.0, busy - idle_rate * window) / changes
    rss = psutil.Process(a1.pid).memory_info().rss
    print(
        f"   a1 up in {up_s:.1f}s; idle {idle_rate * 1000:.1f} ms/s; "
        f"{per_change * 1000:.3f} ms of CPU per change elsewhere; RSS {rss / 2**20:.0f} MiB",
        flush=True,
    )
    a1.stop(timeout=60)
    for s in b.sim_sessions:  # type: ignore[attr-defined]
        loop.run_until_complete(s.close())
    loop.run_until_complete(b.sim_backend.close())  # type: ignore[attr-defined]
    loop.close()
    return {
        "claims_elsewhere": claims,
        "own_atsigns": 100,
        "node_up_s": round(up_s, 1),
        "idle_cpu_per_s": round(idle_rate, 4),
        "changes": changes,
        "change_rate_per_s": rate,
        "cpu_ms_per_change": round(per_change * 1000, 4),
        "rss_mib": round(rss / 2**20, 1),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r for r in result["sizes"] if r["atservers"] == "standin"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    n = [r["atsigns"] for r in sizes]
    ax = axes[0]
    ax.plot(n, [r["supervisor_ms_per_atsign_s"] for r in sizes], "o-", label="supervisor")
    ax.plot(n, [r["consul_ms_per_atsign_s"] for r in sizes], "s-", label="Consul agent")
    ax.axhline(0.2, color="red", ls="--", lw=1, label="target 0.2 (supervisor)")
    ax.set(xlabel="atSigns on the node", ylabel="CPU ms per atSign per second", title="steady CPU")
    ax.legend()
    ax = axes[1]
    ax.plot(n, [r["all_passing_s"] for r in sizes], "o-", label="all passing after start")
    ax.plot(n, [r["drain_s"] for r in sizes], "s-", label="drain of everything")
    ax.axhline(60, color="red", ls=":", lw=1, label="targets 60 s / 120 s")
    ax.axhline(120, color="red", ls=":", lw=1)
    ax.set(xlabel="atSigns", ylabel="seconds", title="start and drain")
    ax.legend()
    ax = axes[2]
    cl = result.get("cluster", [])
    if cl:
        ax.plot([c["claims_elsewhere"] for c in cl], [c["cpu_ms_per_change"] for c in cl], "o-")
        ax.set_xscale("log")
    ax.set(xlabel="claims held by other nodes", ylabel="ms CPU on this node per change",
           title="a change elsewhere")  # fmt: skip
    fig.suptitle(f"one node, process runner, ttl {TTL} (2 cores) - {result['machine']['node']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def prepare(out: Path, name: str, plot_fn: Any, replot: bool) -> tuple[Path, Path] | int:
    """The JSON and PNG paths of a stand-in benchmark, or its exit code when there is nothing
    more to do (``--replot`` redrew the PNG; no Debian python for the stand-ins). Also makes
    SIGTERM run the caller's cleanup."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    if replot:
        plot_fn(json.loads(json_path.read_text()), png_path)
        return 0
    if not Path(DEBIAN_PYTHON).exists():
        print(f"{DEBIAN_PYTHON} is needed for the stand-in atServers", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return json_path, png_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 250, 500, 1000])
    ap.add_argument("--steady", type=float, default=60.0)
    ap.add_argument(
        "--dev-at", type=int, default=100, help="a size run again with dev atServers (0: none)"
    )
    ap.add_argument("--cluster", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--changes", type=int, default=600)
    ap.add_argument("--change-rate", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args()
    paths = prepare(args.out, "node_scale", plot, args.replot)
    if isinstance(paths, int):
        return paths
    json_path, png_path = paths
    base = Path(tempfile.mkdtemp(prefix="node-scale-"))
    b = Bench(base)
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "params": vars(args) | {"out": str(args.out), "ttl": TTL},
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "sizes": [],
        "cluster": [],
    }  # fmt: skip
    try:
        b.start()
        for n in args.sizes:
            result["sizes"].append(run_size(b, n, args.steady, dev=False))
            json_path.write_text(json.dumps(result, indent=1))
        if args.dev_at:
            result["sizes"].append(run_size(b, args.dev_at, args.steady, dev=True))
        for claims in args.cluster:
            result["cluster"].append(run_cluster(b, claims, args.changes, args.change_rate))
            json_path.write_text(json.dumps(result, indent=1))
    finally:
        b.close()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
