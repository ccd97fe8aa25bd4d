"""Docker engines in network namespaces (:mod:`testbed.netns`), and a Swarm of them.

Each :class:`NodeHost` is one machine: a namespace of a :class:`testbed.netns.Lab`, a
``pids`` cgroup (so the whole node can be killed by PID) and its own UTS namespace (its own
hostname, which Swarm shows as the node's name). Its :class:`Engine` is Debian's dockerd 20.10
with its own ``--data-root``, ``--exec-root``, socket, pidfile and dockerd-managed containerd,
``--iptables=false`` (published ports go through docker-proxy), containers in the node's
cgroup (``--cgroup-parent``). Inside the node's private mount namespace (``ip netns exec``
makes one) the cgroup controllers are mounted again (``ip netns exec`` mounts a fresh
``/sys`` without them) and a per-node directory is bind-mounted over ``/etc/docker``, so each
engine has its own ``key.json`` and engine ID. None of these mounts is visible outside the
node, and they go with it.

The host's own engine (``/var/run/docker.sock``, ``/var/lib/docker``) is never touched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.dockerd import ping
from testbed.netns import CGROUP_CONTROLLERS, Lab, LabNode, NodeCgroup
from testbed.process import ManagedProcess, wait_until

CLI_TIMEOUT_S = 60.0
SWARM_PORT = 2377


class SwarmError(Exception):
    """A docker CLI call failed (with its output)."""


class NodeHost:
    """One simulated machine: a Lab namespace, a cgroup, a base directory for its state."""

    def __init__(self, lab: Lab, node: LabNode, base: Path, cgroup_name: str) -> None:
        self.lab = lab
        self.node = node
        self.base = base
        self.cgroup = NodeCgroup(cgroup_name)
        self.processes: list[ManagedProcess] = []

    @property
    def name(self) -> str:
        return self.node.name

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        inner: str = "",
    ) -> ManagedProcess:
        """A process of this node (not started): joins the node's cgroup, enters its network
        namespace and a UTS namespace named after the node, runs ``inner`` (shell, inside)
        and then execs ``argv``."""
        script = (
            f"{inner}\nhostname {shlex.quote(self.name)}\nexec {shlex.join(argv)}"
            if inner
            else f"hostname {shlex.quote(self.name)}\nexec {shlex.join(argv)}"
        )
        outer = [
            "sh",
            "-c",
            f"{self.cgroup.shell_join()} && exec "
            + shlex.join(self.lab.exec_argv(self.name, ["unshare", "--uts", "sh", "-c", script])),
        ]
        proc = ManagedProcess(
            f"{self.name}-{name}", outer, self.base / "logs" / f"{name}.log", env=env
        )
        self.processes.append(proc)
        return proc

    def kill_all(self) -> int:
        """SIGKILL everything of the node (by the PIDs in its cgroup): a node loss."""
        n = self.cgroup.kill_all()
        for p in self.processes:
            p.kill()  # reaps the children we started
        return n


def _cgroup_mounts() -> str:
    lines = ["set -e", "mount -t tmpfs cgroup_root /sys/fs/cgroup"]
    for c in CGROUP_CONTROLLERS:
        lines.append(
            f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
        )
    lines.append(
        "mkdir -p /sys/fs/cgroup/systemd && "
        "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd"
    )
    return "\n".join(lines)


class Engine:
    """dockerd of one :class:`NodeHost` (its state under ``host.base / "docker"``)."""

    def __init__(self, host: NodeHost) -> None:
        self.host = host
        root = host.base / "docker"
        self.data_root = root / "data"
        self.exec_root = root / "exec"
        self.etc = root / "etc"
        self.socket = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _argv(self) -> list[str]:
        return [
            shutil.which("dockerd") or "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "-H", self.url,
            "--pidfile", str(self.pidfile),
            "--iptables=false",
            "--ip-masq=false",
            "--cgroup-parent", f"/{self.host.cgroup.name}",
            "--log-level", "warn",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> float:
        """Start dockerd (again, after a kill: same data root) and wait for ``/_ping``;
        seconds it took."""
        for d in (self.data_root, self.exec_root, self.etc):
            d.mkdir(parents=True, exist_ok=True)
        with_stale = self.socket.exists()
        if with_stale:
            self.socket.unlink()
        self.pidfile.unlink(missing_ok=True)
        inner = _cgroup_mounts() + f"\nmount --bind {shlex.quote(str(self.etc))} /etc/docker"
        self.process = self.host.spawn(
            "dockerd",
            self._argv(),
            env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
            inner=inner,
        )
        t0 = time.monotonic()
        self.process.start()
        proc = self.process
        try:
            wait_until(
                lambda: ping(str(self.socket)) or not proc.running(),
                timeout,
                0.1,
                what=f"dockerd of {self.host.name}",
            )
        except TimeoutError as exc:
            raise SwarmError(f"{exc}\n{proc.log_tail(20)}") from exc
        if not proc.running():
            raise SwarmError(f"dockerd of {self.host.name} exited:\n{proc.log_tail(20)}")
        return time.monotonic() - t0

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> str:
        """``docker -H <this engine> ARGS``; raise :class:`SwarmError` on failure."""
        argv = ["docker", "-H", self.url, *args]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
            )
        except subprocess.TimeoutExpired as exc:
            raise SwarmError(f"{shlex.join(argv)}: no answer within {timeout:g}s") from exc
        if check and proc.returncode != 0:
            raise SwarmError(f"{shlex.join(argv[3:])} on {self.host.name}: {proc.stderr.strip()}")
        return proc.stdout

    def client(self, timeout: float = 30.0) -> Any:
        import docker

        return docker.DockerClient(base_url=self.url, timeout=int(timeout))

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("info", "--format", "{{json .}}"))
        return data


@dataclass(frozen=True)
class SwarmSettings:
    """What an operator can choose (``docker swarm init/update`` and the service)."""

    dispatcher_heartbeat: str | None = None
    """None: Swarm's default (5s)."""
    task_history_limit: int | None = None
    """None: the default (5)."""
    restart_delay: str | None = None
    """The service's ``--restart-delay``; None: the default (5s)."""
    restart_condition: str = "any"
    stop_grace_period: str | None = None

    def init_args(self) -> list[str]:
        out: list[str] = []
        if self.dispatcher_heartbeat is not None:
            out += ["--dispatcher-heartbeat", self.dispatcher_heartbeat]
        if self.task_history_limit is not None:
            out += ["--task-history-limit", str(self.task_history_limit)]
        return out

    def service_args(self) -> list[str]:
        out = ["--restart-condition", self.restart_condition]
        if self.restart_delay is not None:
            out += ["--restart-delay", self.restart_delay]
        if self.stop_grace_period is not None:
            out += ["--stop-grace-period", self.stop_grace_period]
        return out


