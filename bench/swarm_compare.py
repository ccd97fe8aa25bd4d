"""Side by side with Docker Swarm: failover time, double owners and lost writes, same run.

One machine shape for every system: three nodes, each a network namespace with its own
Docker engine (Debian's dockerd 20.10, own data-root, exec-root, socket, pidfile, cgroup;
:mod:`testbed.swarm`), on two bridges the benchmark creates (:mod:`testbed.netns`): the
*cluster* link (node to node, and to etcd and Consul on the host's address there) and the
*client* link (the outside observer and the writers). The same dev atServer image (``docker
import``) is loaded into every engine; the same atSigns, each with its data directory on a
directory every engine bind-mounts.

Systems, one after another on the same engines:

* ``ours``: ``supervisor run`` in each node's namespace and cgroup with the Docker runner on
  its own engine (``runner.docker_url``), 3-member etcd (ttl 6) and Consul on the host.
* ``swarm-default``: the engines form a Swarm of three managers; one service per atSign
  (``--replicas 1``, ``--publish mode=host``, the data dir bind-mounted, ``--init``,
  ``--no-resolve-image``), fencing token 1 for every copy (Swarm has none). Swarm's defaults.
* ``swarm-tuned``: the same with ``--dispatcher-heartbeat 1s``, ``--task-history-limit 1``,
  ``--restart-delay 0s``, ``--stop-grace-period 2s`` (what each changes: docs/chaos.md).

Faults, rotated, ``--reps`` of each per system: ``crash`` (the atServer process of one atSign
SIGKILLed), ``node-loss`` (every process of a node SIGKILLed by the PIDs in its cgroup:
engine, containerd, shims, containers, and for ``ours`` the supervisor; restarted once the
atSigns are served elsewhere), ``partition`` (the node's cluster link cut for
``--partition-ours-s`` / ``--partition-default-s`` / ``--partition-tuned-s`` seconds (longer
than that system's detection), its client link kept, so the observer still sees what it serves;
then healed).

The observer (:class:`testbed.copies.CopyObserver`) asks every (node, port) for
``info:brief`` every 0.2 s; writers (one per atSign, PKAM login, ``update`` every 0.3 s) write
to a copy the observer saw answering, alternating between copies when there are two (as
clients spread over both sides of a partition would). Per fault and affected atSign: time to
the first acknowledged write on another node (``served_s``; for a crash, on any node), seconds
with no copy answering, double-owner intervals, for partitions the time after the heal until
one copy is left, and at the end of each system's run every acknowledged write read back
(lost ones are charged to the fault whose window they were written in).

Writes ``bench/results/swarm_compare.json`` and ``.png``; ``--replot`` redraws the PNG.
Run as root: ``nice -n 5 .venv/bin/python bench/swarm_compare.py`` (~40 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atserver_runner.paths import atsign_dir  # noqa: E402
from chaos.atclient import AtConnection, AtError, client_ssl_context  # noqa: E402
from chaos.cluster import AtSignKeys, make_atsign_keys  # noqa: E402
from chaos.workload import OpRecord  # noqa: E402
from testbed.consul import ConsulAgent  # noqa: E402
from testbed.copies import (  # noqa: E402
    CopyObserver,
    Interval,
    Overlap,
    Sample,
    answer_intervals,
    covered,
    overlaps,
    ratio,
    summary,
)
from testbed.etcd import EtcdCluster  # noqa: E402
from testbed.netns import Lab  # noqa: E402
from testbed.process import ManagedProcess  # noqa: E402
from testbed.swarm import Engine, NodeHost, Swarm, SwarmError, SwarmSettings  # noqa: E402
from testbed.tls import TestCA  # noqa: E402

RESULTS = REPO / "bench" / "results"
IMAGE = "atfailover/devserver:dev"
CONTAINER_PORT = 6464
NODES = ("n1", "n2", "n3")
FAULTS = ("crash", "node-loss", "partition")
SYSTEMS = ("ours", "swarm-default", "swarm-tuned")
SETTINGS = {
    "swarm-default": SwarmSettings(),
    "swarm-tuned": SwarmSettings(
        dispatcher_heartbeat="1s",
        task_history_limit=1,
        restart_delay="0s",
        stop_grace_period="2s",
    ),
}
OBSERVE_INTERVAL_S = 0.2
MAX_GAP_S = 1.0
"""Samples of one (atSign, node) further apart than this split its answering interval."""
WRITE_INTERVAL_S = 0.3
OP_TIMEOUT_S = 2.0
TTL_S = 6.0
PKAM_FILE = ".pkam.pub"


class Deadline:
    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + minutes * 60

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Fault:
    system: str
    kind: str
    victim: str
    """The node (for a crash: the node the atSign ran on)."""
    start: float
    healed: float
    affected: list[str]
    leader: bool | None = None
    """Swarm: the victim was the raft leader."""
    next_start: float = 0.0
    note: str = ""
    restore_s: float | None = None


@dataclass
class Phase:
    system: str
    faults: list[Fault] = field(default_factory=list)
    ops: list[OpRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    ready_s: float | None = None
    error: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    partition_s: float = 0.0


# --- the machines --------------------------------------------------------------------------


def spread_names(n: int) -> list[str]:
    """``n`` atSign names whose first-ranked node (the supervisor's rendezvous hash) is spread
    evenly over the nodes, as Swarm's scheduler spreads its tasks: the same shape for both."""
    from supervisor.placement import AtSignPolicy, NodeRef, standby_order

    refs = [NodeRef(name, "c1") for name in NODES]
    per_node = {name: 0 for name in NODES}
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"@swcmp{i:02d}"
        first = standby_order(AtSignPolicy(name), refs)[0].name
        if per_node[first] < -(-n // len(NODES)):
            per_node[first] += 1
            out.append(name)
        i += 1
    return out


class Rig:
    """Namespaces, engines (image loaded), etcd, Consul, certificates, keys."""

    def __init__(self, base: Path, atsigns: int, run_id: str) -> None:
        self.base = base
        self.lab = Lab(f"afs{run_id}", NODES)
        self.hosts = [
            NodeHost(self.lab, n, base / n.name, f"afs{run_id}-{n.name}") for n in self.lab.nodes
        ]
        self.engines = [Engine(h) for h in self.hosts]
        self.atsigns: list[AtSignKeys] = []
        self.n_atsigns = atsigns
        self.etcd: EtcdCluster | None = None
        self.consul: ConsulAgent | None = None
        self.ca = TestCA(base / "ca")
        self.tls_dir = base / "tls"
        self.procs: list[ManagedProcess] = []

    def engine(self, node: str) -> Engine:
        return next(e for e in self.engines if e.host.name == node)

    def host(self, node: str) -> NodeHost:
        return next(h for h in self.hosts if h.name == node)

    def setup(self) -> dict[str, float]:
        times: dict[str, float] = {}
        t0 = time.monotonic()
        self.lab.create()
        for h in self.hosts:
            h.cgroup.create()
        for e in self.engines:
            e.start(60)
        times["engines_s"] = round(time.monotonic() - t0, 2)
        from atserver_runner.devserver import image

        t0 = time.monotonic()
        for e in self.engines:
            client = e.client(180)
            try:
                image.build(client, IMAGE)
            finally:
                client.close()
        times["image_s"] = round(time.monotonic() - t0, 2)
        host_ip = self.lab.cluster_host_ip
        self.etcd = EtcdCluster(self.base / "etcd", size=3, name="etcd", host=host_ip)
        self.etcd.start(60)
        self.consul = ConsulAgent(self.base / "consul", host=host_ip)
        self.consul.start(60)
        cert = self.ca.issue(
            "atserver", [n.client_ip for n in self.lab.nodes] + ["127.0.0.1", "localhost"]
        )
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        for src, name in ((cert.cert, "cert.pem"), (cert.key, "key.pem")):
            shutil.copy(src, self.tls_dir / name)
            os.chown(self.tls_dir / name, 10001, 10001)
            (self.tls_dir / name).chmod(0o400)
        os.chown(self.tls_dir, 10001, 10001)
        self.cert = cert
        self.atsigns = make_atsign_keys(self.base / "keys", spread_names(self.n_atsigns))
        return times

    def data_root(self, system: str) -> Path:
        """A fresh data root per system, shared by every node (the same layout)."""
        root = self.base / "data" / system
        for a in self.atsigns:
            d = atsign_dir(root, a.atsign)
            d.mkdir(parents=True, exist_ok=True)
            (d / PKAM_FILE).write_text(a.public_key.read_text())
            (d / PKAM_FILE).chmod(0o644)
            os.chown(d, 10001, 10001)
        return root

    def remove_containers(self) -> None:
        for e in self.engines:
            if not e.running():
                continue
            ids = e.cli("ps", "-aq", check=False, timeout=30).split()
            if ids:
                e.cli("rm", "-f", *ids, check=False, timeout=60)

    def teardown(self) -> list[str]:
        problems: list[str] = []
        for p in self.procs:
            p.stop(10)
        with contextlib.suppress(Exception):
            self.remove_containers()
        for e in self.engines:
            with contextlib.suppress(Exception):
                e.stop(30)
        for h in self.hosts:
            h.kill_all()
            problems += h.cgroup.remove()
        if self.consul is not None:
            self.consul.stop()
        if self.etcd is not None:
            self.etcd.stop()
        problems += self.lab.destroy()
        return problems


# --- the systems under test ----------------------------------------------------------------


class System:
    """What a benchmark phase needs from the system that places the atServers."""

    name = ""

    def __init__(self, rig: Rig, base_port: int) -> None:
        self.rig = rig
        self.base_port = base_port

    @property
    def ports(self) -> list[int]:
        return list(range(self.base_port, self.base_port + 2 * len(self.rig.atsigns)))

    def start(self, data_root: Path) -> None:
        raise NotImplementedError

    def container_filter(self, atsign: str) -> str:
        raise NotImplementedError

    def leader(self) -> bool | None:
        return None

    def restart_node(self, node: str) -> None:
        raise NotImplementedError

    def nodes_ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Ours(System):
    name = "ours"

    def __init__(self, rig: Rig, base_port: int) -> None:
        super().__init__(rig, base_port)
        self.sup: dict[str, ManagedProcess] = {}
        self.http: dict[str, int] = {}
        self.cfg: dict[str, Path] = {}

    def config(self, node: str, data_root: Path) -> dict[str, Any]:
        rig = self.rig
        assert rig.etcd is not None and rig.consul is not None
        lab_node = rig.lab.node(node)
        state = rig.base / "ours" / node
        return {
            "node": {"name": node, "cloud": "c1", "zone": "c1-z1", "address": lab_node.client_ip},
            "dcs": {"backend": "etcd", "prefix": f"swcmp-{os.getpid()}",
                    "etcd": {"endpoints": rig.etcd.endpoints}},
            "timing": {"ttl": TTL_S, "probe_interval": 1.0},
            "consul": {"url": rig.consul.url, "service_name": "atserver",
                       "deregister_critical_after": "1m"},
            "runner": {
                "kind": "docker",
                "image": IMAGE,
                "docker_url": rig.engine(node).url,
                "command": ["--pkam-public-key-file", f"/data/{PKAM_FILE}", "--log-json"],
                "port_range": [self.ports[0], self.ports[-1]],
                "data_root": str(data_root),
                "state_dir": str(state),
                "tls": {"ca": str(rig.ca.cert_path), "cert": str(rig.cert.cert),
                        "key": str(rig.cert.key)},
                "stop_timeout": 3.0,
            },
            "storage": {"kind": "local"},
            "http": {"listen": f"{lab_node.client_ip}:{self.http[node]}",
                     "allow_unauthenticated": True},
            # rank_delay: the first-ranked node wins at start even if it starts seconds after
            # the others (the same spread as Swarm); takeovers are made by the rank-0 standby
            "placement": {"rank_delay": 2.0},
            "inventory": {
                "nodes": [{"name": n, "cloud": "c1"} for n in NODES],
                "atsigns": [{"atsign": a.atsign} for a in rig.atsigns],
            },
        }  # fmt: skip

    def start(self, data_root: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SSL_CERT_FILE", None)
        for node in NODES:
            self.http[node] = 18080
            doc = self.config(node, data_root)
            Path(doc["runner"]["state_dir"]).mkdir(parents=True, exist_ok=True)
            path = self.rig.base / "ours" / f"{node}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            self.cfg[node] = path
            self._start_supervisor(node, env)

    def _start_supervisor(self, node: str, env: dict[str, str] | None = None) -> None:
        if env is None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("SSL_CERT_FILE", None)
        argv = [sys.executable, "-m", "supervisor.cli", "run", "--config", str(self.cfg[node])]
        proc = self.rig.host(node).spawn("supervisor", argv, env={**env, "PYTHONPATH": str(REPO)})
        proc.cwd = REPO
        proc.start()
        self.sup[node] = proc

    def status(self, node: str) -> dict[str, Any] | None:
        url = f"http://{self.rig.lab.node(node).client_ip}:{self.http[node]}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (OSError, ValueError):
            return None

    def nodes_ready(self) -> bool:
        for node in NODES:
            st = self.status(node)
            if st is None or not st.get("ready"):
                return False
        return True

    def container_filter(self, atsign: str) -> str:
        return f"label=atfailover.atsign={atsign}"

    def restart_node(self, node: str) -> None:
        self.rig.engine(node).start(60)
        self._start_supervisor(node)

    def stop(self) -> None:
        for proc in self.sup.values():
            proc.stop(20)
        self.rig.remove_containers()


class SwarmSystem(System):
    def __init__(self, rig: Rig, base_port: int, name: str) -> None:
        super().__init__(rig, base_port)
        self.name = name
        self.settings = SETTINGS[name]
        self.swarm = Swarm(rig.engines)

    def service(self, i: int) -> str:
        return f"at-{i:02d}"

    def start(self, data_root: Path) -> None:
        self.swarm.init(self.settings)
        end = time.monotonic() + 60
        while not self.swarm.all_ready():
            if time.monotonic() > end:
                raise SwarmError(f"swarm not ready: {self.swarm.nodes()}")
            time.sleep(0.5)
        manager = self.rig.engines[0]
        for i, a in enumerate(self.rig.atsigns):
            manager.cli(
                "service", "create", "--detach", "--name", self.service(i),
                "--replicas", "1", "--no-resolve-image", "--init",
                "--publish",
                f"mode=host,published={self.base_port + i},target={CONTAINER_PORT},protocol=tcp",
                "--mount", f"type=bind,source={atsign_dir(data_root, a.atsign)},target=/data",
                "--mount", f"type=bind,source={self.rig.tls_dir},target=/run/atserver-tls,readonly",
                "--label", f"atsign={a.atsign}",
                "--container-label", f"atsign={a.atsign}",
                "--env", f"ATSERVER_ATSIGN={a.atsign}",
                "--env", "ATSERVER_FENCING_TOKEN=1",
                "--env", f"ATSERVER_PORT={CONTAINER_PORT}",
                "--env", "ATSERVER_HOST=0.0.0.0",
                "--env", "ATSERVER_DATA_DIR=/data",
                "--env", "ATSERVER_CERT=/run/atserver-tls/cert.pem",
                "--env", "ATSERVER_KEY=/run/atserver-tls/key.pem",
                *self.settings.service_args(),
                IMAGE, "--pkam-public-key-file", f"/data/{PKAM_FILE}", "--log-json",
            )  # fmt: skip

    def container_filter(self, atsign: str) -> str:
        return f"label=atsign={atsign}"

    def leader(self) -> bool | None:
        return None

    def leader_name(self) -> str | None:
        try:
            return self.swarm.leader()
        except SwarmError:
            return None

    def restart_node(self, node: str) -> None:
        self.rig.engine(node).start(60)

    def nodes_ready(self) -> bool:
        return self.swarm.all_ready()

    def stop(self) -> None:
        with contextlib.suppress(SwarmError):
            manager = self.swarm.any_manager()
            for i in range(len(self.rig.atsigns)):
                manager.cli("service", "rm", self.service(i), check=False, timeout=30)
        self.swarm.leave_all()
        self.rig.remove_containers()


# --- the workload --------------------------------------------------------------------------


class Writers:
    """One writer per atSign; see the module docstring."""

    def __init__(self, atsigns: Sequence[AtSignKeys], observer: CopyObserver, ca: Path) -> None:
        self.atsigns = list(atsigns)
        self.observer = observer
        self.ssl = client_ssl_context(ca)
        self.ops: list[OpRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for a in self.atsigns:
            self._tasks.append(asyncio.create_task(self._loop(a)))

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=4 * OP_TIMEOUT_S + 5)
        for t in self._tasks:
            t.cancel()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), WRITE_INTERVAL_S)

    async def _loop(self, keys: AtSignKeys) -> None:
        private = keys.load_private()
        conns: dict[tuple[str, int], AtConnection] = {}
        seq = 0
        turn = 0
        try:
            while not self._stop.is_set():
                copies = self.observer.view(keys.atsign)
                t0 = time.time()
                if not copies:
                    self.ops.append(OpRecord(keys.atsign, "connect", "", "", t0, t0, False,
                                             error="no copy answers"))  # fmt: skip
                    await self._pause()
                    continue
                node, host, port = copies[turn % len(copies)]
                turn += 1
                seq += 1
                key = f"public:k{seq:06d}.swcmp{keys.atsign}"
                value = f"v{seq}-{int(t0 * 1000)}"
                conn = conns.get((host, port))
                if conn is None:
                    conn = AtConnection(keys.atsign, private, self.ssl, OP_TIMEOUT_S)
                    conns[(host, port)] = conn
                try:
                    if conn.address is None:
                        await conn.connect(host, port)
                    await conn.update(key, value)
                    ok, err = True, ""
                except AtError as exc:
                    ok, err = False, str(exc)[:200]
                    await conn.close()
                self.ops.append(
                    OpRecord(keys.atsign, "write", key, value, t0, time.time(), ok, node, None, err)
                )
                await self._pause()
        finally:
            for c in conns.values():
                await c.close()

    async def read_back(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Every acknowledged write, read from the single copy each atSign has now."""
        lost: list[dict[str, Any]] = []
        unreadable: dict[str, str] = {}
        end = time.monotonic() + timeout
        for keys in self.atsigns:
            pending = [o for o in self.ops if o.atsign == keys.atsign and o.ok]
            conn = AtConnection(keys.atsign, keys.load_private(), self.ssl, OP_TIMEOUT_S)
            last = ""
            try:
                while pending and time.monotonic() < end:
                    try:
                        if conn.address is None:
                            copies = self.observer.view(keys.atsign, max_age=2.0)
                            if len(copies) != 1:
                                raise AtError(f"{len(copies)} copies answer")
                            await conn.connect(copies[0][1], copies[0][2])
                        rec = pending[0]
                        try:
                            seen: str | None = await conn.llookup(rec.key)
                        except AtError as exc:
                            if "AT0015" not in str(exc) and "does not exist" not in str(exc):
                                raise
                            seen = None
                        if seen != rec.value:
                            lost.append({"atsign": rec.atsign, "key": rec.key, "start": rec.start,
                                         "server": rec.server, "read": seen})  # fmt: skip
                        pending.pop(0)
                    except AtError as exc:
                        last = str(exc)[:200]
                        await conn.close()
                        await asyncio.sleep(0.5)
            finally:
                await conn.close()
            if pending:
                unreadable[keys.atsign] = f"{len(pending)} not read back: {last}"
        return lost, unreadable


# --- one system's run ----------------------------------------------------------------------


def _server_pids(engine: Engine, flt: str) -> list[int]:
    """The atServer process(es) of the container matching ``flt`` (not its init)."""
    ids = engine.cli("ps", "-q", "--filter", flt, timeout=15).split()
    out: list[int] = []
    for cid in ids:
        pid = int(engine.cli("inspect", "--format", "{{.State.Pid}}", cid, timeout=15).strip())
        if pid <= 0:
            continue
        proc = psutil.Process(pid)
        kids = proc.children(recursive=True)
        out += [k.pid for k in kids] if kids else [pid]
    return out


async def _wait(pred: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll the (cheap, synchronous) ``pred`` until true or ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(interval)
    return False


class PhaseRunner:
    def __init__(self, rig: Rig, system: System, args: argparse.Namespace, deadline: Deadline):
        self.rig = rig
        self.system = system
        self.args = args
        self.deadline = deadline
        self.names = [a.atsign for a in rig.atsigns]
        targets = [(n.name, n.client_ip, p) for n in rig.lab.nodes for p in system.ports]
        self.observer = CopyObserver(
            targets, client_ssl_context(rig.ca.cert_path), interval=OBSERVE_INTERVAL_S
        )
        self.phase = Phase(system.name)
        self.node_faults = 0
        self.phase.partition_s = args.partition_s[system.name]
        if isinstance(system, SwarmSystem):
            self.phase.settings = asdict(system.settings)

    def one_copy_each(self) -> bool:
        return all(c == 1 for c in self.observer.copies(self.names).values())

    async def steady(self, timeout: float, hold: float = 2.0) -> bool:
        """Every atSign exactly one copy for ``hold`` seconds and every node ready."""
        end = time.monotonic() + timeout
        since: float | None = None
        while time.monotonic() < end:
            if self.one_copy_each():
                since = since or time.monotonic()
                if time.monotonic() - since >= hold:
                    with contextlib.suppress(Exception):
                        if await asyncio.to_thread(self.system.nodes_ready):
                            return True
            else:
                since = None
            await asyncio.sleep(0.2)
        return False

    def owners(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a in self.names:
            for node, _, _ in self.observer.view(a):
                out.setdefault(node, []).append(a)
        return out

    async def run(self) -> Phase:
        phase = self.phase
        self.observer.start()
        writers = Writers(self.rig.atsigns, self.observer, self.rig.ca.cert_path)
        try:
            t0 = time.monotonic()
            data_root = self.rig.data_root(self.system.name)
            await asyncio.to_thread(self.system.start, data_root)
            if not await self.steady(120):
                raise RuntimeError(f"{self.system.name}: not one copy each after 120 s: "
                                   f"{self.observer.copies(self.names)}")  # fmt: skip
            phase.ready_s = round(time.monotonic() - t0, 2)
            print(f"[{self.system.name}] ready in {phase.ready_s} s: {self.owners()}", flush=True)
            writers.start()
            await asyncio.sleep(2)
            k = 0
            for rep in range(self.args.reps):
                for kind in self.args.faults:
                    if self.deadline.left() < self.args.reserve_s:
                        phase.error = f"deadline: stopped before rep {rep} {kind}"
                        break
                    fault = await self.inject(kind, k)
                    k += 1
                    if fault is not None:
                        phase.faults.append(fault)
                        print(f"[{self.system.name}] {rep} {kind} {fault.victim} "
                              f"affected={fault.affected} {fault.note}", flush=True)  # fmt: skip
                    if not await self.steady(self.args.fault_timeout):
                        note = f"not steady {self.args.fault_timeout} s after the fault"
                        if fault is not None:
                            fault.note += note
                        print(f"[{self.system.name}] {note}: {self.observer.copies(self.names)}")
                else:
                    continue
                break
            await asyncio.sleep(2)
            await writers.stop()
            phase.lost, phase.unreadable = await writers.read_back(self.args.readback_timeout)
        except Exception as exc:
            phase.error = (phase.error + "; " if phase.error else "") + repr(exc)[:500]
            print(f"[{self.system.name}] error: {exc!r}", flush=True)
            await writers.stop()
        finally:
            phase.ops = writers.ops
            await self.observer.stop()
            phase.samples = self.observer.samples
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.system.stop)
        now = time.time()
        for a, b in zip(phase.faults, [*phase.faults[1:], None], strict=True):
            a.next_start = b.start if b is not None else now
        return phase

    async def inject(self, kind: str, k: int) -> Fault | None:
        owners = self.owners()
        if kind == "crash":
            atsign = self.names[k % len(self.names)]
            view = self.observer.view(atsign)
            if len(view) != 1:
                return None
            node = view[0][0]
            engine = self.rig.engine(node)
            pids = await asyncio.to_thread(
                _server_pids, engine, self.system.container_filter(atsign)
            )
            t = time.time()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return Fault(self.system.name, kind, node, t, t, [atsign], note=f"pids {pids}")
        # node faults: rotate over nodes that serve something
        self.node_faults += 1
        order = [NODES[(self.node_faults + i) % len(NODES)] for i in range(len(NODES))]
        victim = next((n for n in order if owners.get(n)), order[0])
        leader: bool | None = None
        if isinstance(self.system, SwarmSystem):
            name = await asyncio.to_thread(self.system.leader_name)
            leader = name == victim
        affected = sorted(owners.get(victim, []))
        if kind == "node-loss":
            t = time.time()
            await asyncio.to_thread(self.rig.host(victim).kill_all)
            await _wait(lambda: all(
                any(n != victim for n, _, _ in self.observer.view(a)) for a in affected
            ), self.args.fault_timeout)  # fmt: skip
            await asyncio.sleep(1)
            r0 = time.monotonic()
            await asyncio.to_thread(self.system.restart_node, victim)
            fault = Fault(self.system.name, kind, victim, t, time.time(), affected, leader)
            fault.restore_s = round(time.monotonic() - r0, 2)
            return fault
        t = await asyncio.to_thread(self.rig.lab.cut, victim)
        await asyncio.sleep(self.phase.partition_s)
        healed = await asyncio.to_thread(self.rig.lab.heal, victim)
        return Fault(self.system.name, kind, victim, t, healed, affected, leader)


# --- analysis ------------------------------------------------------------------------------


def fault_rows(phase: Phase) -> list[dict[str, Any]]:
    """Per fault and affected atSign: served_s, no-answer seconds, double owners, back to one
    copy after the heal, lost writes."""
    intervals: list[Interval] = answer_intervals(phase.samples, MAX_GAP_S)
    dbl: list[Overlap] = overlaps(intervals)
    rows: list[dict[str, Any]] = []
    for f in phase.faults:
        for a in f.affected:
            served = next(
                (
                    o.end - f.start
                    for o in sorted(phase.ops, key=lambda o: o.start)
                    if o.atsign == a and o.ok and o.op == "write" and o.start >= f.start
                    and o.start < f.next_start and (f.kind == "crash" or o.server != f.victim)
                ),
                None,
            )  # fmt: skip
            window_end = f.start + served if served is not None else f.next_start
            no_answer = (window_end - f.start) - covered(intervals, a, f.start, window_end)
            mine = [o for o in dbl if o.atsign == a and f.start <= o.end and o.start < f.next_start]
            after_heal = [o for o in mine if o.end > f.healed]
            back = max((o.end - f.healed for o in after_heal), default=0.0)
            lost = [
                x for x in phase.lost if x["atsign"] == a and f.start <= x["start"] < f.next_start
            ]
            acked = [o for o in phase.ops if o.atsign == a and o.ok
                     and f.start <= o.start < f.next_start]  # fmt: skip
            rows.append({
                "kind": f.kind, "victim": f.victim, "atsign": a, "leader": f.leader,
                "served_s": None if served is None else round(served, 3),
                "no_answer_s": round(max(0.0, no_answer), 3),
                "double_owner_s": round(sum(o.duration for o in mine), 3),
                "double_owner_intervals": [(round(o.start - f.start, 2), round(o.end - f.start, 2),
                                            list(o.nodes)) for o in mine],
                "back_to_one_after_heal_s": round(back, 3) if f.kind == "partition" else None,
                "acked": len(acked), "lost": len(lost),
            })  # fmt: skip
    return rows


def aggregate(rows: list[dict[str, Any]], faults: list[Fault]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in FAULTS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        served = [r["served_s"] for r in mine if r["served_s"] is not None]
        entry: dict[str, Any] = {
            "faults": sum(1 for f in faults if f.kind == kind),
            "atsign_samples": len(mine),
            "not_served": sum(1 for r in mine if r["served_s"] is None),
            "served_s": summary(served),
            "no_answer_s": summary([r["no_answer_s"] for r in mine]),
            "double_owner": {
                "samples_with": sum(1 for r in mine if r["double_owner_s"] > 0),
                "total_s": round(sum(r["double_owner_s"] for r in mine), 3),
                "per_sample_s": summary([r["double_owner_s"] for r in mine]),
            },
            "acked": sum(r["acked"] for r in mine),
            "lost": sum(r["lost"] for r in mine),
        }
        if kind == "partition":
            entry["back_to_one_after_heal_s"] = summary(
                [r["back_to_one_after_heal_s"] for r in mine]
            )
        if any(r["leader"] is not None for r in mine):
            for flag, label in ((True, "victim_leader"), (False, "victim_not_leader")):
                sub = [
                    r["served_s"] for r in mine if r["leader"] is flag and r["served_s"] is not None
                ]
                entry[label] = {"served_s": summary(sub),
                                "samples": sum(1 for r in mine if r["leader"] is flag)}  # fmt: skip
        out[kind] = entry
    return out


def comparison(systems: dict[str, Any]) -> list[dict[str, Any]]:
    """Per fault: p50/p99 of served_s per system and Swarm's over ours."""
    table = []
    ours = systems.get("ours", {}).get("by_fault", {})
    for kind in FAULTS:
        row: dict[str, Any] = {"fault": kind}
        for name, data in systems.items():
            agg = data.get("by_fault", {}).get(kind)
            if agg is None:
                continue
            row[name] = {
                "served_p50": agg["served_s"]["p50"], "served_p99": agg["served_s"]["p99"],
                "double_owner_total_s": agg["double_owner"]["total_s"],
                "double_owner_samples": agg["double_owner"]["samples_with"],
                "lost": agg["lost"], "acked": agg["acked"], "not_served": agg["not_served"],
                "back_to_one_p50": agg.get("back_to_one_after_heal_s", {}).get("p50"),
                "back_to_one_p99": agg.get("back_to_one_after_heal_s", {}).get("p99"),
            }  # fmt: skip
            if name != "ours" and kind in ours:
                row[name]["ratio_p50_vs_ours"] = ratio(
                    agg["served_s"]["p50"], ours[kind]["served_s"]["p50"]
                )
                row[name]["ratio_p99_vs_ours"] = ratio(
                    agg["served_s"]["p99"], ours[kind]["served_s"]["p99"]
                )
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| Fault | System | served p50 / p99 (s) | Swarm / ours (p50, p99) | double owners "
        "(samples, total s) | back to one copy after heal p50 / p99 (s) | lost / acked writes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        for name in SYSTEMS:
            r = row.get(name)
            if r is None:
                continue
            rat = (
                f"{r.get('ratio_p50_vs_ours')}, {r.get('ratio_p99_vs_ours')}"
                if name != "ours" else "-"
            )  # fmt: skip
            back = (
                f"{r['back_to_one_p50']} / {r['back_to_one_p99']}"
                if r["back_to_one_p50"] is not None else "-"
            )  # fmt: skip
            ns = f" ({r['not_served']} not served)" if r["not_served"] else ""
            lines.append(
                f"| {row['fault']} | {name} | {r['served_p50']} / {r['served_p99']}{ns} | {rat} | "
                f"{r['double_owner_samples']}, {r['double_owner_total_s']} | {back} | "
                f"{r['lost']} / {r['acked']} |"
            )
    return "\n".join(lines)


def phase_json(phase: Phase) -> dict[str, Any]:
    rows = fault_rows(phase)
    return {
        "system": phase.system,
        "settings": phase.settings,
        "partition_s": phase.partition_s,
        "ready_s": phase.ready_s,
        "error": phase.error,
        "faults": [asdict(f) for f in phase.faults],
        "rows": rows,
        "by_fault": aggregate(rows, phase.faults),
        "writes": {
            "attempted": sum(1 for o in phase.ops if o.op == "write"),
            "acked": sum(1 for o in phase.ops if o.ok),
            "no_copy_seen": sum(1 for o in phase.ops if o.op == "connect"),
            "latency_s": summary([o.end - o.start for o in phase.ops if o.ok]),
            "errors": sorted({o.error[:80] for o in phase.ops if not o.ok})[:20],
        },
        "lost": phase.lost[:200],
        "lost_total": len(phase.lost),
        "unreadable": phase.unreadable,
        "samples": len(phase.samples),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in SYSTEMS if s in result["systems"]]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    width = 0.8 / max(1, len(systems))
    for j, s in enumerate(systems):
        by = result["systems"][s].get("by_fault", {})
        xs = [i + j * width for i in range(len(FAULTS))]
        p50 = [by.get(k, {}).get("served_s", {}).get("p50") or 0 for k in FAULTS]
        p99 = [by.get(k, {}).get("served_s", {}).get("p99") or 0 for k in FAULTS]
        axes[0].bar(xs, p50, width, label=s)
        up = [b - a for a, b in zip(p50, p99, strict=True)]
        axes[0].errorbar(xs, p50, yerr=[[0] * len(p50), up], fmt="none", ecolor="black", capsize=3)
        dbl = [by.get(k, {}).get("double_owner", {}).get("total_s") or 0 for k in FAULTS]
        axes[1].bar(xs, dbl, width, label=s)
        lost = [by.get(k, {}).get("lost") or 0 for k in FAULTS]
        axes[2].bar(xs, lost, width, label=s)
        back = by.get("partition", {}).get("back_to_one_after_heal_s", {})
        b50, b99 = back.get("p50") or 0, back.get("p99") or 0
        axes[3].bar([j], [b50], 0.6, label=s)
        axes[3].errorbar([j], [b50], yerr=[[0], [b99 - b50]], fmt="none", ecolor="black", capsize=3)
    axes[3].set_xticks(list(range(len(systems))), systems, fontsize=8)
    axes[3].set_title("partition: one copy again after the heal (s): p50, bar to p99", fontsize=9)
    for ax, title in zip(
        axes[:3],
        (
            "served again (crash) / elsewhere (s): p50, bar to p99",
            "double-owner time, all samples (s)",
            "acknowledged writes lost",
        ),
        strict=True,
    ):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(FAULTS))], FAULTS)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def dump_raw(phase: Phase, path: Path) -> None:
    """The phase's samples, operations and faults as one gzipped JSON document."""
    import gzip

    doc = {
        "system": phase.system,
        "faults": [asdict(f) for f in phase.faults],
        "samples": [asdict(s) for s in phase.samples],
        "ops": [asdict(o) for o in phase.ops],
    }
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)


