"""Benchmark the atDirectory against Consul's own DNS interface, and measure freshness.

Starts a real Consul dev agent and a real ``atdirectory serve`` process (both stopped by
PID at the end), registers ``--atsigns`` atServer instances the way the supervisor does
(service ``atserver``, meta ``atsign``/``fencing_token``, one tag per atSign), then:

1. lookups/s and p50/p99 latency for 1, 10 and 100 concurrent clients, each holding one
   TLS connection open and asking for random registered atSigns;
2. the same lookups as Consul DNS SRV queries (``<tag>.atserver.service.consul``) from
   the same number of concurrent clients, each with its own UDP socket;
3. freshness: time from a TTL check being failed in Consul to the directory answering
   ``null``, over ``--changes`` changes (and back to passing -> answered again).

Writes ``bench/results/directory.json`` and ``bench/results/directory.png``.
Run: ``.venv/bin/python bench/directory_bench.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncbackend
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testbed.consul import ConsulAgent  # noqa: E402
from testbed.ports import free_port  # noqa: E402
from testbed.process import ManagedProcess, wait_until  # noqa: E402
from testbed.tls import TestCA  # noqa: E402

RESULTS = REPO / "bench" / "results"
ATDIRECTORY = Path(sys.executable).parent / "atdirectory"
TXN_OPS = 64  # Consul's limit of operations per transaction
NODES = 20  # synthetic catalog nodes the bulk instances are spread over


def http(url: str, method: str = "GET", body: Any = None, timeout: float = 30.0) -> Any:
    """One Consul HTTP call (bounded); returns the decoded JSON body, or None if empty."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def atsign_name(i: int) -> str:
    return f"bench{i:06d}"


def register_bulk(agent: ConsulAgent, first: int, count: int, port_base: int) -> None:
    """``count`` passing instances on synthetic catalog nodes, 64 operations per txn."""
    ops: list[dict[str, Any]] = []
    for n in range(NODES):
        sim = {"Node": f"sim{n:02d}", "Address": f"127.0.1.{n + 1}"}
        ops.append({"Node": {"Verb": "set", "Node": sim}})
    for i in range(first, first + count):
        name = atsign_name(i)
        node = f"sim{i % NODES:02d}"
        sid = f"atserver-{name}"
        service = {
            "ID": sid,
            "Service": "atserver",
            "Address": f"127.0.1.{i % NODES + 1}",
            "Port": port_base + i % 20000,
            "Tags": [name],
            "Meta": {"atsign": f"@{name}", "fencing_token": str(1000 + i), "node": node},
        }
        check = {
            "Node": node,
            "CheckID": f"service:{sid}",
            "Name": "at-protocol",
            "Status": "passing",
            "ServiceID": sid,
        }
        ops.append({"Service": {"Verb": "set", "Node": node, "Service": service}})
        ops.append({"Check": {"Verb": "set", "Check": check}})
    for start in range(0, len(ops), TXN_OPS):
        result = http(agent.url + "/v1/txn", "PUT", ops[start : start + TXN_OPS])
        if result.get("Errors"):
            raise RuntimeError(f"Consul txn failed: {result['Errors']}")


def register_agent(agent: ConsulAgent, i: int, port: int) -> str:
    """One instance through the local agent with a TTL check (what the supervisor does)."""
    name = atsign_name(i)
    sid = f"atserver-{name}"
    http(
        agent.url + "/v1/agent/service/register",
        "PUT",
        {
            "Name": "atserver",
            "ID": sid,
            "Address": "127.0.0.1",
            "Port": port,
            "Tags": [name],
            "Meta": {"atsign": f"@{name}", "fencing_token": str(1000 + i), "node": "bench"},
            "Check": {"CheckID": f"service:{sid}", "TTL": "3600s", "Status": "passing"},
        },
    )
    return sid


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
    arr = np.asarray(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "max_ms": round(float(arr.max()), 3),
    }


async def run_clients(
    clients: int,
    duration: float,
    make_client: Callable[[], Awaitable[Callable[[str], Awaitable[bool]]]],
    names: list[str],
) -> dict[str, Any]:
    """``clients`` concurrent loops asking for random atSigns for ``duration`` seconds."""
    asks = [await make_client() for _ in range(clients)]
    latencies: list[float] = []
    wrong = 0
    stop_at = 0.0

    async def loop(ask: Callable[[str], Awaitable[bool]], seed: int) -> None:
        nonlocal wrong
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            name = rng.choice(names)
            t0 = time.perf_counter()
            ok = await ask(name)
            latencies.append(time.perf_counter() - t0)
            if not ok:
                wrong += 1

    start = time.perf_counter()
    stop_at = start + duration
    async with asyncio.timeout(duration + 30):
        await asyncio.gather(*(loop(ask, i) for i, ask in enumerate(asks)))
    elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "lookups": len(latencies),
        "wrong_answers": wrong,
        "lookups_per_s": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
    }


