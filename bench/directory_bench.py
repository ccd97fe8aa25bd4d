"""Benchmark the atDirectory at 10,000-100,000 atSigns in the sharded layout (or the legacy one).

For each size in ``--sizes`` (ascending, registered cumulatively into one real Consul 1.8.7
agent), starts a real ``atdirectory serve`` process and measures:

1. time to ready (process start -> every followed service listed, every atSign answered),
   directory RSS, Consul RSS and Go heap;
2. lookups/s and p50/p99 for 1, 10 and 100 clients holding TLS connections open, and the
   same lookups as Consul DNS SRV queries (``<name>.<shard>.service.consul``);
3. freshness through the agent, as the supervisor changes things: an at-protocol TTL check
   failed -> ``null``, passed again -> answered, a new registration -> answered (p50/p99);
4. CPU per change (directory and Consul; Consul also without any directory, which is the
   cost of the write itself), from evenly spaced changes with no lookups running;
5. a burst of ``--burst`` changes in ``--burst-seconds``: how far behind the answers fall.

Registration: the first ``--agent-atsigns`` atSigns go through the agent exactly as the
supervisor registers them (service per ``directory.shards``, ID ``<service>-<name>``, a TTL
check ``<id>:at-protocol``; the agent's node has the supervisor's node check
``atfailover-supervisor``; DeregisterCriticalServiceAfter 30m instead of the supervisor's
1m, so that a slow phase cannot reap them), 16 calls in parallel; the rest in bulk:
``/v1/txn`` with 64 operations per transaction (a service and its probe check, passing) on
``size/100`` synthetic catalog nodes, each with its own node check ``atfailover-supervisor``
(written with the node), 4 transactions in parallel. (Not more
through the agent: a Consul 1.8.7 agent with 1,000 local services of this kind spends ~25
CPU-s of every minute in anti-entropy, and agent calls stall behind it.) Consul runs as a
one-server agent with a data dir (as production servers do; ``--consul-dev`` for the
in-memory dev agent, which also pretty-prints every response) and
``limits.http_max_conns_per_client = 1000``. ``--old-version COMMIT`` (with ``--shards 1``)
also runs today's directory from git and compares lookups/s, alternating.

Writes ``bench/results/directory.json`` and ``bench/results/directory.png``. Every process it
starts is stopped by PID at the end (also on errors); every phase has a deadline.
Run: ``.venv/bin/python bench/directory_bench.py --sizes 10000 50000 100000`` (~15 min).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
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

from directory.shards import registrations, shard_service  # noqa: E402
from testbed.consul import ConsulAgent  # noqa: E402
from testbed.ports import free_port  # noqa: E402
from testbed.process import ManagedProcess, wait_until  # noqa: E402
from testbed.tls import TestCA  # noqa: E402

RESULTS = REPO / "bench" / "results"
ATDIRECTORY = Path(sys.executable).parent / "atdirectory"
BASE = "atserver"
TXN_OPS = 64  # Consul allows 64 operations per transaction; 2 per instance
NODE = "bench"  # the node the agent-registered instances claim to run on
NODE_CHECK = "atfailover-supervisor"  # supervisor.registration.NODE_CHECK


def http(url: str, method: str = "GET", body: Any = None, timeout: float = 30.0) -> Any:
    """One Consul HTTP call (bounded); returns the decoded JSON body, or None if empty."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def name_of(i: int) -> str:
    return f"bench{i:07d}"


def answer(host: str, port: int) -> bytes:
    return f"{host}:{port}\r\n@".encode()


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 1e6, 1)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
    if not samples:
        return {}
    arr = np.asarray(samples) * 1000.0
    return {
        "n": len(samples),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "max_ms": round(float(arr.max()), 2),
    }


def sim_node(n: int) -> tuple[str, str]:
    """Name and address of synthetic catalog node ``n``."""
    return f"sim{n:05d}", f"127.1.{n // 250}.{n % 250 + 1}"


def node_check_ops(n: int, status: str = "passing") -> list[dict[str, Any]]:
    """Synthetic node ``n`` and its supervisor node check (no ServiceID), as one node's agent
    would sync them: the check failing makes every instance on the node non-passing."""
    node, address = sim_node(n)
    check = {"Node": node, "CheckID": NODE_CHECK, "Name": f"supervisor on {node} holds its "
             "DCS session", "Status": status}  # fmt: skip
    return [
        {"Node": {"Verb": "set", "Node": {"Node": node, "Address": address}}},
        {"Check": {"Verb": "set", "Check": check}},
    ]