async def run_all(args: argparse.Namespace, rig: Rig, deadline: Deadline) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for k, name in enumerate(args.systems):
        if deadline.left() < args.reserve_s:
            systems[name] = {"system": name, "error": "not run: deadline"}
            continue
        base_port = 31000 + 100 * k
        system: System = (
            Ours(rig, base_port) if name == "ours" else SwarmSystem(rig, base_port, name)
        )
        phase = await PhaseRunner(rig, system, args, deadline).run()
        systems[name] = phase_json(phase)
        with contextlib.suppress(OSError):
            dump_raw(phase, args.out / f"swarm_compare_raw_{name}.json.gz")
        print(f"[{name}] {json.dumps(systems[name]['by_fault'])}", flush=True)
    return systems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="repetitions of each fault per system")
    ap.add_argument("--atsigns", type=int, default=6)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    ap.add_argument(
        "--partition-ours-s",
        type=float,
        default=20.0,
        help="partition length for ours (it serves elsewhere after ~10-13 s)",
    )
    ap.add_argument(
        "--partition-default-s",
        type=float,
        default=30.0,
        help="with Swarm's defaults (it serves elsewhere after ~16-21 s)",
    )
    ap.add_argument(
        "--partition-tuned-s",
        type=float,
        default=15.0,
        help="with the tuned Swarm (it serves elsewhere after ~3-7 s)",
    )
    ap.add_argument("--fault-timeout", type=float, default=90.0)
    ap.add_argument("--readback-timeout", type=float, default=120.0)
    ap.add_argument(
        "--reserve-s",
        type=float,
        default=150.0,
        help="stop injecting faults this long before the deadline",
    )
    ap.add_argument("--max-minutes", type=float, default=44.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)  # fmt: skip
    args.partition_s = {
        "ours": args.partition_ours_s,
        "swarm-default": args.partition_default_s,
        "swarm-tuned": args.partition_tuned_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "swarm_compare.json", args.out / "swarm_compare.png"
    if args.replot:
        plot(json.loads(json_path.read_text()), png_path)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, cgroups, dockerd)", file=sys.stderr)
        return 2
    deadline = Deadline(args.max_minutes)
    base = Path(tempfile.mkdtemp(prefix="swcmp-"))
    run_id = f"{os.getpid() % 4096:03x}"
    rig = Rig(base, args.atsigns, run_id)
    started = time.time()
    result: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    print(f"temp dir {base}", flush=True)
    try:
        result["setup"] = rig.setup()
        print(f"setup {result['setup']}", flush=True)
        result["systems"] = asyncio.run(run_all(args, rig, deadline))
    except KeyboardInterrupt as exc:
        result["error"] = f"interrupted: {exc}"
    except Exception as exc:
        result["error"] = repr(exc)[:1000]
        print(f"error: {exc!r}", flush=True)
    finally:
        result["leftovers"] = rig.teardown()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    result["comparison"] = comparison(result.get("systems", {}))
    result["table_md"] = markdown(result["comparison"])
    result["params"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_end": os.getloadavg(),
    }
    result["wall_s"] = round(time.time() - started, 1)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    with contextlib.suppress(Exception):
        plot(result, png_path)
    print(result["table_md"])
    print(f"leftovers: {result['leftovers']}; wrote {json_path} and {png_path}")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