class DirectoryClients:
    """TLS connections to the directory, one per client, held open for the whole run."""

    def __init__(self, port: int, ctx: ssl.SSLContext, expected: dict[str, bytes]) -> None:
        self.port, self.ctx, self.expected = port, ctx, expected
        self.writers: list[asyncio.StreamWriter] = []

    async def make(self) -> Callable[[str], Awaitable[bool]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx)
        self.writers.append(writer)
        async with asyncio.timeout(10):
            assert await reader.readexactly(1) == b"@"

        async def ask(name: str) -> bool:
            writer.write(f"@{name}\n".encode())
            async with asyncio.timeout(10):
                answer = await reader.readuntil(b"\r\n@")
            return answer == self.expected[name]

        return ask

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()


class DnsClients:
    """Consul DNS SRV queries, one UDP socket per client."""

    def __init__(self, port: int, expected_port: dict[str, int]) -> None:
        self.port, self.expected_port = port, expected_port
        self.sockets: list[Any] = []

    async def make(self) -> Callable[[str], Awaitable[bool]]:
        backend = dns.asyncbackend.get_default_backend()
        sock = await backend.make_socket(socket.AF_INET, socket.SOCK_DGRAM, 0, ("127.0.0.1", 0))
        self.sockets.append(sock)

        async def ask(name: str) -> bool:
            query = dns.message.make_query(f"{name}.atserver.service.consul", dns.rdatatype.SRV)
            response = await dns.asyncquery.udp(
                query, "127.0.0.1", timeout=10, port=self.port, sock=sock
            )
            if response.rcode() != dns.rcode.NOERROR or not response.answer:
                return False
            ports = {rr.port for rrset in response.answer for rr in rrset}
            return ports == {self.expected_port[name]}

        return ask

    async def close(self) -> None:
        for sock in self.sockets:
            await sock.close()
        self.sockets.clear()


