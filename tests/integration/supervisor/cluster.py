"""A local cluster of real `supervisor run` processes for the integration tests.

Each node gets its own YAML file, state directory, HTTP port and Consul client agent (joined
to the session's Consul server, as each production node runs its own agent: the node check
that the session keeper passes lives on the node's Consul node); all nodes share one
inventory file. The data follows the claim on CephFS: with ``ceph`` every node mounts the
cluster's own directory of the session's Ceph with its own ceph-fuse (managed by its
supervisor) and cephx key; without it each node has a local data root of its own.
Supervisors are ``ManagedProcess``es; their fences and atServers run in their own sessions,
so :meth:`Cluster.close` stops the supervisors cleanly and then waits for (or, as a last
resort, kills by PID) whatever they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from atserver_runner.proc_start import same_process
from supervisor.registration import health_entries
from testbed.ceph import DATA_ROOT, CephCluster, reap_managed_mount
from testbed.consul import ConsulAgent
from testbed.ports import free_port
from testbed.process import ManagedProcess
from testbed.tls import CertPair

REPO_ROOT = Path(__file__).resolve().parents[3]


def cli(
    *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``supervisor`` CLI (``env``: extra variables) and capture what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@dataclass
class ApiSecrets:
    """The node API's TLS and bearer tokens of a secure cluster (one per role, in files)."""

    ca: Path
    cert: CertPair
    tokens: dict[str, str]
    files: dict[str, Path]

    @classmethod
    def make(cls, base: Path, ca: Path, cert: CertPair) -> ApiSecrets:
        base.mkdir(parents=True, exist_ok=True)
        tokens = {role: secrets.token_hex(24) for role in ("operator", "peer", "registrar")}
        files = {}
        for role, token in tokens.items():
            path = base / f"{role}.token"
            path.write_text(token + "\n")
            path.chmod(0o600)
            files[role] = path
        return cls(ca, cert, tokens, files)

    def http_section(self, port: int, public_port: int) -> dict[str, Any]:
        return {
            "listen": f"127.0.0.1:{port}",
            "public_listen": f"127.0.0.1:{public_port}",
            "tls": {"ca": str(self.ca), "cert": str(self.cert.cert), "key": str(self.cert.key)},
            "auth": {f"{role}_token": {"file": str(path)} for role, path in self.files.items()},
        }


