"""Network namespaces on bridges, and per-node cgroups, that a harness creates and deletes.

:class:`Lab` makes one network namespace per node, each with two veths: one on a *cluster*
bridge (node to node, node to the DCS on the host's address there) and one on a *client*
bridge (outside observers on the host reach the node's published ports). Both bridges live in
a *switch* namespace of their own, and the host joins each through a veth: bridged frames in
the host's namespace would pass its iptables FORWARD chain (``bridge-nf-call-iptables``),
whose policy the host's Docker engine sets to DROP, and the host's firewall is not ours.
Cutting a node's cluster link (:meth:`Lab.cut`) is a partition: packets are dropped both
ways, open connections go silent, while the observer still sees the node through the client
link.

:class:`NodeCgroup` is a ``pids`` cgroup a node's processes start in (and, through
``dockerd --cgroup-parent``, its containers too), so a whole node (engine, containerd,
shims, containers, supervisor) can be killed by the PIDs listed in it.

Everything created here is deleted by :meth:`Lab.destroy` / :meth:`NodeCgroup.remove`,
which are safe to call more than once and after a partial :meth:`Lab.create`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IP_TIMEOUT_S = 10.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


class LabError(Exception):
    """An ``ip`` command failed (with its output)."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` with a timeout; raise :class:`LabError` on failure when ``check``."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class LabNode:
    """One node: its namespace, its addresses and the host ends of its veths."""

    name: str
    netns: str
    cluster_ip: str
    client_ip: str
    cluster_veth: str
    client_veth: str