async def measure_freshness(
    agent: ConsulAgent,
    port: int,
    ctx: ssl.SSLContext,
    flips: list[tuple[str, str, bytes]],
    recoveries: int,
    timeout: float,
) -> dict[str, Any]:
    """Fail each TTL check in turn and time until the directory answers null; for the first
    ``recoveries`` of them, pass the check again and time until the answer is back (that
    path waits for Consul's full list, so it is slow at 10,000 atSigns; the rest stay
    critical until the end). One held connection asks continuously."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    assert await reader.readexactly(1) == b"@"

    async def ask(name: str) -> bytes:
        writer.write(f"@{name}\n".encode())
        return await reader.readuntil(b"\r\n@")

    async def until(name: str, want: bytes) -> None:
        deadline = time.perf_counter() + timeout
        while (answer := await ask(name)) != want:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"@{name}: still {answer!r} after {timeout}s")
            await asyncio.sleep(0.001)

    to_null: list[float] = []
    to_back: list[float] = []
    try:
        for n, (name, sid, answer) in enumerate(flips):
            assert await ask(name) == answer
            t0 = time.perf_counter()
            await asyncio.to_thread(http, f"{agent.url}/v1/agent/check/fail/service:{sid}", "PUT")
            await until(name, b"null\r\n@")
            to_null.append(time.perf_counter() - t0)
            if n < recoveries:
                t0 = time.perf_counter()
                await asyncio.to_thread(
                    http, f"{agent.url}/v1/agent/check/pass/service:{sid}", "PUT"
                )
                await until(name, answer)
                to_back.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return {
        "changes": len(to_null),
        "critical_to_null": percentiles(to_null),
        "recoveries": len(to_back),
        "passing_to_answered": percentiles(to_back) if to_back else {},
        "samples_critical_to_null_ms": [round(s * 1000, 3) for s in to_null],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    levels = [r["clients"] for r in result["directory"]]
    x = np.arange(len(levels))
    d_rate = [r["lookups_per_s"] for r in result["directory"]]
    n_rate = [r["lookups_per_s"] for r in result["consul_dns"]]
    ax1.bar(x - 0.2, d_rate, 0.4, label="atdirectory (TLS)")
    ax1.bar(x + 0.2, n_rate, 0.4, label="Consul DNS SRV")
    ax1.set_xticks(x, [str(c) for c in levels])
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("lookups/s")
    ax1.set_title(f"Throughput, {result['params']['atsigns']:,} atSigns")
    ax1.legend()
    for key, label, color in (("directory", "atdirectory", "C0"), ("consul_dns", "DNS", "C1")):
        p50 = [r["p50_ms"] for r in result[key]]
        p99 = [r["p99_ms"] for r in result[key]]
        ax2.plot(levels, p50, "-o", color=color, label=f"{label} p50")
        ax2.plot(levels, p99, "--s", color=color, label=f"{label} p99")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("Lookup latency")
    ax2.legend(fontsize=8)
    samples = sorted(result["freshness"]["samples_critical_to_null_ms"])
    ax3.plot(samples, np.arange(1, len(samples) + 1) / len(samples))
    ax3.set_xlabel("ms from check failed to directory answering null")
    ax3.set_ylabel("fraction of changes")
    f = result["freshness"]["critical_to_null"]
    ax3.set_title(f"Freshness (p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms)")
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def bench(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    ca = TestCA(base / "ca")
    cert = ca.issue("directory", ["127.0.0.1", "localhost"])
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    agent = ConsulAgent(base, name="bench-consul")
    directory: ManagedProcess | None = None
    try:
        agent.start()
        t0 = time.perf_counter()
        n_agent = args.changes
        agent_sids = [register_agent(agent, i, 20000 + i) for i in range(n_agent)]
        await asyncio.to_thread(register_bulk, agent, n_agent, args.atsigns - n_agent, 30000)
        registered_s = time.perf_counter() - t0
        instances = http(agent.url + "/v1/health/service/atserver?passing=1", timeout=60)
        expected_port = {i["Service"]["Tags"][0]: i["Service"]["Port"] for i in instances}
        expected = {
            i["Service"]["Tags"][
                0
            ]: f"{i['Service']['Address']}:{i['Service']['Port']}\r\n@".encode()
            for i in instances
        }
        assert len(expected) == args.atsigns, (len(expected), args.atsigns)
        print(f"registered {args.atsigns} atSigns in {registered_s:.1f}s", flush=True)

        port, metrics_port = free_port(), free_port()
        argv = [
            str(ATDIRECTORY), "serve", "--consul", agent.url,
            "--host", "127.0.0.1", "--port", str(port),
            "--cert", str(cert.cert), "--key", str(cert.key),
            "--metrics-port", str(metrics_port), "--log-level", "warning",
        ]  # fmt: skip
        directory = ManagedProcess("bench-atdirectory", argv, base / "atdirectory.log")
        directory.start()

        def has_map() -> bool:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
            return f"atdirectory_map_atsigns {float(args.atsigns)}" in text

        wait_until(has_map, 60, what="the directory's map of all atSigns")
        rss_idle = psutil.Process(directory.pid).memory_info().rss
        names = sorted(expected)

        result: dict[str, Any] = {"directory": [], "consul_dns": []}
        for clients in args.clients:
            dcl = DirectoryClients(port, ctx, expected)
            try:
                r = await run_clients(clients, args.duration, dcl.make, names)
            finally:
                dcl.close()
            print(f"atdirectory {clients:>4} clients: {r}", flush=True)
            result["directory"].append(r)
            ncl = DnsClients(agent.dns_port, expected_port)
            try:
                r = await run_clients(clients, args.duration, ncl.make, names)
            finally:
                await ncl.close()
            print(f"consul dns  {clients:>4} clients: {r}", flush=True)
            result["consul_dns"].append(r)
        rss_loaded = psutil.Process(directory.pid).memory_info().rss

        flips = [
            (atsign_name(i), sid, expected[atsign_name(i)]) for i, sid in enumerate(agent_sids)
        ]
        result["freshness"] = await measure_freshness(
            agent, port, ctx, flips, args.recoveries, timeout=60
        )
        print(f"freshness: {result['freshness']['critical_to_null']}", flush=True)
        result["ratio_directory_over_dns"] = [
            {
                "clients": d["clients"],
                "lookups_per_s": round(d["lookups_per_s"] / max(n["lookups_per_s"], 1e-9), 2),
                "p50_latency": round(n["p50_ms"] / max(d["p50_ms"], 1e-9), 2),
                "p99_latency": round(n["p99_ms"] / max(d["p99_ms"], 1e-9), 2),
            }
            for d, n in zip(result["directory"], result["consul_dns"], strict=True)
        ]
        result["directory_rss_mb"] = {
            "map_loaded": round(rss_idle / 1e6, 1),
            "after_load": round(rss_loaded / 1e6, 1),
        }
        result["registration_s"] = round(registered_s, 1)
        return result
    finally:
        if directory is not None:
            directory.stop()
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atsigns", type=int, default=10_000, help="atSigns registered")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--changes", type=int, default=120, help="check flips for freshness")
    parser.add_argument(
        "--recoveries", type=int, default=20, help="of those, passed again and timed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw directory.png from directory.json"
    )
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((args.out / "directory.json").read_text()), args.out / "directory.png")
        return
    if args.changes > args.atsigns:
        parser.error("--changes must not exceed --atsigns")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="directory-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    result["params"] = {
        "atsigns": args.atsigns,
        "clients": args.clients,
        "duration_s": args.duration,
        "changes": args.changes,
        "recoveries": args.recoveries,
    }
    result["machine"] = {
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": "client, directory and Consul share the machine; one asyncio client process",
    }
    result["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    result["wall_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "directory.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "directory.png")
    print(f"wrote {args.out / 'directory.json'} and {args.out / 'directory.png'}")


if __name__ == "__main__":
    main()
