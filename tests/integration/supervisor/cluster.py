"""A local cluster of real `supervisor run` processes for the integration tests.

Each node gets its own YAML file, state directory and HTTP port; all nodes share one
inventory file and one data root (the data directory "follows the claim", and the dev
atServer's fence file refuses lower tokens). Supervisors are ``ManagedProcess``es; their
fences and atServers run in their own sessions, so :meth:`Cluster.close` stops the
supervisors cleanly and then waits for (or, as a last resort, kills by PID) whatever
they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
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

from testbed.ports import free_port
from testbed.process import ManagedProcess
from testbed.tls import CertPair

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Node:
    name: str
    cloud: str
    config_path: Path
    state_dir: Path
    http_port: int
    proc: ManagedProcess
    sentences_seen: int = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.proc.start()

    def get(self, path: str, timeout: float = 2.0) -> Any:
        with urllib.request.urlopen(self.api + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        req = urllib.request.Request(
            self.api + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.get("/status")
            return result
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        try:
            return bool(self.get("/readyz").get("ready"))
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
            if pid_alive(int(rec["pid"]), float(rec["create_time"])):
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


def pid_alive(pid: int, create_time: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Cluster:
    """Three (or more) supervisor nodes sharing an inventory, a DCS prefix and a Consul agent."""

    base: Path
    backend: str
    dcs: dict[str, Any]
    consul_url: str
    service: str
    cert: CertPair
    ca_path: Path
    atsigns: Sequence[str]
    ttl: float
    nodes: dict[str, Node] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    observe: Callable[[Node], dict[str, int]] | None = None
    """How to see a node's running atServers (default: the process runner's pid files)."""

    def add_node(self, name: str, cloud: str, **overrides: Any) -> Node:
        state = self.base / name / "state"
        http_port = free_port()
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
                "url": self.consul_url,
                "service_name": self.service,
                "deregister_critical_after": "1m",
            },
            "runner": {
                "kind": "process",
                "port_range": [low, low + 40],
                "data_root": str(self.base / "data"),
                "state_dir": str(state),
                "tls": {
                    "ca": str(self.ca_path),
                    "cert": str(self.cert.cert),
                    "key": str(self.cert.key),
                },
                "stop_timeout": 3,
            },
            "http": {"listen": f"127.0.0.1:{http_port}"},
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
        node = Node(name, cloud, path, state, http_port, proc)
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
        url = f"{self.consul_url}/v1/health/service/{self.service}"
        if passing_only:
            url += "?passing=1"
        with urllib.request.urlopen(url, timeout=2) as resp:
            result: list[dict[str, Any]] = json.loads(resp.read())
            return result

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
        leftovers: list[tuple[int, float | None]] = []
        for n in self.nodes.values():
            pid = n.fence_pid()
            if pid is not None and is_fence_of(pid, n.config_path):
                with contextlib.suppress(psutil.Error):
                    leftovers.append((pid, psutil.Process(pid).create_time()))
            for rec in n.workload_records().values():
                leftovers.append((int(rec["pid"]), float(rec["create_time"])))
        for pid, created in leftovers:
            while pid_alive(pid, created) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid, created):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


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