@dataclass
class Node:
    name: str
    cloud: str
    config_path: Path
    state_dir: Path
    http_port: int
    proc: ManagedProcess
    agent: ConsulAgent
    sentences_seen: int = 0
    secure: ApiSecrets | None = None
    """Set when the node API runs with TLS and tokens (``make_cluster(secure=True)``)."""
    public_port: int | None = None

    @property
    def api(self) -> str:
        scheme = "https" if self.secure is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def public_api(self) -> str:
        """The read-only listener (``http.public_listen``), or the API without one."""
        if self.public_port is None:
            return self.api
        return f"http://127.0.0.1:{self.public_port}"

    def _open(self, req: urllib.request.Request, timeout: float) -> Any:
        if self.secure is not None and req.full_url.startswith("https:"):
            req.add_header("Authorization", f"Bearer {self.secure.tokens['operator']}")
            ctx = ssl.create_default_context(cafile=str(self.secure.ca))
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return json.loads(resp.read())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def start(self) -> None:
        self.proc.start()

    def get(self, path: str, timeout: float = 2.0) -> Any:
        """GET from the API (with the operator's token when secure)."""
        return self._open(urllib.request.Request(self.api + path), timeout)

    def post(self, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        req = urllib.request.Request(
            self.api + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._open(req, timeout)

    def status(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.get("/status")
            return result
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        try:
            return bool(
                self._open(urllib.request.Request(self.public_api + "/readyz"), 2.0)["ready"]
            )
        except (OSError, ValueError):
            return False

    def sentences(self) -> list[str]:
        """Every cycle sentence this supervisor logged (from its log file)."""
        out = []
        try:
            text = self.proc.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if "event=cycle sentence=" in line:
                out.append(line.split("event=cycle sentence=", 1)[1].strip("'\""))
        return out

    def workload_records(self) -> dict[str, dict[str, Any]]:
        """The process runner's pid files of this node: atSign -> record."""
        out: dict[str, dict[str, Any]] = {}
        for path in (self.state_dir / "workloads").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(path.read_text())
                out[rec["atsign"]] = rec
        return out

    def running_atsigns(self) -> dict[str, int]:
        """atSign -> fencing token of this node's atServer processes that are alive now."""
        out: dict[str, int] = {}
        for atsign, rec in self.workload_records().items():
            if pid_alive(int(rec["pid"]), float(rec["create_time"]), rec.get("start_ticks")):
                out[atsign] = int(rec["fencing_token"])
        return out

    def fence_log(self) -> list[dict[str, Any]]:
        try:
            lines = (self.state_dir / "fence.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def fence_pid(self) -> int | None:
        try:
            return int((self.state_dir / "fence.pid").read_text())
        except (OSError, ValueError):
            return None


def pid_alive(pid: int, create_time: float | None = None, ticks: int | None = None) -> bool:
    """The recorded process still runs (by its start ticks when the record has them)."""
    return same_process(pid, ticks=ticks, create_time=create_time)


@dataclass
class Cluster:
    """Three (or more) supervisor nodes sharing an inventory, a DCS prefix and a Consul
    server; each with its own Consul client agent."""

    base: Path
    backend: str
    dcs: dict[str, Any]
    consul: ConsulAgent
    service: str
    cert: CertPair
    ca_path: Path
    atsigns: Sequence[str]
    ttl: float
    nodes: dict[str, Node] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    observe: Callable[[Node], dict[str, int]] | None = None
    """How to see a node's running atServers (default: the process runner's pid files)."""
    ceph: CephCluster | None = None
    """Shared storage for the data roots (see the module docstring)."""
    uid: str = field(default_factory=lambda: secrets.token_hex(3))
    secure: ApiSecrets | None = None
    """TLS and tokens on every node's API (see :class:`ApiSecrets`)."""

    @property
    def consul_url(self) -> str:
        """The Consul server's HTTP address (the catalog and health every agent syncs to)."""
        return self.consul.url

    def add_node(self, name: str, cloud: str, **overrides: Any) -> Node:
        state = self.base / name / "state"
        # Consul node names are unique in the whole LAN pool, which outlives this cluster.
        agent = ConsulAgent(
            self.base / name, name=f"{name}-{secrets.token_hex(3)}", join=self.consul
        )
        agent.start()
        http_port = free_port()
        public_port = free_port() if self.secure is not None else None
        low = random.randrange(20000, 29000)
        cfg: dict[str, Any] = {
            "node": {
                "name": name,
                "cloud": cloud,
                "zone": f"{cloud.lower()}-1",
                "address": "127.0.0.1",
            },
            "dcs": self.dcs,
            "timing": {"ttl": self.ttl, "probe_interval": 0.5},
            "consul": {
                "url": agent.url,
                "service_name": self.service,
                "deregister_critical_after": "1m",
            },
            "runner": {
                "kind": "process",
                "port_range": [low, low + 40],
                "data_root": str(self.base / name / "data"),
                "state_dir": str(state),
                "tls": {
                    "ca": str(self.ca_path),
                    "cert": str(self.cert.cert),
                    "key": str(self.cert.key),
                },
                "stop_timeout": 3,
            },
            "storage": (
                self.ceph.supervisor_storage(f"{name}-{self.uid}", f"{DATA_ROOT}/{self.uid}")
                if self.ceph is not None
                else {"kind": "local"}
            ),
            "http": (
                self.secure.http_section(http_port, public_port or free_port())
                if self.secure is not None
                else {"listen": f"127.0.0.1:{http_port}"}
            ),
            "placement": {"rank_delay": 0.3},
            "inventory": {"path": str(self.base / "inventory.yaml")},
        }
        for dotted, value in {**self.extra, **overrides}.items():
            target = cfg
            keys = dotted.split(".")
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = value
        path = self.base / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        proc = ManagedProcess(
            f"supervisor-{name}",
            [sys.executable, "-m", "supervisor.cli", "run", "--config", str(path)],
            self.base / f"{name}.log",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO_ROOT,
        )
        node = Node(
            name,
            cloud,
            path,
            state,
            http_port,
            proc,
            agent,
            secure=self.secure,
            public_port=public_port,
        )
        self.nodes[name] = node
        return node

    def write_inventory(
        self, atsign_options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        opts = atsign_options or {}
        inv = {
            "nodes": [{"name": n.name, "cloud": n.cloud} for n in self.nodes.values()],
            "atsigns": [{"atsign": a, **opts.get(a, {})} for a in self.atsigns],
        }
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "inventory.yaml").write_text(yaml.safe_dump(inv))

    def start(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            self.nodes[name].start()

    # --- observation -----------------------------------------------------------------------

    def running(self) -> dict[str, list[tuple[str, int]]]:
        """atSign -> [(node, token)] of every live atServer (pid files, or ``observe``)."""
        out: dict[str, list[tuple[str, int]]] = {}
        for node in self.nodes.values():
            found = self.observe(node) if self.observe else node.running_atsigns()
            for atsign, token in found.items():
                out.setdefault(atsign, []).append((node.name, token))
        return out

    def consul_instances(self, passing_only: bool = True) -> list[dict[str, Any]]:
        """Instances of the atSigns in their shard services (``consul.shards``: default)."""
        return health_entries(self.consul_url, self.service, self.atsigns, passing=passing_only)

    def passing(self) -> dict[str, list[tuple[str, int]]]:
        """atSign -> [(node, token)] of passing Consul instances."""
        out: dict[str, list[tuple[str, int]]] = {}
        try:
            entries = self.consul_instances()
        except (OSError, ValueError):
            return {}
        for e in entries:
            meta = e["Service"]["Meta"]
            out.setdefault(meta["atsign"], []).append((meta["node"], int(meta["fencing_token"])))
        return out

    def all_once(self, exclude: Sequence[str] = ()) -> bool:
        """Every atSign runs exactly once (on a node not in ``exclude``) and passes in Consul."""
        run = self.running()
        passing = self.passing()
        for a in self.atsigns:
            if len(run.get(a, [])) != 1 or run[a][0][0] in exclude:
                return False
            if passing.get(a) != run[a]:
                return False
        return True

    def fail_back(self, atsign: str, preferred: str, other: str, what: str) -> float:
        """Start ``other`` alone until it runs ``atsign``, then ``preferred``; return the
        seconds until ``atsign`` is back on ``preferred`` and everything passes."""

        def on(node: str) -> bool:
            return self.running().get(atsign, [("", 0)])[0][0] == node and self.all_once()

        self.start(other)
        self.wait(lambda: on(other), 60, f"{atsign} on {other} while {preferred} is down")
        self.start(preferred)
        return self.wait(lambda: on(preferred), 60, what)

    def wait_stable(self, quiet: float, timeout: float) -> dict[str, list[tuple[str, int]]]:
        """Wait until every atSign runs once and :meth:`running` has not changed for ``quiet``
        seconds; return that placement."""
        deadline = time.monotonic() + timeout
        last = self.running()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.running()
            if now != last or not self.all_once():
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
        raise AssertionError(
            f"the placement did not stay the same for {quiet:g}s within {timeout:g}s\n"
            f"running={self.running()}\n" + self.dump()
        )

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll until ``predicate()``; return the seconds it took; fail with the nodes' state."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what}\nrunning={self.running()}\n"
            f"passing={self.passing()}\n" + self.dump()
        )

    def dump(self) -> str:
        parts = []
        for n in self.nodes.values():
            parts.append(f"--- {n.name} (running={n.proc.running()}) ---\n{n.proc.log_tail(25)}")
        return "\n".join(parts)

    # --- cleanup ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every supervisor cleanly; then make sure no fence or atServer is left."""
        for n in self.nodes.values():
            n.proc.thaw()
        # In parallel: each clean shutdown deregisters and stops its atServers.
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            list(pool.map(lambda n: n.proc.stop(timeout=15), self.nodes.values()))
        deadline = time.monotonic() + 10
        leftovers: list[tuple[int, float | None, int | None]] = []
        for n in self.nodes.values():
            pid = n.fence_pid()
            if pid is not None and is_fence_of(pid, n.config_path):
                with contextlib.suppress(psutil.Error):
                    leftovers.append((pid, psutil.Process(pid).create_time(), None))
            for rec in n.workload_records().values():
                leftovers.append(
                    (int(rec["pid"]), float(rec["create_time"]), rec.get("start_ticks"))
                )
        for pid, created, ticks in leftovers:
            while pid_alive(pid, created, ticks) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid, created, ticks):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        for n in self.nodes.values():
            n.agent.stop()
            reap_managed_mount(n.state_dir, self.base / n.name / "data")


def is_fence_of(pid: int, config_path: Path) -> bool:
    """The PID is (still) the fence process of this node's config, not a recycled PID."""
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "fence" in cmd and str(config_path.resolve()) in cmd


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