class Fleet:
    """The registered atSigns: where each is and what the directory must answer."""

    def __init__(self, agent: ConsulAgent, shards: int) -> None:
        self.agent = agent
        self.shards = shards
        self.expected: dict[str, bytes] = {}
        self.agent_names: list[str] = []
        self.count = 0
        self.nodes_made = 0
        self.extra = 0  # names made by "new registration" changes
        self.fresh: list[str] = []  # those still registered
        self.bulk_node: dict[str, str] = {}  # bulk atSign -> its synthetic catalog node
        self.catalog_fresh: list[str] = []  # new ones registered in the catalog directly

    def service(self, name: str) -> str:
        return shard_service(BASE, name, self.shards)

    def agent_sid(self, name: str) -> str:
        return registrations(name, BASE, [self.shards])[0].service_id

    def register_node_check(self) -> None:
        """The supervisor's node check on the agent's own node (TTL, no service)."""
        http(
            self.agent.url + "/v1/agent/check/register",
            "PUT",
            {"ID": NODE_CHECK, "Name": f"supervisor on {NODE} holds its DCS session",
             "TTL": "3600s", "Status": "passing"},
        )  # fmt: skip

    def register_through_agent(
        self, name: str, port: int, token: int, probe_status: str = "passing"
    ) -> None:
        """What the supervisor's registrar sends (one probe check; the node check is the
        node's own, registered once). The
        supervisor registers the probe check critical and passes it after its first probe
        (``new_atserver``); the initial fleet is registered passing at once."""
        reg = registrations(name, BASE, [self.shards])[0]
        http(
            self.agent.url + "/v1/agent/service/register",
            "PUT",
            {
                "Name": reg.service,
                "ID": reg.service_id,
                "Address": "127.0.0.1",
                "Port": port,
                "Tags": [reg.tag, f"node-{NODE}", "cloud-a"],
                "Meta": {"atsign": f"@{name}", "node": NODE, "cloud": "a",
                         "fencing_token": str(token)},
                "Check": {"CheckID": f"{reg.service_id}:at-protocol",
                          "Name": f"@{name} at-protocol round trip",
                          "Notes": "TLS connect, prompt, info:brief round trip; passed by the "
                                   "supervisor",
                          "TTL": "3600s", "Status": probe_status,
                          "DeregisterCriticalServiceAfter": "30m"},
            },
        )  # fmt: skip
        self.expected[name] = answer("127.0.0.1", port)

    def bulk_ops(self, i: int, nodes: int) -> list[dict[str, Any]]:
        name = name_of(i)
        node = f"sim{i % nodes:05d}"
        svc = self.service(name)
        sid = registrations(name, BASE, [self.shards])[0].service_id
        host = f"127.1.{(i % nodes) // 250}.{(i % nodes) % 250 + 1}"
        port = 20000 + i % 40000
        self.expected[name] = answer(host, port)
        self.bulk_node[name] = node
        service = {
            "ID": sid, "Service": svc, "Address": host, "Port": port,
            "Tags": [name, f"node-{node}", "cloud-b"],
            "Meta": {"atsign": f"@{name}", "node": node, "cloud": "b",
                     "fencing_token": str(1000 + i)},
        }  # fmt: skip
        check = {
            "Node": node, "CheckID": f"{sid}:at-protocol", "Name": f"@{name} at-protocol round "
            "trip", "Notes": "TLS connect, prompt, info:brief round trip; passed by the "
            "supervisor", "Status": "passing", "ServiceID": sid,
        }  # fmt: skip
        return [
            {"Service": {"Verb": "set", "Node": node, "Service": service}},
            {"Check": {"Verb": "set", "Check": check}},
        ]

    def grow(self, size: int, agent_atsigns: int) -> dict[str, Any]:
        """Register atSigns ``self.count`` .. ``size - 1``; returns how long each way took."""
        out: dict[str, Any] = {}
        first = self.count
        n_agent = max(0, min(agent_atsigns, size) - first)
        if n_agent:
            t0 = time.perf_counter()
            if first == 0:
                self.register_node_check()
            idx = range(first, first + n_agent)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: self.register_through_agent(name_of(i), 7000 + i, i + 1),
                              idx))  # fmt: skip
            self.agent_names += [name_of(i) for i in idx]
            out["agent"] = {"atsigns": n_agent, "seconds": round(time.perf_counter() - t0, 1)}
        start = first + n_agent
        if start < size:
            t0 = time.perf_counter()
            nodes = max(1, size // 100)
            node_ops = [op for n in range(self.nodes_made, nodes) for op in node_check_ops(n)]
            self.nodes_made = max(self.nodes_made, nodes)
            batches = [node_ops[k : k + TXN_OPS] for k in range(0, len(node_ops), TXN_OPS)]
            ops: list[dict[str, Any]] = []
            for i in range(start, size):
                ops += self.bulk_ops(i, nodes)
                if len(ops) >= TXN_OPS:
                    batches.append(ops)
                    ops = []
            if ops:
                batches.append(ops)

            def send(batch: list[dict[str, Any]]) -> None:
                result = http(self.agent.url + "/v1/txn", "PUT", batch, timeout=60)
                if result.get("Errors"):
                    raise RuntimeError(f"Consul txn failed: {result['Errors']}")

            for batch in batches[: (len(node_ops) + TXN_OPS - 1) // TXN_OPS]:
                send(batch)  # the nodes first
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(send, batches[(len(node_ops) + TXN_OPS - 1) // TXN_OPS :]))
            out["bulk"] = {
                "atsigns": size - start,
                "transactions": len(batches),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        self.count = size
        return out

    def new_name(self) -> str:
        self.extra += 1
        name = f"fresh{self.extra:06d}"
        self.fresh.append(name)
        return name

    def catalog_check(self, name: str, status: str) -> None:
        """Set a bulk atSign's at-protocol check in the catalog (as a node's agent syncs it)."""
        node, sid = self.bulk_node[name], self.agent_sid(name)
        notes = "TLS connect, prompt, info:brief round trip; passed by the supervisor"
        check = {
            "Node": node, "CheckID": f"{sid}:at-protocol", "ServiceID": sid,
            "Name": f"@{name} at-protocol round trip", "Status": status, "Notes": notes,
        }  # fmt: skip
        http(self.agent.url + "/v1/txn", "PUT", [{"Check": {"Verb": "set", "Check": check}}])

    def catalog_new(self, name: str, port: int) -> None:
        """A new instance written to the catalog in one transaction (service, probe check)."""
        self.bulk_node[name] = node = "sim00000"
        sid = self.agent_sid(name)
        ops: list[dict[str, Any]] = [
            {"Service": {"Verb": "set", "Node": node, "Service": {
                "ID": sid, "Service": self.service(name), "Address": "127.0.0.1", "Port": port,
                "Tags": [name], "Meta": {"atsign": f"@{name}", "node": node, "cloud": "b",
                                         "fencing_token": "1"}}}},
            {"Check": {"Verb": "set", "Check": {"Node": node, "CheckID": f"{sid}:at-protocol",
             "Name": "at-protocol", "Status": "passing", "ServiceID": sid}}},
        ]  # fmt: skip
        http(self.agent.url + "/v1/txn", "PUT", ops)
        self.catalog_fresh.append(name)
        self.expected[name] = answer("127.0.0.1", port)

    def remove_fresh(self) -> int:
        """Deregister the atServers the changes added (as a handoff would): an agent with
        ~1,000 local services spends tens of CPU-s a minute in anti-entropy."""
        names, self.fresh = self.fresh, []
        for name in names:
            http(f"{self.agent.url}/v1/agent/service/deregister/{self.agent_sid(name)}", "PUT")
            self.expected.pop(name, None)
        catalog, self.catalog_fresh = self.catalog_fresh, []
        for name in catalog:
            # (A txn "delete" of a catalog service answered 409 here; deregister does it.)
            body = {"Node": self.bulk_node.pop(name), "ServiceID": self.agent_sid(name)}
            http(self.agent.url + "/v1/catalog/deregister", "PUT", body)
            self.expected.pop(name, None)
        return len(names) + len(catalog)

    def new_atserver(self, name: str, port: int) -> float:
        """A new atServer the supervisor's way: register (probe check critical), then pass
        the probe check; returns the seconds the two agent calls took."""
        t0 = time.perf_counter()
        self.register_through_agent(name, port, 1, probe_status="critical")
        agent_put(self.agent, f"/v1/agent/check/pass/{self.agent_sid(name)}:at-protocol")
        return time.perf_counter() - t0


def consul_memory(agent: ConsulAgent) -> dict[str, float]:
    """Consul RSS and Go heap (after a moment to settle)."""
    assert agent.process is not None
    doc = http(agent.url + "/v1/agent/metrics")
    gauges = {g["Name"]: g["Value"] for g in doc.get("Gauges", [])}
    return {
        "rss_mb": rss_mb(agent.process.pid),
        "heap_alloc_mb": round(gauges.get("consul.runtime.alloc_bytes", 0) / 1e6, 1),
        "sys_mb": round(gauges.get("consul.runtime.sys_bytes", 0) / 1e6, 1),
    }


def consul_gc_runs(agent: ConsulAgent) -> int:
    doc = http(agent.url + "/v1/agent/metrics")
    gauges = {g["Name"]: g["Value"] for g in doc.get("Gauges", [])}
    return int(gauges.get("consul.runtime.total_gc_runs", 0))


def consul_list_cost(agent: ConsulAgent, fleet: Fleet, lists: int = 30) -> dict[str, float]:
    """Consul CPU for one shard's passing list (what each replica costs Consul per change),
    from ``lists`` non-blocking queries of random shards."""
    assert agent.process is not None
    services = sorted({fleet.service(n) for n in fleet.expected})
    rng = random.Random(7)
    picks = [rng.choice(services) for _ in range(lists)]
    size = 0
    c0 = cpu_seconds(agent.process.pid)
    t0 = time.perf_counter()
    for svc in picks:
        req = urllib.request.Request(
            f"{agent.url}/v1/health/service/{svc}?passing=1",
            headers={"Accept-Encoding": "identity"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            size += len(resp.read())
    wall = time.perf_counter() - t0
    return {
        "consul_cpu_ms_per_list": round((cpu_seconds(agent.process.pid) - c0) / lists * 1000, 2),
        "latency_ms_per_list": round(wall / lists * 1000, 2),
        "bytes_per_list": size // lists,
    }


def wait_quiet(pid: int, limit: float = 0.1, within: float = 120.0) -> float:
    """Wait (bounded) until ``pid`` used less than ``limit`` of a core for 3 s in a row;
    returns the seconds waited."""
    start = time.monotonic()
    quiet = 0
    while quiet < 3 and time.monotonic() - start < within:
        c0 = cpu_seconds(pid)
        time.sleep(1.0)
        quiet = quiet + 1 if cpu_seconds(pid) - c0 < limit else 0
    return round(time.monotonic() - start, 1)


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
        self.wrong: list[tuple[str, bytes]] = []

    async def make(self) -> Callable[[str], Awaitable[bool]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx)
        self.writers.append(writer)
        async with asyncio.timeout(10):
            assert await reader.readexactly(1) == b"@"

        async def ask(name: str) -> bool:
            writer.write(f"@{name}\n".encode())
            async with asyncio.timeout(10):
                got = await reader.readuntil(b"\r\n@")
            if got != self.expected[name]:
                if len(self.wrong) < 10:
                    self.wrong.append((name, got))
                return False
            return True

        return ask

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()


class DnsClients:
    """Consul DNS SRV queries for ``<name>.<service>.service.consul``, one UDP socket each."""

    def __init__(self, port: int, fleet: Fleet) -> None:
        self.port, self.fleet = port, fleet
        self.sockets: list[Any] = []

    async def make(self) -> Callable[[str], Awaitable[bool]]:
        backend = dns.asyncbackend.get_default_backend()
        sock = await backend.make_socket(socket.AF_INET, socket.SOCK_DGRAM, 0, ("127.0.0.1", 0))
        self.sockets.append(sock)

        async def ask(name: str) -> bool:
            qname = f"{name}.{self.fleet.service(name)}.service.consul"
            query = dns.message.make_query(qname, dns.rdatatype.SRV)
            response = await dns.asyncquery.udp(
                query, "127.0.0.1", timeout=10, port=self.port, sock=sock
            )
            if response.rcode() != dns.rcode.NOERROR or not response.answer:
                return False
            ports = {rr.port for rrset in response.answer for rr in rrset}
            want = int(self.fleet.expected[name].split(b":")[1].split(b"\r")[0])
            return ports == {want}

        return ask

    async def close(self) -> None:
        for sock in self.sockets:
            await sock.close()
        self.sockets.clear()


class Asker:
    """One held TLS connection that asks questions in batches (pipelined)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Asker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        async with asyncio.timeout(10):
            assert await reader.readexactly(1) == b"@"
        return cls(reader, writer)

    async def ask_many(self, names: list[str]) -> list[bytes]:
        self.writer.write(b"".join(f"@{n}\n".encode() for n in names))
        async with asyncio.timeout(10):
            return [await self.reader.readuntil(b"\r\n@") for _ in names]

    async def until(self, name: str, want: bytes, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while (got := (await self.ask_many([name]))[0]) != want:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"@{name}: still {got!r} after {timeout}s")
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self.writer.close()


NULL = b"null\r\n@"


AGENT_CALLS: list[float] = []
"""Seconds each agent call of the changes took (reported per size)."""


def agent_put(agent: ConsulAgent, path: str) -> None:
    t0 = time.perf_counter()
    http(agent.url + path, "PUT", timeout=30)
    AGENT_CALLS.append(time.perf_counter() - t0)


async def measure_freshness(
    agent: ConsulAgent, fleet: Fleet, asker: Asker, pool: list[str], changes: int, timed: int
) -> dict[str, Any]:
    """Fail ``changes`` checks one at a time (-> null), pass the first ``timed`` again (->
    answered), and register ``timed`` new atSigns (-> answered); clocks start just before
    the agent call."""
    to_null: list[float] = []
    to_back: list[float] = []
    to_new: list[float] = []
    new_after_calls: list[float] = []
    failed: list[str] = []
    try:
        for n, name in enumerate(pool[:changes]):
            want = fleet.expected[name]
            await asker.until(name, want, 30)
            sid = fleet.agent_sid(name)
            t0 = time.perf_counter()
            await asyncio.to_thread(agent_put, agent, f"/v1/agent/check/fail/{sid}:at-protocol")
            failed.append(name)
            await asker.until(name, NULL, 30)
            to_null.append(time.perf_counter() - t0)
            if n < timed:
                t0 = time.perf_counter()
                await asyncio.to_thread(agent_put, agent, f"/v1/agent/check/pass/{sid}:at-protocol")
                failed.remove(name)
                await asker.until(name, want, 30)
                to_back.append(time.perf_counter() - t0)
        for _ in range(timed):
            name = fleet.new_name()
            port = 40000 + fleet.extra
            t0 = time.perf_counter()
            calls = await asyncio.to_thread(fleet.new_atserver, name, port)
            await asker.until(name, fleet.expected[name], 30)
            to_new.append(time.perf_counter() - t0)
            new_after_calls.append(to_new[-1] - calls)
    finally:
        for name in failed:  # leave everything passing for the next phases
            sid = fleet.agent_sid(name)
            await asyncio.to_thread(agent_put, agent, f"/v1/agent/check/pass/{sid}:at-protocol")
    for name in failed:
        await asker.until(name, fleet.expected[name], 30)
    return {
        "critical_to_null": percentiles(to_null),
        "passing_again_to_answered": percentiles(to_back),
        "new_registration_to_answered": percentiles(to_new),
        "new_registration_after_the_agent_calls": percentiles(new_after_calls),
        "samples_ms": {
            "critical_to_null": [round(s * 1000, 2) for s in to_null],
            "passing_again_to_answered": [round(s * 1000, 2) for s in to_back],
            "new_registration_to_answered": [round(s * 1000, 2) for s in to_new],
        },
    }


def spaced_changes(agent: ConsulAgent, fleet: Fleet, names: list[str], rate: float) -> float:
    """Fail each of ``names`` then pass it again, ``rate`` agent calls a second; returns the
    seconds it took."""
    t0 = time.perf_counter()
    k = 0
    for verb in ("fail", "pass"):
        for name in names:
            k += 1
            pause = t0 + k / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            agent_put(agent, f"/v1/agent/check/{verb}/{fleet.agent_sid(name)}:at-protocol")
    return time.perf_counter() - t0


def measure_cpu_per_change(
    agent: ConsulAgent, fleet: Fleet, names: list[str], directory_pid: int | None, rate: float
) -> dict[str, Any]:
    """CPU per change of the directory and of Consul: evenly spaced changes minus the idle
    rate measured just before (no lookups run meanwhile)."""
    assert agent.process is not None
    pids = {"consul": agent.process.pid}
    if directory_pid is not None:
        pids["directory"] = directory_pid
    idle_s = 8.0

    def idle_rate() -> dict[str, float]:
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        time.sleep(idle_s)
        return {k: (cpu_seconds(p) - c0[k]) / idle_s for k, p in pids.items()}

    before = idle_rate()
    gc0 = consul_gc_runs(agent)
    c0 = {k: cpu_seconds(p) for k, p in pids.items()}
    elapsed = spaced_changes(agent, fleet, names, rate)
    time.sleep(1.0)  # the last change lands
    elapsed += 1.0
    used = {k: cpu_seconds(p) - c0[k] for k, p in pids.items()}
    gc_runs = consul_gc_runs(agent) - gc0
    after = idle_rate()
    n = 2 * len(names)
    out: dict[str, Any] = {"changes": n, "seconds": round(elapsed, 1), "consul_gc_runs": gc_runs}
    for k in pids:
        # Background work (Raft snapshots, Go GC) comes and goes: take the quieter window.
        idle = min(before[k], after[k])
        out[f"{k}_ms_per_change"] = round(max(used[k] - idle * elapsed, 0.0) / n * 1000, 2)
        out[f"{k}_raw_ms_per_change"] = round(used[k] / n * 1000, 2)
        out[f"{k}_idle_cores"] = [round(before[k], 4), round(after[k], 4)]
    return out


async def measure_burst(
    agent: ConsulAgent,
    fleet: Fleet,
    port: int,
    ctx: ssl.SSLContext,
    pool: list[str],
    total: int,
    seconds: float,
    directory_pid: int,
    via: str = "agent",
) -> dict[str, Any]:
    """``total`` changes evenly over ``seconds`` (a third each: a check fails, a failed check
    passes again, a new atSign registers); a checker asks for every pending change in
    pipelined rounds and records when each shows in the answers. ``via`` ``agent``: the
    supervisor's agent calls on agent-registered atSigns; ``catalog``: one transaction
    per change on bulk atSigns, as many nodes' agents would sync them to the servers."""
    assert agent.process is not None

    def set_check(name: str, verb: str) -> None:
        if via == "agent":
            agent_put(agent, f"/v1/agent/check/{verb}/{fleet.agent_sid(name)}:at-protocol")
        else:
            t0 = time.perf_counter()
            fleet.catalog_check(name, "critical" if verb == "fail" else "passing")
            AGENT_CALLS.append(time.perf_counter() - t0)

    def new_one(name: str, port: int) -> None:
        if via == "agent":
            fleet.new_atserver(name, port)
        else:
            t0 = time.perf_counter()
            fleet.catalog_new(name, port)
            AGENT_CALLS.append(time.perf_counter() - t0)

    kinds = [("fail", "pass", "new")[i % 3] for i in range(total)]
    n_fail, n_pass = kinds.count("fail"), kinds.count("pass")
    fails, revive = pool[:n_fail], pool[n_fail : n_fail + n_pass]
    assert len(revive) == n_pass, "not enough agent-registered atSigns for the burst"
    for name in revive:  # fail these first; the burst passes them again
        await asyncio.to_thread(set_check, name, "fail")
    asker = await Asker.open(port, ctx)
    try:
        for name in revive:
            await asker.until(name, NULL, 30)
        queue = {"fail": iter(fails), "pass": iter(revive)}
        plan = [(kind, next(queue[kind]) if kind in queue else "") for kind in kinds]
        pending: dict[str, tuple[float, bytes, str]] = {}
        lags: list[float] = []
        lags_by_kind: dict[str, list[float]] = {"fail": [], "pass": [], "new": []}
        lock = threading.Lock()
        sent_all = threading.Event()
        send_errors: list[str] = []
        max_pending = 0

        def send_one(kind: str, name: str) -> None:
            try:
                if kind == "new":
                    with lock:
                        name = fleet.new_name()
                        port = 40000 + fleet.extra
                        pending[name] = (time.perf_counter(), answer("127.0.0.1", port), kind)
                    new_one(name, port)
                    return
                want = NULL if kind == "fail" else fleet.expected[name]
                with lock:
                    pending[name] = (time.perf_counter(), want, kind)
                set_check(name, kind)
            except Exception as exc:  # reported, and the burst fails below
                send_errors.append(repr(exc))

        def sender() -> None:
            # Several agent calls may be in flight so that a slow one does not delay the
            # schedule (the supervisors of many nodes change things independently).
            t0 = time.perf_counter()
            try:
                with concurrent.futures.ThreadPoolExecutor(4) as calls:
                    for i, (kind, name) in enumerate(plan):
                        pause = t0 + i * seconds / total - time.perf_counter()
                        if pause > 0:
                            time.sleep(pause)
                        calls.submit(send_one, kind, name)
            finally:
                sent_all.set()

        c0 = {"directory": cpu_seconds(directory_pid), "consul": cpu_seconds(agent.process.pid)}
        started = time.perf_counter()
        thread = threading.Thread(target=sender, name="burst-sender", daemon=True)
        thread.start()
        last_sent_at = 0.0
        backlog_at_end = 0
        async with asyncio.timeout(seconds + 120):
            while True:
                with lock:
                    todo = dict(pending)
                max_pending = max(max_pending, len(todo))
                if sent_all.is_set() and not last_sent_at:
                    last_sent_at = time.perf_counter()
                    backlog_at_end = len(todo)
                if not todo and sent_all.is_set():
                    break
                if todo:
                    names = list(todo)
                    answers = await asker.ask_many(names)
                    now = time.perf_counter()
                    with lock:
                        for name, got in zip(names, answers, strict=True):
                            sent_at, want, kind = todo[name]
                            if got == want and pending.get(name, (0.0, b"", ""))[0] == sent_at:
                                lags.append(now - sent_at)
                                lags_by_kind[kind].append(now - sent_at)
                                del pending[name]
                await asyncio.sleep(0.002)
        finished = time.perf_counter()
        thread.join(10)
        used = {
            "directory": cpu_seconds(directory_pid) - c0["directory"],
            "consul": cpu_seconds(agent.process.pid) - c0["consul"],
        }
    finally:
        asker.close()
    if send_errors:
        raise RuntimeError(f"burst: agent calls failed: {send_errors[:3]}")
    for name in fails + revive:  # everything passing again for whatever comes next
        await asyncio.to_thread(set_check, name, "pass")
    return {
        "via": via,
        "changes": total,
        "seconds": seconds,
        "sent_in_s": round(last_sent_at - started, 2),
        "lag": percentiles(lags),
        "lag_by_kind": {k: percentiles(v) for k, v in lags_by_kind.items()},
        "max_changes_not_yet_answered": max_pending,
        "not_yet_answered_when_the_last_was_sent": backlog_at_end,
        "all_answered_after_last_change_s": round(finished - last_sent_at, 3),
        "directory_cpu_s": round(used["directory"], 2),
        "consul_cpu_s": round(used["consul"], 2),
        "directory_ms_per_change": round(used["directory"] / total * 1000, 2),
        "consul_ms_per_change": round(used["consul"] / total * 1000, 2),
        "samples_lag_ms": [round(s * 1000, 2) for s in lags],
    }


def old_directory_code(base: Path, commit: str) -> Path:
    """The directory package at ``commit`` (from git), to run today's version side by side."""
    target = base / f"old-{commit}"
    target.mkdir(exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "directory"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, timeout=60, check=True)
    return target


def start_directory(
    base: Path,
    agent: ConsulAgent,
    cert: Any,
    shards: int,
    size: int,
    old_code: Path | None = None,
) -> tuple[ManagedProcess, int, int, float]:
    """A directory process, ready (every service listed, every atSign answered); with
    ``old_code``, that version (which knows no shards) instead of this one."""
    port, metrics_port = free_port(), free_port()
    program = [sys.executable, "-m", "directory.cli"] if old_code else [str(ATDIRECTORY)]
    argv = [
        *program, "serve", "--consul", agent.url,
        "--host", "127.0.0.1", "--port", str(port),
        "--cert", str(cert.cert), "--key", str(cert.key),
        "--metrics-port", str(metrics_port), "--log-level", "warning",
        "--max-connections", "2000",
    ]  # fmt: skip
    if old_code is None:
        argv += ["--shards", str(shards)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATDIRECTORY_")}
    if old_code is not None:
        env["PYTHONPATH"] = str(old_code)
    name = f"bench-atdirectory-{'old-' if old_code else ''}{size}"
    directory = ManagedProcess(name, argv, base / f"{name}.log", env=env, cwd=old_code)
    t0 = time.perf_counter()
    directory.start()

    def ready() -> bool:
        if not directory.running():
            raise RuntimeError(f"atdirectory exited:\n{directory.log_tail()}")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        values = dict(
            line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
        )
        unsynced = values.get("atdirectory_services_unsynced", "0" if old_code else "1")
        return float(unsynced) == 0 and float(values.get("atdirectory_map_atsigns", "0")) >= size

    wait_until(ready, 300, interval=0.05, what=f"the directory's map of {size} atSigns")
    return directory, port, metrics_port, time.perf_counter() - t0


async def compare_with_old(
    args: argparse.Namespace,
    base: Path,
    agent: ConsulAgent,
    cert: Any,
    ctx: ssl.SSLContext,
    fleet: Fleet,
    size: int,
    port: int,
    names: list[str],
) -> dict[str, Any]:
    """Lookups/s of today's directory (``--old-version``) and this one, same Consul, same
    moment: three alternating rounds per client count, each ``--duration`` long."""
    old_code = old_directory_code(base, args.old_version)
    old, old_port, _m, ready_s = await asyncio.to_thread(
        start_directory, base, agent, cert, 1, size, old_code
    )
    out: dict[str, Any] = {"old_version": args.old_version, "old_ready_s": round(ready_s, 2)}
    try:
        out["old_rss_mb"] = rss_mb(old.pid)
        for clients in args.clients:
            rounds: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(3):
                for which, p in (("old", old_port), ("new", port)):
                    dcl = DirectoryClients(p, ctx, fleet.expected)
                    try:
                        r = await run_clients(clients, args.duration, dcl.make, names)
                    finally:
                        dcl.close()
                    if r["wrong_answers"]:
                        raise RuntimeError(f"{which} directory: {r['wrong_answers']} wrong")
                    rounds[which].append(r["lookups_per_s"])
            out[f"clients_{clients}"] = rounds
            print(f"[{size}] lookups/s old vs new, {clients} clients: {rounds}", flush=True)
    finally:
        old.stop()
    return out


async def measure_size(
    args: argparse.Namespace,
    base: Path,
    agent: ConsulAgent,
    fleet: Fleet,
    size: int,
    cert: Any,
    ctx: ssl.SSLContext,
) -> dict[str, Any]:
    assert agent.process is not None
    out: dict[str, Any] = {"atsigns": size}
    out["registration"] = await asyncio.to_thread(fleet.grow, size, args.agent_atsigns)
    print(f"[{size}] registered: {out['registration']}", flush=True)
    out["registration"]["settle_s"] = await asyncio.to_thread(wait_quiet, agent.process.pid)
    out["consul_memory"] = await asyncio.to_thread(consul_memory, agent)
    print(f"[{size}] consul memory: {out['consul_memory']}", flush=True)
    # Each phase leaves every check passing, so the phases may reuse the same atSigns.
    pool = list(fleet.agent_names)
    random.Random(size).shuffle(pool)
    cpu_names = pool[: args.cpu_changes // 2]
    out["consul_without_directory"] = await asyncio.to_thread(
        measure_cpu_per_change, agent, fleet, cpu_names, None, args.cpu_rate
    )
    print(f"[{size}] consul alone: {out['consul_without_directory']}", flush=True)

    directory, port, _metrics_port, ready_s = await asyncio.to_thread(
        start_directory, base, agent, cert, args.shards, size
    )
    try:
        out["directory"] = {"ready_s": round(ready_s, 2), "rss_mb_ready": rss_mb(directory.pid)}
        print(f"[{size}] directory ready in {ready_s:.2f}s, {out['directory']}", flush=True)
        names = sorted(fleet.expected)
        out["lookups"] = []
        for clients in args.clients:
            dcl = DirectoryClients(port, ctx, fleet.expected)
            try:
                r = await run_clients(clients, args.duration, dcl.make, names)
            finally:
                dcl.close()
            if dcl.wrong:
                r["wrong_examples"] = [(n, g.decode(errors="replace")) for n, g in dcl.wrong]
            print(f"[{size}] atdirectory {clients:>4} clients: {r}", flush=True)
            out["lookups"].append(r)
        out["consul_dns"] = []
        for clients in args.dns_clients:
            ncl = DnsClients(agent.dns_port, fleet)
            try:
                r = await run_clients(clients, args.dns_duration, ncl.make, names)
            finally:
                await ncl.close()
            print(f"[{size}] consul dns  {clients:>4} clients: {r}", flush=True)
            out["consul_dns"].append(r)
        out["directory"]["rss_mb_after_lookups"] = rss_mb(directory.pid)
        if args.old_version:
            out["lookups_ab"] = await compare_with_old(
                args, base, agent, cert, ctx, fleet, size, port, names
            )

        asker = await Asker.open(port, ctx)
        try:
            out["freshness"] = await measure_freshness(
                agent, fleet, asker, pool, args.changes, args.timed
            )
        finally:
            asker.close()
        await asyncio.to_thread(fleet.remove_fresh)
        f = out["freshness"]
        print(
            f"[{size}] freshness: null {f['critical_to_null']}, back "
            f"{f['passing_again_to_answered']}, new {f['new_registration_to_answered']}",
            flush=True,
        )
        out["cpu"] = await asyncio.to_thread(
            measure_cpu_per_change, agent, fleet, cpu_names, directory.pid, args.cpu_rate
        )
        out["consul_list_cost"] = await asyncio.to_thread(consul_list_cost, agent, fleet)
        print(f"[{size}] one shard list: {out['consul_list_cost']}", flush=True)
        c = out["cpu"]
        c["consul_added_by_directory_ms_per_change"] = round(
            c["consul_ms_per_change"] - out["consul_without_directory"]["consul_ms_per_change"], 2
        )
        print(f"[{size}] cpu per change: {c}", flush=True)
        out["burst"] = await measure_burst(
            agent, fleet, port, ctx, pool, args.burst, args.burst_seconds, directory.pid
        )
        b = {k: v for k, v in out["burst"].items() if k != "samples_lag_ms"}
        print(f"[{size}] burst: {b}", flush=True)
        await asyncio.to_thread(fleet.remove_fresh)
        bulk_names = sorted(fleet.bulk_node)
        bulk_pool = random.Random(size + 1).sample(bulk_names, min(len(bulk_names), 400))
        out["burst_catalog"] = await measure_burst(
            agent, fleet, port, ctx, bulk_pool, args.burst, args.burst_seconds, directory.pid,
            via="catalog",
        )  # fmt: skip
        b = {k: v for k, v in out["burst_catalog"].items() if k != "samples_lag_ms"}
        print(f"[{size}] burst through the catalog: {b}", flush=True)
        out["fresh_deregistered"] = await asyncio.to_thread(fleet.remove_fresh)
        out["directory"]["rss_mb_end"] = rss_mb(directory.pid)
        out["agent_calls"] = percentiles(AGENT_CALLS)
        AGENT_CALLS.clear()
        out["consul_memory_end"] = await asyncio.to_thread(consul_memory, agent)
    finally:
        directory.stop()
    return out


async def bench(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    ca = TestCA(base / "ca")
    cert = ca.issue("directory", ["127.0.0.1", "localhost"])
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    agent = ConsulAgent(
        base, name="bench-consul", persistent=not args.consul_dev, http_max_conns_per_client=1000
    )
    result: dict[str, Any] = {"sizes": []}
    try:
        agent.start(timeout=60)
        fleet = Fleet(agent, args.shards)
        async with asyncio.timeout(args.max_minutes * 60):
            for size in sorted(args.sizes):
                result["sizes"].append(
                    await measure_size(args, base, agent, fleet, size, cert, ctx)
                )
                write(result, args, partial=True)
    finally:
        agent.stop()
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    xs = [s["atsigns"] for s in sizes]
    labels = [f"{x // 1000}k" for x in xs]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0][0]
    w = 0.8 / max(1, len(sizes[0]["lookups"]))
    for k, lv in enumerate(sizes[0]["lookups"]):
        ax.bar(
            np.arange(len(xs)) + k * w,
            [s["lookups"][k]["lookups_per_s"] for s in sizes],
            w,
            label=f"{lv['clients']} clients",
        )
    ax.set_xticks(np.arange(len(xs)) + w, labels)
    ax.set_ylabel("lookups/s")
    ax.set_title("atdirectory lookups/s (TLS, held connections)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for key, label, color in (
        ("critical_to_null", "check fails -> null", "C3"),
        ("passing_again_to_answered", "passes again -> answered", "C2"),
        ("new_registration_to_answered", "new registration -> answered", "C0"),
    ):
        ax.plot(xs, [s["freshness"][key]["p50_ms"] for s in sizes], "-o", color=color,
                label=f"{label} p50")  # fmt: skip
        ax.plot(xs, [s["freshness"][key]["p99_ms"] for s in sizes], "--s", color=color,
                label=f"{label} p99")  # fmt: skip
    ax.set_xlabel("atSigns")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Freshness (through the agent)")
    ax.legend(fontsize=7)
    ax = axes[0][2]
    d = [s["cpu"]["directory_ms_per_change"] for s in sizes]
    c = [s["cpu"]["consul_ms_per_change"] for s in sizes]
    c0 = [s["consul_without_directory"]["consul_ms_per_change"] for s in sizes]
    x = np.arange(len(xs))
    ax.bar(x - 0.27, d, 0.27, label="directory")
    ax.bar(x, c, 0.27, label="Consul (with the directory)")
    ax.bar(x + 0.27, c0, 0.27, label="Consul without a directory (the write)")
    ax.axhline(50, color="k", lw=0.8, ls=":", label="target: directory + Consul")
    ax.set_xticks(x, labels)
    ax.set_ylabel("CPU ms per change")
    ax.set_title("CPU per change")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for n, s in enumerate(sizes):
        for key, style, how in (("burst", "-", "agent"), ("burst_catalog", "--", "catalog")):
            lag = sorted(s.get(key, {}).get("samples_lag_ms", []))
            if lag:
                ax.plot(lag, np.arange(1, len(lag) + 1) / len(lag), style, color=f"C{n}",
                        label=f"{s['atsigns']:,}, via {how}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("ms from the change to the answer showing it")
    ax.set_ylabel("fraction of changes")
    b = sizes[-1]["burst"]
    ax.set_title(f"Burst: {b['changes']} changes in {b['seconds']:.0f} s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    ax.plot(xs, [s["directory"]["ready_s"] for s in sizes], "-o", label="time to ready (s)")
    ax.set_xlabel("atSigns")
    ax.set_ylabel("s")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["directory"]["rss_mb_end"] for s in sizes], "-s", color="C1",
             label="directory RSS (MB)")  # fmt: skip
    ax2.set_ylabel("MB")
    ax.set_title("Directory: time to ready and RSS")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax = axes[1][2]
    ax.plot(xs, [s["consul_memory"]["rss_mb"] for s in sizes], "-o", label="Consul RSS")
    ax.plot(xs, [s["consul_memory"]["heap_alloc_mb"] for s in sizes], "-s", label="Go heap")
    ax.set_xlabel("atSigns")
    ax.set_ylabel("MB")
    ax.set_title("Consul server memory")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"atdirectory, {result['params']['shards']} shards, Consul 1.8.7 "
        f"({'dev' if result['params']['consul_dev'] else 'server'} mode), 2 cores shared"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict[str, Any], args: argparse.Namespace, partial: bool = False) -> None:
    result["params"] = {
        "sizes": args.sizes,
        "shards": args.shards,
        "consul_dev": args.consul_dev,
        "agent_atsigns": args.agent_atsigns,
        "clients": args.clients,
        "duration_s": args.duration,
        "changes": args.changes,
        "timed": args.timed,
        "cpu_changes": args.cpu_changes,
        "cpu_rate": args.cpu_rate,
        "burst": args.burst,
        "burst_seconds": args.burst_seconds,
        "old_version": args.old_version,
    }
    result["machine"] = {
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "note": "client, directory and Consul share the machine; one asyncio client process",
    }
    result["partial"] = partial
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "directory.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 50_000, 100_000],
        help="atSigns registered, measured one size after the other",
    )
    parser.add_argument("--shards", type=int, default=256, help="layout (1 = legacy service)")
    parser.add_argument(
        "--agent-atsigns",
        type=int,
        default=400,
        help="atSigns registered through the agent as the supervisor does",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--dns-clients", type=int, nargs="*", default=[1, 10])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per lookup run")
    parser.add_argument("--dns-duration", type=float, default=3.0)
    parser.add_argument("--changes", type=int, default=100, help="checks failed -> null")
    parser.add_argument(
        "--timed", type=int, default=40, help="of those passed again, and new registrations, timed"
    )
    parser.add_argument("--cpu-changes", type=int, default=80, help="changes for CPU/change")
    parser.add_argument("--cpu-rate", type=float, default=5.0, help="changes/s for CPU/change")
    parser.add_argument("--burst", type=int, default=500, help="changes in the burst")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--consul-dev", action="store_true", help="in-memory dev agent")
    parser.add_argument(
        "--old-version",
        metavar="COMMIT",
        help="also measure lookups/s of the directory at this commit (needs --shards 1)",
    )
    parser.add_argument("--max-minutes", type=float, default=45.0, help="deadline of the run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw directory.png from directory.json")  # fmt: skip
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((args.out / "directory.json").read_text()), args.out / "directory.png")
        return
    needed = max(args.cpu_changes // 2, args.changes, 2 * (args.burst // 3 + 1))
    if args.agent_atsigns < needed:
        parser.error(f"--agent-atsigns must be at least {needed} for these changes")
    if args.old_version and args.shards != 1:
        parser.error("--old-version follows only the legacy service: use it with --shards 1")
    if min(args.sizes) < args.agent_atsigns:
        parser.error("every size must be at least --agent-atsigns")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="directory-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    result["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    result["wall_s"] = round(time.time() - started, 1)
    write(result, args)
    plot(result, args.out / "directory.png")
    print(f"wrote {args.out / 'directory.json'} and {args.out / 'directory.png'}")


if __name__ == "__main__":
    main()
