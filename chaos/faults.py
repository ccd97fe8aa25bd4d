"""Faults the harness injects, and the seeded schedule that picks them.

Each fault is injected, held for a while, and healed (a killed supervisor or node is
started again, a frozen process thawed, an etcd member restarted); the harness records
wall times, never the supervisors' view. Targets are chosen by the seed (node and member
indexes, atSign names), so a seed gives the same schedule every time; only "the etcd
leader" is resolved at run time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chaos.checker import FaultRecord
from chaos.cluster import Cluster
from testbed.etcd import EtcdCluster, EtcdMember

ETCD_KINDS = ("kill-etcd-member", "kill-etcd-leader", "freeze-etcd-member", "freeze-etcd-leader")
COMMON_KINDS = ("kill-supervisor", "kill-node", "pause-supervisor", "crash-workload")
RESTART_CONSUL = "restart-consul"
PARTITION_KIND = "partition-node"
STORAGE_KINDS = ("kill-osd", "kill-active-mds", "freeze-node")


def kinds_for(
    backend: str, partition: bool = False, opt_in: bool = False, storage: str = "cephfs"
) -> tuple[str, ...]:
    """The fault kinds of a backend's default schedule (``opt_in`` is kept for callers that
    validate names; every kind is in the default schedule now).

    ``restart-consul`` restarts the Consul server (persistent: KV, sessions and the index
    survive; the agent's registrations are re-read from its data dir). With CephFS storage:
    ``kill-osd`` (one of three; the pools keep two copies), ``kill-active-mds`` (the standby
    takes over) and ``freeze-node`` (SIGSTOP the supervisor, fence, atServers, ceph-fuse and
    Consul agent of a node; thawed after the hold, by then fenced and evicted).
    """
    kinds: tuple[str, ...] = (*COMMON_KINDS, RESTART_CONSUL)
    if backend == "etcd":
        kinds += ETCD_KINDS
    if storage == "cephfs":
        kinds += STORAGE_KINDS
    return kinds + ((PARTITION_KIND,) if partition else ())


def partition_unavailable_reason(cluster: Cluster) -> str | None:
    """Why ``partition-node`` cannot run on ``cluster`` (``None`` if it can)."""
    if not cluster.spec.dcs_relays:
        return "the cluster was started without DCS relays (ClusterSpec.dcs_relays)"
    return None


@dataclass(frozen=True)
class PlannedFault:
    """One entry of the schedule: what, on which index/name, held for how many ttls."""

    kind: str
    target: int
    hold_ttls: float

    def describe(self, cluster: Cluster) -> str:
        return f"{self.kind} target={self.target_name(cluster)} hold={self.hold_ttls:.2f}xttl"

    def target_name(self, cluster: Cluster) -> str:
        if self.kind in (
            "kill-supervisor", "kill-node", "pause-supervisor", "freeze-node", PARTITION_KIND
        ):  # fmt: skip
            return cluster.nodes[self.target % len(cluster.nodes)].name
        if self.kind == "crash-workload":
            return cluster.atsigns[self.target % len(cluster.atsigns)].atsign
        if self.kind in ("kill-etcd-member", "freeze-etcd-member"):
            assert cluster.etcd is not None
            return cluster.etcd.members[self.target % 3].name
        if self.kind in ("kill-etcd-leader", "freeze-etcd-leader"):
            return "leader"
        if self.kind == "kill-osd":
            return f"osd.{self.target % 3}"
        if self.kind == "kill-active-mds":
            return "active mds"
        return "consul"


_HOLD = {
    "kill-supervisor": (0.5, 2.0),
    "kill-node": (1.0, 2.0),
    "pause-supervisor": (1.5, 2.5),
    "crash-workload": (0.0, 0.0),
    "restart-consul": (0.0, 0.0),
    "kill-etcd-member": (1.0, 3.0),
    "kill-etcd-leader": (1.0, 3.0),
    "freeze-etcd-member": (1.0, 2.0),
    "freeze-etcd-leader": (1.0, 2.0),
    PARTITION_KIND: (1.5, 2.5),
    "kill-osd": (1.0, 3.0),
    "kill-active-mds": (0.5, 1.5),
    "freeze-node": (1.5, 2.5),
}


def schedule(seed: int, count: int, kinds: Sequence[str]) -> list[PlannedFault]:
    """``count`` faults drawn by ``random.Random(seed)`` (reproducible)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.choice(list(kinds))
        low, high = _HOLD[kind]
        out.append(PlannedFault(kind, rng.randrange(1000), round(rng.uniform(low, high), 2)))
    return out


async def _sleep_ttls(cluster: Cluster, ttls: float) -> None:
    await asyncio.sleep(ttls * cluster.ttl)


async def inject(cluster: Cluster, fault: PlannedFault) -> FaultRecord:
    """Inject ``fault``, hold it, heal it; return what was done and when (wall times)."""
    name = fault.target_name(cluster)
    kind = fault.kind
    start = time.time()
    killed: list[tuple[str, str, float]] = []
    detail = ""
    if kind in ("kill-supervisor", "kill-node", "pause-supervisor"):
        node = cluster.node(name)
        if kind == "kill-supervisor":
            await asyncio.to_thread(node.kill_supervisor)
        elif kind == "kill-node":
            atsigns = list(node.workload_pids())
            done = await asyncio.to_thread(node.kill_node)
            killed = [(node.name, a, done) for a in atsigns]
            detail = f"killed workloads {atsigns}"
        else:
            await asyncio.to_thread(node.freeze)
        await _sleep_ttls(cluster, fault.hold_ttls)
        if kind == "pause-supervisor":
            await asyncio.to_thread(node.thaw)
        else:
            await asyncio.to_thread(node.start)
    elif kind == "freeze-node":
        node = cluster.node(name)
        atsigns = list(node.workload_pids())
        await asyncio.to_thread(node.freeze_node)
        await _sleep_ttls(cluster, fault.hold_ttls)
        await asyncio.to_thread(node.thaw_node)
        detail = f"froze workloads {atsigns} with the node's ceph-fuse and agent"
    elif kind in ("kill-osd", "kill-active-mds"):
        ceph = cluster.ceph
        if ceph is None:
            raise ValueError(f"{kind} needs storage cephfs (the cluster runs without Ceph)")
        if kind == "kill-osd":
            osd = fault.target % 3
            await asyncio.to_thread(ceph.kill_osd, osd)
            await _sleep_ttls(cluster, fault.hold_ttls)
            await asyncio.to_thread(ceph.restart_osd, osd)
        else:
            mds = await asyncio.to_thread(ceph.kill_active_mds)
            name = f"mds.{mds}"
            await _sleep_ttls(cluster, fault.hold_ttls)
            took = time.monotonic()
            standby = await asyncio.to_thread(ceph.wait_active_mds, 90.0, other_than=mds)
            detail = f"mds.{standby} active {time.monotonic() - took:.1f}s after the hold"
            await asyncio.to_thread(ceph.restart_mds, mds)
    elif kind == PARTITION_KIND:
        await asyncio.to_thread(cluster.partition, name)
        await _sleep_ttls(cluster, fault.hold_ttls)
        await asyncio.to_thread(cluster.heal_partition, name)
        detail = "DCS relays of the node silenced, then its connections dropped"
    elif kind == "crash-workload":
        for node in cluster.nodes:
            crashed = await asyncio.to_thread(node.crash_workload, name)
            if crashed is not None:
                killed.append((node.name, name, crashed))
        detail = f"on {[k[0] for k in killed] or 'no node (not running)'}"
    elif kind == "restart-consul":
        await asyncio.to_thread(cluster.consul.restart)
        detail = "persistent server: KV, sessions and the index survive"
    elif kind in ETCD_KINDS:
        etcd = cluster.etcd
        assert etcd is not None
        if kind.endswith("leader"):
            member = await asyncio.to_thread(etcd.leader)
        else:
            # The schedule names the member (reproducible); say whether it was the leader
            # then, since that, not the kind, decides whether claims are at risk.
            member = etcd.members[fault.target % 3]
            detail = f"{member.name} was {await asyncio.to_thread(_etcd_role_now, etcd, member)}"
        name = f"{member.name} ({cluster.etcd_role(member)})"
        assert member.process is not None
        if kind.startswith("kill"):
            await asyncio.to_thread(etcd.kill_member, member)
            await _sleep_ttls(cluster, fault.hold_ttls)
            await asyncio.to_thread(etcd.restart_member, member)
        else:
            member.process.freeze()
            await _sleep_ttls(cluster, fault.hold_ttls)
            member.process.thaw()
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return FaultRecord(kind, name, start, time.time(), detail, tuple(killed))


def _etcd_role_now(etcd: EtcdCluster, member: EtcdMember) -> str:
    """'the leader', 'a follower', or why that could not be told."""
    try:
        return "the leader" if etcd.leader() is member else "a follower"
    except RuntimeError as err:
        return f"of unknown role ({err})"