class Swarm:
    """A Swarm of the given engines, all managers (the first initialises it)."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)

    def init(self, settings: SwarmSettings) -> None:
        first = self.engines[0]
        addr = first.host.node.cluster_ip
        first.cli(
            "swarm", "init", "--advertise-addr", addr,
            "--listen-addr", f"{addr}:{SWARM_PORT}", *settings.init_args(),
        )  # fmt: skip
        token = first.cli("swarm", "join-token", "-q", "manager").strip()
        for e in self.engines[1:]:
            a = e.host.node.cluster_ip
            e.cli(
                "swarm", "join", "--token", token, "--advertise-addr", a,
                "--listen-addr", f"{a}:{SWARM_PORT}", f"{addr}:{SWARM_PORT}",
            )  # fmt: skip

    def update(self, settings: SwarmSettings) -> None:
        """Apply the cluster-wide settings (through any reachable manager)."""
        args = settings.init_args()
        if args:
            self.any_manager().cli("swarm", "update", *args)

    def any_manager(self, exclude: Sequence[str] = ()) -> Engine:
        for e in self.engines:
            if e.host.name in exclude or not e.running():
                continue
            try:
                e.cli("node", "ls", "-q", timeout=10)
                return e
            except SwarmError:
                continue
        raise SwarmError("no manager answers")

    def nodes(self, exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
        """``docker node ls`` as dicts (Hostname, Status, Availability, ManagerStatus)."""
        out = self.any_manager(exclude).cli("node", "ls", "--format", "{{json .}}", timeout=10)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def leader(self, exclude: Sequence[str] = ()) -> str | None:
        for n in self.nodes(exclude):
            if n.get("ManagerStatus") == "Leader":
                return str(n.get("Hostname"))
        return None

    def all_ready(self) -> bool:
        try:
            nodes = self.nodes()
        except SwarmError:
            return False
        return len(nodes) == len(self.engines) and all(
            n.get("Status") == "Ready" and n.get("ManagerStatus") in ("Leader", "Reachable")
            for n in nodes
        )

    def leave_all(self) -> None:
        """Every running engine leaves the swarm (``--force``), last manager last."""
        for e in reversed(self.engines):
            if e.running():
                e.cli("swarm", "leave", "--force", check=False, timeout=30)
