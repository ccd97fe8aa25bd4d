"""A local multi-node cluster: etcd (3 members) or Consul, a Consul agent, a directory, and
N ``supervisor run`` nodes over two clouds serving M atSigns.

Everything runs as child processes on loopback, each started and stopped by its PID
(:class:`testbed.process.ManagedProcess`, own process group). The nodes share one data
root, so an atSign's data directory (with its fence file) follows the claim from node to
node, as shared storage would in production.

Usage::

    with Cluster(ClusterSpec(base_dir=Path("/tmp/c"), backend="etcd", nodes=3, atsigns=4)) as c:
        c.wait_all_serving(timeout=60)
        c.nodes[0].kill_supervisor()
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from atserver_runner.paths import atsign_component, atsign_dir
from chaos.partition import RelayHost
from supervisor.registration import entry_health, health_entries
from supervisor.storage import CEPH_FSTYPES, mount_of
from testbed.ceph import CephCluster, Mount, managed_fuse, reap_managed_mount
from testbed.consul import ConsulAgent
from testbed.dockerd import DockerEngine, docker_socket_path
from testbed.etcd import EtcdCluster, EtcdMember
from testbed.ports import free_port
from testbed.process import ManagedProcess, pid_alive, wait_until
from testbed.tls import CertPair, TestCA

Backend = Literal["etcd", "consul"]
RunnerKind = Literal["process", "docker"]
DataRoots = Literal["shared", "per-node"]
StorageKind = Literal["local", "cephfs", "cephfs-noevict"]

ETCD_ROLES = ("cloud-a", "cloud-b", "witness")
CLOUDS = ("cloud-a", "cloud-b")
DEFAULT_TTL: dict[str, float] = {"etcd": 6.0, "consul": 10.0}
"""etcd: with 3 members a leader election (1-2 s) must fit in renew_deadline = ttl/2 (the
supervisor's config check); Consul: its minimum session TTL."""
SESSION_CHECK_TIMING: dict[str, float] = {
    "timing.renew_interval": 1.0,
    "timing.renew_deadline": 3.0,
    "timing.stop_budget": 1.5,
    "dcs.consul.lock_delay": 5.0,
    "dcs.consul.session_check_ttl": 2.5,
}
"""Consul sessions bound to health checks (:attr:`ClusterSpec.session_checks`): renew every
second, self-fence after 3 s with 1.5 s to stop, so the lock delay (5 s) outlasts the owner
(renew_deadline + stop_budget < lock_delay); check ttl 2.5 >= 2 x renew_interval."""
PORTS_PER_NODE = 200
DOCKER_IMAGE = "atfailover/devserver:dev"
PKAM_FILE = ".pkam.pub"


class ClusterError(Exception):
    """A part of the cluster did not come up (the message says which and why)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What to start. ``ttl`` defaults per backend (etcd 6 s, Consul 10 s, its minimum)."""

    base_dir: Path
    backend: Backend = "etcd"
    nodes: int = 3
    atsigns: int = 6
    ttl: float | None = None
    runner: RunnerKind = "process"
    image: str | None = None
    consul_lock_delay: float = 1.0
    """Ignored with ``session_checks``: they need :data:`SESSION_CHECK_TIMING`'s."""
    session_checks: bool = False
    """Consul: bind each node's session to its own agent's ``serfHealth`` and a TTL check
    (``dcs.consul.session_check_ttl``, timing of :data:`SESSION_CHECK_TIMING`). The node's
    DCS traffic then goes to its own agent (through its relay, so a partition cuts the
    supervisor off its agent, whose session check then lapses)."""
    prefix: str = "chaos"
    start_timeout: float = 90.0
    dcs_relays: bool = False
    """Route each node's DCS traffic through harness relays, so it can be partitioned."""
    data_roots: DataRoots = "shared"
    """``shared``: one data root for every node (the data follows the claim); ``per-node``:
    each node its own, as machines with local disks have (the data guard then refuses a
    takeover instead of serving an empty or stale copy). Ignored on CephFS."""
    storage: StorageKind = "local"
    """``cephfs``: every node mounts CephFS itself (its own ceph-fuse, managed by its
    supervisor, its own cephx key) at its own data root; the old owner is fenced at the
    storage layer on a takeover. ``local``: directories on this machine.
    ``cephfs-noevict`` (for bench/storage_bench.py, not offered by the CLI): the same CephFS
    and one ceph-fuse per node (mounted by the harness), but the supervisors are told
    ``kind: shared``: readiness only, no eviction, what a takeover costs without the fence."""
    ceph: Any = None
    """A running :class:`testbed.ceph.CephCluster` to use (a test session's); ``None``
    starts one for this cluster when ``storage`` is not ``local``."""

    def __post_init__(self) -> None:
        if self.session_checks and self.backend != "consul":
            raise ValueError(f"session_checks are a Consul setting, not one of {self.backend}")

    @property
    def effective_ttl(self) -> float:
        return self.ttl if self.ttl is not None else DEFAULT_TTL[self.backend]

    @property
    def effective_lock_delay(self) -> float:
        """Consul's lock delay on the nodes' sessions."""
        if self.session_checks:
            return SESSION_CHECK_TIMING["dcs.consul.lock_delay"]
        return self.consul_lock_delay


@dataclass(frozen=True)
class AtSignKeys:
    """An atSign and its PKAM key pair (private key PEM file, public key base64 DER file)."""

    atsign: str
    private_key: Path
    public_key: Path

    def load_private(self) -> rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.private_key.read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key


def make_atsign_keys(keys_dir: Path, atsigns: Sequence[str]) -> list[AtSignKeys]:
    """A PKAM key pair per atSign in ``keys_dir`` (``<name>.pem``, ``<name>.pub``: what the
    dev atServer's ``--pkam-public-key-file`` reads), kept when it exists already."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for atsign in atsigns:
        name = atsign_component(atsign)
        priv_path = keys_dir / f"{name}.pem"
        pub_path = keys_dir / f"{name}.pub"
        if not priv_path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            priv_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            priv_path.chmod(0o600)
            der = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            pub_path.write_text(base64.b64encode(der).decode())
        out.append(AtSignKeys(atsign, priv_path, pub_path))
    return out


def _kill_pid(pid: int, create_time: float | None, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid``'s group (it leads its own) if it is still the process we mean."""
    if not pid_alive(pid, create_time):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    return True


@dataclass
class Node:
    """One ``supervisor run`` process with its fence and workloads."""

    name: str
    cloud: str
    config_path: Path
    state_dir: Path
    http_port: int
    process: ManagedProcess
    port_range: tuple[int, int] = (0, 0)
    docker: bool = False
    """Workloads are containers labelled ``atfailover.node=<name>`` (else processes)."""
    agent: ConsulAgent | None = None
    """The node's own Consul client agent (its registrations and node check live there)."""
    mount: Mount | None = None
    """``cephfs-noevict``: the node's ceph-fuse mount, made by the harness (mounted again by
    :meth:`start` when its ceph-fuse is gone)."""
    frozen: bool = False

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def workload_dir(self) -> Path:
        return self.state_dir / "workloads"

    @property
    def workload_logs(self) -> Path:
        return self.workload_dir / "logs"

    @property
    def fence_log(self) -> Path:
        return self.state_dir / "fence.log"

    def running(self) -> bool:
        return self.process.running()

    def start(self) -> None:
        self.frozen = False
        if self.agent is not None and not (self.agent.process and self.agent.process.running()):
            self.agent.start()
        if self.mount is not None and self.fuse_pid() is None:
            self.mount.remount()
        self.process.start()

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The node's ``/status`` JSON, or ``None`` when it does not answer."""
        try:
            with urllib.request.urlopen(self.api + "/status", timeout=timeout) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (OSError, ValueError):
            return None

    def fence_pid(self) -> tuple[int, float | None] | None:
        try:
            pid = int((self.state_dir / "fence.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            # The pid file outlives the fence: make sure the PID was not recycled.
            if str(self.config_path.resolve()) not in proc.cmdline():
                return None
            return pid, proc.create_time()
        except psutil.Error:
            return None

    def containers(self) -> list[Any]:
        """This node's containers (running or not), found by label."""
        import docker

        client = docker.from_env()
        try:
            return list(
                client.containers.list(
                    all=True,
                    filters={"label": f"atfailover.node={self.name}"},
                    ignore_removed=True,
                )
            )
        finally:
            client.close()

    def _kill_containers(self, atsign: str | None = None, remove: bool = False) -> list[str]:
        """SIGKILL (and optionally remove) this node's containers; returns their atSigns."""
        import docker.errors

        killed = []
        for c in self.containers():
            owner = c.labels.get("atfailover.atsign", "")
            if atsign is not None and owner != atsign:
                continue
            with contextlib.suppress(docker.errors.APIError):
                if c.status == "running":
                    c.kill()
                    killed.append(owner)
                if remove:
                    c.remove(force=True)
        return killed

    def workload_pids(self) -> dict[str, tuple[int, float]]:
        """atSign -> (pid, create_time) from the process runner's pid files (running only)."""
        out: dict[str, tuple[int, float]] = {}
        for path in sorted(self.workload_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                pid, ct = int(rec["pid"]), float(rec["create_time"])
                ticks = int(rec.get("start_ticks") or 0)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid_alive(pid, ct, ticks=ticks):
                out[str(rec["atsign"])] = (pid, ct)
        return out

    # --- faults (each returns the wall time at which it was complete) ----------------------

    def kill_supervisor(self) -> float:
        """SIGKILL the supervisor's process group (the fence, in its own session, survives)."""
        self.process.kill()
        return time.time()

    def fuse_pid(self) -> tuple[int, float] | None:
        """(pid, create time) of this node's ceph-fuse (its supervisor's, or the harness's
        :attr:`mount`), if it runs."""
        if self.mount is None:
            return managed_fuse(self.state_dir)
        proc = self.mount.process
        if proc is None or not proc.running():
            return None
        with contextlib.suppress(psutil.Error):
            return proc.pid, psutil.Process(proc.pid).create_time()
        return None

    def kill_node(self) -> float:
        """SIGKILL the supervisor, its fence, every workload, its ceph-fuse and its Consul
        agent (a host crash)."""
        fence = self.fence_pid()
        workloads = self.workload_pids()
        fuse = self.fuse_pid()
        self.process.kill()
        if fence is not None:
            _kill_pid(*fence)
        for pid, ct in workloads.values():
            _kill_pid(pid, ct)
        if fuse is not None:
            _kill_pid(*fuse)
        if self.agent is not None and self.agent.process is not None:
            self.agent.process.kill()
        if self.docker:
            self._kill_containers()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            pid_alive(pid, ct) for pid, ct in workloads.values()
        ):
            time.sleep(0.02)
        return time.time()

    def freeze(self) -> float:
        """SIGSTOP the supervisor (the fence and the workloads keep running)."""
        self.process.freeze()
        self.frozen = True
        return time.time()

    def thaw(self) -> float:
        self.process.thaw()
        self.frozen = False
        return time.time()

    def _whole(self) -> list[tuple[int, float | None]]:
        parts: list[tuple[int, float | None]] = []
        fence = self.fence_pid()
        if fence is not None:
            parts.append(fence)
        parts += list(self.workload_pids().values())
        fuse = self.fuse_pid()
        if fuse is not None:
            parts.append(fuse)
        return parts

    def freeze_node(self) -> float:
        """SIGSTOP the whole node: supervisor, fence, workloads, its ceph-fuse and its Consul
        agent (a host that hangs, or is cut off, and may come back)."""
        self._frozen_whole = self._whole()
        if self.agent is not None and self.agent.process is not None:
            self.agent.freeze()
        self.process.freeze()
        for pid, ct in self._frozen_whole:
            _kill_pid(pid, ct, signal.SIGSTOP)
        self.frozen = True
        return time.time()

    def thaw_node(self) -> float:
        for pid, ct in getattr(self, "_frozen_whole", []):
            _kill_pid(pid, ct, signal.SIGCONT)
        if self.agent is not None and self.agent.process is not None:
            self.agent.thaw()
        self.process.thaw()
        self.frozen = False
        return time.time()

    def crash_workload(self, atsign: str) -> float | None:
        """SIGKILL one workload of this node; ``None`` if it does not run here."""
        if self.docker:
            return time.time() if self._kill_containers(atsign) else None
        rec = self.workload_pids().get(atsign)
        if rec is None:
            return None
        _kill_pid(*rec)
        return time.time()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the supervisor (it stops its workloads), then reap whatever is left."""
        if self.frozen:
            self.thaw()
        self.process.stop(timeout=timeout)
        self.reap()

    def reap(self) -> None:
        """Kill this node's fence, workloads and ceph-fuse if anything survived (by recorded
        PID), and take its mount away (by path)."""
        fence = self.fence_pid()
        if fence is not None:
            _kill_pid(*fence)
        for pid, ct in self.workload_pids().values():
            _kill_pid(pid, ct)
        if self.docker:
            self._kill_containers(remove=True)
        if self.mount is not None:
            self.mount.unmount()
        reap_managed_mount(self.state_dir, self.state_dir / "data")

    def leftover_workloads(self, containers: bool = True) -> list[str]:
        """This node's workloads still alive (pid files, and containers if ``containers``),
        its ceph-fuse and its mount."""
        out = [f"workload {a} pid {p}" for a, (p, _) in self.workload_pids().items()]
        fuse = self.fuse_pid()
        if fuse is not None:
            out.append(f"ceph-fuse pid {fuse[0]}")
        mount = self.state_dir / "data"
        found = mount_of(mount)
        if found is not None and found[0] == os.path.realpath(mount):
            out.append(f"mount {mount}")
        if self.docker and containers:
            out += [f"container {c.name}" for c in self.containers()]
        return out


class Cluster:
    """The local cluster of :class:`ClusterSpec`; a context manager that stops everything."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.base = spec.base_dir.resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.ttl = spec.effective_ttl
        self.ca = TestCA(self.base / "ca")
        self.cert: CertPair = self.ca.issue("localhost", ("127.0.0.1", "localhost"))
        self.data_root = self.base / "data"
        self.keys_dir = self.base / "keys"
        self.atsigns: list[AtSignKeys] = []
        self.etcd: EtcdCluster | None = None
        # A persistent single server: a restart keeps KV, sessions and the index, as a real
        # Consul server does (a -dev agent would wipe the Consul DCS on restart).
        self.consul = ConsulAgent(self.base / "consul", name="consul", persistent=True)
        self.directory_port = free_port()
        self.directory_metrics_port = free_port()
        self.directory: ManagedProcess | None = None
        self.nodes: list[Node] = []
        self.relays: RelayHost | None = None
        # The engine the Docker runner uses: the running one, or dockerd started (and later
        # stopped) by this cluster, as the test harness does (no systemd here).
        self.docker_engine = DockerEngine(self.base / "docker", docker_socket_path())
        self.ceph = spec.ceph
        self._own_ceph: Any = None
        self._containers_left: list[str] | None = None
        """Containers found just before this cluster stopped the engine it had started."""
        self._node_dcs: dict[str, list[int]] = {}
        self._agents: dict[str, ConsulAgent] = {}
        self.prefix = f"{spec.prefix}-{os.getpid()}-{int(time.time())}"

    # --- set-up ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def consul_url(self) -> str:
        return self.consul.url

    @property
    def consul_ui(self) -> str:
        return f"{self.consul.url}/ui/"

    @property
    def directory_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.directory_port)

    def etcd_role(self, member: EtcdMember) -> str:
        assert self.etcd is not None
        return ETCD_ROLES[self.etcd.members.index(member)]

    def _make_keys(self) -> None:
        names = [f"@chaos{i:02d}" for i in range(self.spec.atsigns)]
        self.atsigns.extend(make_atsign_keys(self.keys_dir, names))

    def _prepare_docker(self) -> None:
        """Make sure an engine answers (start dockerd if none does), build the dev image if
        needed, put each atSign's PKAM key in its data dir."""
        import docker

        from atserver_runner.devserver import image

        try:
            self.docker_engine.ensure()
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ClusterError(
                f"no Docker engine on {self.docker_engine.socket_path}: {first}"
            ) from exc
        client = docker.from_env()
        try:
            if self.spec.image is None:
                image.build(client, DOCKER_IMAGE)
        except Exception as exc:
            raise ClusterError(f"the dev atServer image could not be built: {exc}") from exc
        finally:
            client.close()
        if self.spec.storage != "local":  # the nodes' mount points are not mounted yet
            fs = self.ceph.admin_fs()
            for a in self.atsigns:
                where = f"{self.ceph_root}/{atsign_dir(Path('/'), a.atsign).name}"
                fs.mkdirs(where.encode(), 0o755)
                fd = fs.open(f"{where}/{PKAM_FILE}".encode(), "w", 0o644)
                try:
                    fs.write(fd, a.public_key.read_bytes(), 0)
                finally:
                    fs.close(fd)
            return
        roots = {self.node_data_root(name) for name, _ in self._node_names()}
        for root in roots:
            for a in self.atsigns:
                d = atsign_dir(root, a.atsign)
                d.mkdir(parents=True, exist_ok=True)
                (d / PKAM_FILE).write_text(a.public_key.read_text())
                (d / PKAM_FILE).chmod(0o644)

    def _node_names(self) -> list[tuple[str, str]]:
        out = []
        counts = {c: 0 for c in CLOUDS}
        for i in range(self.spec.nodes):
            cloud = CLOUDS[i % 2]
            counts[cloud] += 1
            # Docker containers are named after the node: keep them unique per cluster.
            suffix = (
                f"-{self.prefix.rsplit('-', 1)[-1][-4:]}" if self.spec.runner == "docker" else ""
            )
            out.append((f"{cloud[-1]}{counts[cloud]}{suffix}", cloud))
        return out

    def _workload_command(self) -> list[str]:
        return [
            sys.executable, "-m", "atserver_runner.devserver",
            "--atsign", "{atsign}", "--host", "{host}", "--port", "{port}",
            "--data-dir", "{data_dir}", "--fencing-token", "{token}",
            "--cert", "{cert}", "--key", "{key}",
            "--pkam-public-key-file", str(self.keys_dir / "{name}.pub"),
            "--fence-poll", "0.2", "--log-json",
        ]  # fmt: skip

    def node_config(self, index: int, name: str, cloud: str, http_port: int) -> dict[str, Any]:
        """The YAML document of one node (what ``supervisor run --config`` reads)."""
        spec = self.spec
        state_dir = self.base / "nodes" / name
        low = 20000 + index * PORTS_PER_NODE + (os.getpid() % 50) * 10
        dcs: dict[str, Any] = {"backend": spec.backend, "prefix": self.prefix}
        relayed = self._node_dcs.get(name)
        if spec.backend == "etcd":
            assert self.etcd is not None
            endpoints = [f"127.0.0.1:{p}" for p in relayed] if relayed else self.etcd.endpoints
            dcs["etcd"] = {"endpoints": endpoints}
        else:
            # With session checks the session belongs to the node's own agent (its serfHealth).
            direct = self._agents[name].url if spec.session_checks else self.consul.url
            url = f"http://127.0.0.1:{relayed[0]}" if relayed else direct
            dcs["consul"] = {"url": url, "lock_delay": spec.effective_lock_delay}
            if spec.session_checks:
                dcs["consul"]["session_check_ttl"] = SESSION_CHECK_TIMING[
                    "dcs.consul.session_check_ttl"
                ]
        runner: dict[str, Any] = {
            "kind": spec.runner,
            "port_range": [low, low + PORTS_PER_NODE - 1],
            "data_root": str(self.node_data_root(name)),
            "state_dir": str(state_dir),
            "tls": {
                "ca": str(self.ca.cert_path),
                "cert": str(self.cert.cert),
                "key": str(self.cert.key),
            },
            "stop_timeout": 3.0,
        }  # fmt: skip
        if spec.runner == "process":
            runner["command"] = self._workload_command()
        else:
            runner["image"] = spec.image or DOCKER_IMAGE
            # Arguments after the image's entrypoint; the key is put in each data dir.
            runner["command"] = ["--pkam-public-key-file", f"/data/{PKAM_FILE}", "--log-json"]
        return {
            "node": {"name": name, "cloud": cloud, "zone": f"{cloud}-z1", "address": "127.0.0.1"},
            "dcs": dcs,
            "timing": self.node_timing(),
            "consul": {
                "url": self._agents[name].url if name in self._agents else self.consul.url,
                "service_name": "atserver",
                "deregister_critical_after": "1m",
            },
            "runner": runner,
            "storage": self._storage_config(name),
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "placement": {"rank_delay": 0.3, "prefer_other_cloud": True},
            "inventory": {
                "nodes": [{"name": n, "cloud": c} for n, c in self._node_names()],
                "atsigns": [{"atsign": a.atsign} for a in self.atsigns],
            },
        }

    def node_timing(self) -> dict[str, float]:
        """The nodes' ``timing:`` section."""
        timing = {"ttl": self.ttl, "probe_interval": min(1.0, self.ttl / 4)}
        if self.spec.session_checks:
            for key, value in SESSION_CHECK_TIMING.items():
                if key.startswith("timing."):
                    timing[key.removeprefix("timing.")] = value
        return timing

    def node_data_root(self, node: str) -> Path:
        """Where ``node``'s atServers keep their data (see :attr:`ClusterSpec.data_roots`):
        with CephFS, the node's own mount point."""
        if self.spec.storage != "local":
            return self.base / "nodes" / node / "data"
        return self.data_root / node if self.spec.data_roots == "per-node" else self.data_root

    def ceph_entity(self, node: str) -> str:
        """The node's cephx user: unique per cluster (test clusters share one Ceph)."""
        return f"client.{node}-{self.prefix.rsplit('-', 1)[-1][-6:]}"

    def _storage_config(self, name: str) -> dict[str, Any]:
        if self.spec.storage == "local":
            return {"kind": "local"}
        assert self.ceph is not None
        storage: dict[str, Any] = self.ceph.supervisor_storage(
            self.ceph_entity(name).split(".", 1)[1], self.ceph_root
        )
        if self.spec.storage == "cephfs-noevict":
            return {
                "kind": "shared",
                "fstype": CEPH_FSTYPES[0],
                **{k: storage[k] for k in ("probe_interval", "probe_timeout")},
            }
        return storage

    def _harness_mount(self, name: str) -> Mount | None:
        """``cephfs-noevict``: the node's ceph-fuse mount (not mounted yet: Node.start does)."""
        if self.spec.storage != "cephfs-noevict":
            return None
        assert self.ceph is not None
        entity = self.ceph_entity(name).split(".", 1)[1]
        return Mount(
            self.ceph, entity, self.node_data_root(name), self.ceph_root,
            self.ceph.node_keyring(entity),
        )  # fmt: skip

    @property
    def ceph_root(self) -> str:
        """This cluster's directory in the fs (every node mounts it at its data root)."""
        return f"/atservers/{self.prefix}"

    def _start_ceph(self, timeout: float) -> None:
        if self.ceph is None:
            self._own_ceph = CephCluster(self.base / "ceph")
            try:
                self._own_ceph.start(max(timeout, 120.0))
            except Exception as exc:
                raise ClusterError(f"Ceph (CephFS) did not start: {exc}") from exc
            self.ceph = self._own_ceph
        try:
            self.ceph.admin_fs().mkdirs(self.ceph_root.encode(), 0o755)
        except Exception as exc:
            raise ClusterError(f"cannot create {self.ceph_root} on CephFS: {exc}") from exc

    def _make_relays(self) -> None:
        self.relays = RelayHost()
        for name, _ in self._node_names():
            if self.spec.backend == "etcd":
                assert self.etcd is not None
                ports = [m.client_port for m in self.etcd.members]
            elif self.spec.session_checks:
                ports = [self._agents[name].http_port]
            else:
                ports = [self.consul.http_port]
            self._node_dcs[name] = [self.relays.add(name, p) for p in ports]

    def partition(self, node: str) -> float:
        """Cut ``node`` off the DCS (its relays go silent); returns the wall time."""
        if self.relays is None:
            raise ClusterError("this cluster was started without dcs_relays: cannot partition")
        self.relays.cut(node)
        return time.time()

    def heal_partition(self, node: str) -> float:
        assert self.relays is not None
        self.relays.heal(node)
        return time.time()

    def _make_agents(self, timeout: float) -> None:
        """One Consul client agent per node, joined to the server (as each host runs one)."""
        for name, _ in self._node_names():
            agent = ConsulAgent(self.base / "consul", name=name, join=self.consul)
            self._agents[name] = agent
            try:
                agent.start(timeout)
            except (TimeoutError, FileNotFoundError) as exc:
                raise ClusterError(f"node {name}'s Consul agent did not start: {exc}") from exc

    def _make_nodes(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SSL_CERT_FILE", None)
        for i, (name, cloud) in enumerate(self._node_names()):
            http_port = free_port()
            doc = self.node_config(i, name, cloud, http_port)
            state_dir = Path(doc["runner"]["state_dir"])
            state_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = self.base / "nodes" / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
            proc = ManagedProcess(
                f"supervisor-{name}",
                [sys.executable, "-m", "supervisor.cli", "run", "--config", str(cfg_path)],
                self.base / "logs" / f"supervisor-{name}.log",
                env=env,
            )
            low, high = doc["runner"]["port_range"]
            self.nodes.append(
                Node(
                    name,
                    cloud,
                    cfg_path,
                    state_dir,
                    http_port,
                    proc,
                    (int(low), int(high)),
                    docker=self.spec.runner == "docker",
                    agent=self._agents[name],
                    mount=self._harness_mount(name),
                )
            )

    def start(self) -> None:
        """Start everything; raise :class:`ClusterError` naming the part that did not come up."""
        spec = self.spec
        timeout = spec.start_timeout
        self._make_keys()
        if spec.storage != "local":
            self._start_ceph(timeout)
        if spec.runner == "docker":
            self._prepare_docker()
        try:
            self.consul.start(timeout)
        except (TimeoutError, FileNotFoundError) as exc:
            raise ClusterError(f"the Consul agent did not start: {exc}") from exc
        if spec.backend == "etcd":
            self.etcd = EtcdCluster(self.base / "etcd", size=3, name="etcd")
            try:
                self.etcd.start(timeout)
            except (TimeoutError, FileNotFoundError) as exc:
                raise ClusterError(f"etcd (3 members) did not start: {exc}") from exc
        self.directory = ManagedProcess(
            "directory",
            [
                sys.executable, "-m", "directory.cli", "serve",
                "--consul", self.consul.url, "--host", "127.0.0.1",
                "--port", str(self.directory_port),
                "--cert", str(self.cert.cert), "--key", str(self.cert.key),
                "--metrics-host", "127.0.0.1", "--metrics-port", str(self.directory_metrics_port),
                "--log-format", "json",
            ],
            self.base / "logs" / "directory.log",
        )  # fmt: skip
        self.directory.start()
        self._make_agents(timeout)
        if spec.dcs_relays:
            self._make_relays()
        self._make_nodes()
        for node in self.nodes:
            node.start()
        self._wait_up(timeout)

    def _wait_up(self, timeout: float) -> None:
        import socket

        def directory_listening() -> bool:
            assert self.directory is not None
            if not self.directory.running():
                raise ClusterError(
                    f"the directory exited ({self.directory.returncode()}):\n"
                    + self.directory.log_tail(20)
                )
            with socket.create_connection(self.directory_address, timeout=1):
                return True

        try:
            wait_until(directory_listening, timeout, 0.2, what="the directory to listen")
        except TimeoutError as exc:
            raise ClusterError(str(exc)) from exc
        end = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                if not node.running():
                    raise ClusterError(
                        f"node {node.name}: supervisor exited with {node.process.returncode()}:\n"
                        + node.process.log_tail(30)
                    )
                st = node.status(timeout=1.0)
                if st is not None and st.get("ready"):
                    break
                if time.monotonic() > end:
                    raise ClusterError(
                        f"node {node.name} not ready after {timeout:g}s "
                        f"(status {st}):\n{node.process.log_tail(30)}"
                    )
                time.sleep(0.3)

    # --- observation -------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} (nodes: {[n.name for n in self.nodes]})")

    def owners_by_status(self) -> dict[str, str]:
        """atSign -> node whose ``/status`` says it runs it (a hint for picking faults only)."""
        out: dict[str, str] = {}
        for node in self.nodes:
            if not node.running() or node.frozen:
                continue
            st = node.status(timeout=1.0)
            for w in (st or {}).get("workloads", []):
                if w.get("state") == "running":
                    out[w["atsign"]] = node.name
        return out

    def health(self) -> dict[str, dict[str, Any]]:
        """Consul's view: atSign -> {node, token, status} of each registered instance."""
        out: dict[str, dict[str, Any]] = {}
        for e in health_entries(self.consul.url, "atserver", [a.atsign for a in self.atsigns]):
            meta = (e.get("Service") or {}).get("Meta") or {}
            passing = entry_health(e) == "passing"
            atsign = meta.get("atsign", "")
            token = int(meta.get("fencing_token", 0) or 0)
            cur = out.get(atsign)
            if cur is None or (passing and not cur["passing"]) or token > cur["token"]:
                out[atsign] = {"node": meta.get("node"), "token": token, "passing": passing}
        return out

    def wait_all_serving(self, timeout: float) -> float:
        """Wait until Consul has a passing instance of every atSign; return the seconds taken."""
        start = time.monotonic()
        wanted = {a.atsign for a in self.atsigns}

        def all_passing() -> bool:
            h = self.health()
            return all(h.get(a, {}).get("passing") for a in wanted)

        try:
            wait_until(all_passing, timeout, 0.3, what="every atSign passing in Consul")
        except TimeoutError as exc:
            raise ClusterError(str(exc)) from exc
        return time.monotonic() - start

    # --- tear-down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL), the directory, etcd and Consul, by PID."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        for node in self.nodes:
            node.reap()
        if self.directory is not None:
            self.directory.stop()
        if self.relays is not None:
            self.relays.stop()
        if self.etcd is not None:
            self.etcd.stop()
        for agent in self._agents.values():
            agent.stop()
        self.consul.stop()
        if self._own_ceph is not None:
            self._own_ceph.stop()
        if self.docker_engine.started_here:
            # Look for containers while the engine still answers; stopping it stops them.
            self._containers_left = [
                f"{n.name}: container {c.name}" for n in self.nodes for c in n.containers()
            ]
            self.docker_engine.stop()

    def leftovers(self) -> list[str]:
        """Processes of this cluster still alive (should be empty after :meth:`stop`)."""
        out = [f"{n.name}: supervisor" for n in self.nodes if n.running()]
        engine_stopped = self._containers_left is not None
        for n in self.nodes:
            if n.fence_pid() is not None:
                out.append(f"{n.name}: fence {n.fence_pid()}")
            out += [f"{n.name}: {w}" for w in n.leftover_workloads(containers=not engine_stopped)]
        out += self._containers_left or []
        if self.directory is not None and self.directory.running():
            out.append("directory")
        if self.etcd is not None:
            out += [m.name for m in self.etcd.members if m.process and m.process.running()]
        if self.consul.process is not None and self.consul.process.running():
            out.append("consul")
        out += [
            f"{name}: consul agent"
            for name, agent in self._agents.items()
            if agent.process is not None and agent.process.running()
        ]
        engine = self.docker_engine.process
        if engine is not None and engine.running():
            out.append("dockerd")
        return out


@dataclass
class ClusterSummary:
    """What a user needs to look at the cluster."""

    consul_ui: str
    directory: str
    status_command: str
    nodes: list[str] = field(default_factory=list)


def summary(cluster: Cluster) -> ClusterSummary:
    first = cluster.nodes[0]
    return ClusterSummary(
        consul_ui=cluster.consul_ui,
        directory=f"127.0.0.1:{cluster.directory_port}",
        status_command=f"{sys.executable} -m supervisor.cli status --config {first.config_path}",
        nodes=[f"{n.name} ({n.cloud}) {n.api}" for n in cluster.nodes],
    )