class Lab:
    """Two bridges on the host (``<prefix>c``, ``<prefix>o``) and one namespace per node.

    ``cluster_net`` / ``client_net``: the first three octets of two private /24s; the host
    is ``.254`` on both, node ``i`` is ``.(i+1)``.
    """

    def __init__(
        self,
        prefix: str,
        nodes: Sequence[str],
        *,
        cluster_net: str = "10.213.1",
        client_net: str = "10.213.2",
    ) -> None:
        if len(prefix) > 8:
            raise ValueError("prefix: at most 8 characters (interface names are 15 at most)")
        self.prefix = prefix
        self.cluster_bridge = f"{prefix}c"
        self.client_bridge = f"{prefix}o"
        self.switch_netns = f"{prefix}-switch"
        self.cluster_host_ip = f"{cluster_net}.254"
        self.client_host_ip = f"{client_net}.254"
        self.nodes = [
            LabNode(
                name=n,
                netns=f"{prefix}-{n}",
                cluster_ip=f"{cluster_net}.{i + 1}",
                client_ip=f"{client_net}.{i + 1}",
                cluster_veth=f"{prefix}{i}c",
                client_veth=f"{prefix}{i}o",
            )
            for i, n in enumerate(nodes)
        ]
        self._created: list[tuple[str, str]] = []  # ("link"|"netns", name), in creation order

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def create(self) -> None:
        """Switch namespace, bridges, node namespaces, veths and addresses; on failure what
        was made is deleted."""
        sw = self.switch_netns
        try:
            ip("netns", "add", sw)
            self._created.append(("netns", sw))
            ip("-n", sw, "link", "set", "lo", "up")
            for bridge, host_ip, host_veth in (
                (self.cluster_bridge, self.cluster_host_ip, f"{self.prefix}hc"),
                (self.client_bridge, self.client_host_ip, f"{self.prefix}ho"),
            ):
                ip("-n", sw, "link", "add", bridge, "type", "bridge")
                ip("-n", sw, "link", "set", bridge, "up")
                ip("link", "add", host_veth, "type", "veth", "peer", "name", f"{host_veth}i")
                self._created.append(("link", host_veth))
                self._plug(f"{host_veth}i", bridge)
                ip("addr", "add", f"{host_ip}/24", "dev", host_veth)
                ip("link", "set", host_veth, "up")
            for n in self.nodes:
                ip("netns", "add", n.netns)
                self._created.append(("netns", n.netns))
                ip("-n", n.netns, "link", "set", "lo", "up")
                for veth, bridge, addr, inner in (
                    (n.cluster_veth, self.cluster_bridge, n.cluster_ip, "eth0"),
                    (n.client_veth, self.client_bridge, n.client_ip, "eth1"),
                ):
                    ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}i")
                    self._created.append(("link", veth))
                    ip("link", "set", f"{veth}i", "netns", n.netns)
                    ip("-n", n.netns, "link", "set", f"{veth}i", "name", inner)
                    ip("-n", n.netns, "addr", "add", f"{addr}/24", "dev", inner)
                    ip("-n", n.netns, "link", "set", inner, "up")
                    self._plug(veth, bridge)
        except BaseException:
            self.destroy()
            raise

    def _plug(self, veth: str, bridge: str) -> None:
        """Move ``veth`` into the switch namespace and onto ``bridge``."""
        sw = self.switch_netns
        ip("link", "set", veth, "netns", sw)
        ip("-n", sw, "link", "set", veth, "master", bridge)
        ip("-n", sw, "link", "set", veth, "up")

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.node(node).netns, *argv]

    def cut(self, node: str) -> float:
        """Partition ``node`` from the cluster bridge (the client link stays); wall time."""
        ip("-n", self.switch_netns, "link", "set", self.node(node).cluster_veth, "down")
        return time.time()

    def heal(self, node: str) -> float:
        ip("-n", self.switch_netns, "link", "set", self.node(node).cluster_veth, "up")
        return time.time()

    def pids(self, node: str) -> list[int]:
        """PIDs still in ``node``'s namespace."""
        return self._netns_pids(self.node(node).netns)

    @staticmethod
    def _netns_pids(netns: str) -> list[int]:
        out = ip("netns", "pids", netns, check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    def destroy(self) -> list[str]:
        """Delete what :meth:`create` made, last first; SIGKILL (by PID) whatever still runs
        in a namespace first. Returns what could not be deleted."""
        problems: list[str] = []
        for kind, name in reversed(self._created):
            if kind == "netns":
                for pid in self._netns_pids(name):
                    problems.append(f"pid {pid} still in {name}: killed")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    ip("netns", "del", name)
                except LabError as exc:
                    problems.append(str(exc))
            else:
                try:
                    ip("link", "del", name)
                except LabError as exc:
                    if "Cannot find device" not in str(exc):
                        problems.append(str(exc))
        self._created.clear()
        return problems


class NodeCgroup:
    """``/sys/fs/cgroup/pids/<name>``: the cgroup a node's processes are put in."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = CGROUP_ROOT / "pids" / name

    def create(self) -> None:
        self.path.mkdir(exist_ok=True)

    def shell_join(self) -> str:
        """A shell command that moves the shell itself into the cgroup."""
        return f"echo $$ > {self.path}/cgroup.procs"

    def pids(self) -> list[int]:
        out: list[int] = []
        if not self.path.exists():
            return out
        for procs in self.path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                out += [int(p) for p in procs.read_text().split()]
        return out

    def kill_all(self, timeout: float = 10.0) -> int:
        """SIGKILL every PID in the cgroup until it is empty (or ``timeout``); how many."""
        killed: set[int] = set()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.05)
        return len(killed)

    def remove(self) -> list[str]:
        """Kill what is left, then remove this cgroup and the ones Docker made under it in
        every controller, deepest first. Returns what could not be removed."""
        problems: list[str] = []
        if self.pids():
            problems.append(f"cgroup {self.name}: processes left, killed")
            self.kill_all()
        for controller in (*CGROUP_CONTROLLERS, "systemd"):
            top = CGROUP_ROOT / controller / self.name
            if not top.exists():
                continue
            dirs = sorted(
                (p for p in top.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            )
            for d in [*dirs, top]:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
                else:
                    problems.append(f"cannot remove {d}")
        return problems
