"""``python -m chaos run``: a seeded fault schedule against a local cluster, then the checker.

The workload client runs throughout. Before each fault the harness waits (bounded) until
every node answers ``/readyz``-equivalent status and every atSign acknowledged a write
after the previous fault was healed, so each fault starts from a steady state. At the end:
read back every acknowledged write, stop the cluster, collect histories, check, report.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console

from atserver_runner.devserver.protocol import validate_key
from chaos.atclient import client_ssl_context
from chaos.checker import FaultRecord, Verdict, check
from chaos.cluster import DEFAULT_TTL, Cluster, ClusterError, ClusterSpec
from chaos.faults import inject, kinds_for, partition_unavailable_reason, schedule
from chaos.history import NodeLogs, collect_instances
from chaos.readback import MountReadBack, read_through_other_mounts
from chaos.report import instances_json, plot_timeline, write_json
from chaos.sessions import session_events, session_losses_by_fault
from chaos.workload import WorkloadClient

console = Console(stderr=True)


@dataclass(frozen=True)
class RunOptions:
    backend: str = "etcd"
    nodes: int = 3
    atsigns: int = 4
    faults: int = 10
    seed: int = 1
    report_dir: Path = Path("chaos-report")
    ttl: float | None = None
    kinds: tuple[str, ...] = ()
    """Restrict to these fault kinds (default: all that apply to the backend)."""
    client_interval: float = 0.25
    partitions: bool = True
    """Route DCS traffic through relays so ``partition-node`` can run."""
    data_roots: str = "shared"
    """``shared`` or ``per-node`` (see :attr:`chaos.cluster.ClusterSpec.data_roots`); only
    for ``storage="local"``."""
    storage: str = "cephfs"
    """``cephfs`` (each node its own ceph-fuse mount; storage faults join the schedule) or
    ``local`` (see :attr:`chaos.cluster.ClusterSpec.storage`)."""
    ceph: Any = None
    """A running :class:`testbed.ceph.CephCluster` to use (a test session's); ``None``: the
    run builds its own when ``storage`` is ``cephfs``."""
    session_checks: bool = False
    """Consul: sessions bound to health checks (see ``ClusterSpec.session_checks``)."""


@dataclass
class RunResult:
    verdict: Verdict
    report: dict[str, Any]
    report_path: Path
    timeline_path: Path


def steady_bound(cluster: Cluster) -> float:
    """How long to wait for a steady state: generous, derived from the ttl (Consul's session
    may live 2 x ttl, plus lock-delay)."""
    return 3 * cluster.ttl + cluster.spec.effective_lock_delay + 30


async def wait_steady(
    cluster: Cluster, client: WorkloadClient, since: float, bound: float
) -> str | None:
    """Wait until every node is ready and every atSign acknowledged a write after ``since``
    + one ttl (so the consequences of the last fault, such as a self-fence, have shown).
    Returns ``None``, or what was still missing when ``bound`` ran out."""
    since += cluster.ttl
    end = time.monotonic() + bound + cluster.ttl
    wanted = {a.atsign for a in cluster.atsigns}
    missing = ""
    while time.monotonic() < end:
        served = {r.atsign for r in client.records if r.op == "write" and r.ok and r.start > since}
        statuses = await asyncio.gather(*(asyncio.to_thread(n.status, 1.0) for n in cluster.nodes))
        not_ready = [
            n.name if n.running() else f"{n.name} (exited {n.process.returncode()})"
            for n, s in zip(cluster.nodes, statuses, strict=True)
            if s is None or not s.get("ready")
        ]
        if wanted <= served and not not_ready:
            return None
        missing = (
            f"atSigns without a write: {sorted(wanted - served)}; nodes not ready: {not_ready}"
        )
        await asyncio.sleep(0.5)
    return missing


async def _campaign(opts: RunOptions) -> RunResult:
    report_dir = opts.report_dir.resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(
        base_dir=report_dir / "cluster",
        backend=opts.backend,  # type: ignore[arg-type]
        nodes=opts.nodes,
        atsigns=opts.atsigns,
        ttl=opts.ttl,
        dcs_relays=opts.partitions,
        data_roots=opts.data_roots,  # type: ignore[arg-type]
        storage=opts.storage,  # type: ignore[arg-type]
        ceph=opts.ceph,
        session_checks=opts.session_checks,
    )
    cluster = Cluster(spec)
    (report_dir / "faults.jsonl").unlink(missing_ok=True)
    kinds = opts.kinds or kinds_for(opts.backend, partition=opts.partitions, storage=opts.storage)
    skipped: dict[str, str] = {}
    reason = partition_unavailable_reason(cluster)
    if reason:
        skipped["partition-node"] = reason
    kinds = tuple(k for k in kinds if k not in skipped)
    plan = schedule(opts.seed, opts.faults, kinds)
    t_begin = time.time()
    mono_begin = time.monotonic()
    records: list[FaultRecord] = []
    notes: list[str] = []
    client: WorkloadClient | None = None
    mounts: list[MountReadBack] = []
    # SIGTERM/SIGINT end the schedule early; what ran is still checked and reported.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.to_thread(cluster.start)
        console.print(f"cluster up in {time.monotonic() - mono_begin:.1f}s ({cluster.base})")
        client = WorkloadClient(
            cluster.atsigns,
            cluster.directory_address,
            client_ssl_context(cluster.ca.cert_path),
            interval=opts.client_interval,
        )
        client.start()
        bound = steady_bound(cluster)
        missing = await wait_steady(cluster, client, t_begin - cluster.ttl, bound)
        if missing:
            raise ClusterError(f"no steady state within {bound:g}s of start: {missing}")
        since = time.time()
        for k, pf in enumerate(plan, 1):
            if stop.is_set():
                notes.append(f"stopped by a signal after {k - 1} of {len(plan)} faults")
                break
            missing = await wait_steady(cluster, client, since, bound)
            if missing:
                notes.append(f"before fault {k}: no steady state within {bound:g}s: {missing}")
                console.print(f"[yellow]{notes[-1]}[/yellow]")
            try:
                rec = await inject(cluster, pf)
            except Exception as exc:  # a server that would not come back: say so, go on
                notes.append(f"fault {k} ({pf.describe(cluster)}) failed: {exc!r}")
                console.print(f"[yellow]{notes[-1]}[/yellow]")
                continue
            records.append(rec)
            since = rec.healed
            # Checkpoint the histories, so `chaos check` works even if the harness dies.
            await asyncio.to_thread(_append_line, report_dir / "faults.jsonl", asdict(rec))
            if k % 10 == 0:
                await asyncio.to_thread(client.dump, report_dir / "client-ops.jsonl")
            console.print(
                f"{time.strftime('%H:%M:%S')} fault {k}/{len(plan)}: {rec.kind} {rec.target} "
                f"held {rec.healed - rec.start:.1f}s {rec.detail}",
                highlight=False,
            )
        missing = await wait_steady(cluster, client, since, bound)
        if missing:
            notes.append(f"after the last fault: no steady state within {bound:g}s: {missing}")
        await asyncio.sleep(1.0)
        await client.stop()
        verified = await client.verify(timeout=bound)
        if spec.storage != "local":  # and once more from the files, through another mount
            mounts = await asyncio.to_thread(
                read_through_other_mounts, cluster, client.acknowledged()
            )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if client is not None:
            await client.stop()
        await asyncio.to_thread(cluster.stop)
    t_end = time.time()
    assert client is not None
    left = cluster.leftovers()
    if left:
        notes.append(f"left running after stop: {left}")
    logs = [NodeLogs(n.name, n.workload_logs, n.fence_log) for n in cluster.nodes]
    instances = collect_instances(logs, records)
    lost = list(verified.lost)
    seen = {(w["atsign"], validate_key(w["key"])) for w in lost}
    for m in mounts:
        if m.error:
            notes.append(f"{m.atsign}: not read through another node's mount: {m.error}")
        want = {validate_key(r.key): r for r in client.acknowledged() if r.atsign == m.atsign}
        lost += [
            {
                "atsign": m.atsign,
                "key": k,
                "value": want[k].value,
                "read": f"not in {m.node}'s mount",
            }
            for k in m.missing
            if (m.atsign, k) not in seen
        ]
    verdict = check(instances, records, client.records, lost, verified.unreadable_atsigns)
    client.dump(report_dir / "client-ops.jsonl")
    (report_dir / "readback.json").write_text(json.dumps(asdict(verified), indent=1))
    (report_dir / "instances.json").write_text(json.dumps(instances_json(instances), indent=1))
    failed_ops = sum(1 for r in client.records if not r.ok)
    refusals = stale_data_refusals(cluster.base / "logs")
    report: dict[str, Any] = {
        "options": {
            **{f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "ceph"},
            "report_dir": str(report_dir),
            "ceph": "the caller's" if opts.ceph is not None else None,
        },
        "ttl": cluster.ttl,
        "timing": cluster.node_timing(),
        "lock_delay": cluster.spec.effective_lock_delay if opts.backend == "consul" else None,
        "kinds": list(kinds),
        "skipped_kinds": skipped,
        "schedule": [pf.describe(cluster) for pf in plan],
        "duration_s": round(t_end - t_begin, 1),
        "operations": len(client.records),
        "failed_operations": failed_ops,
        "verified_writes": verified.checked,
        "verified_through_other_mounts": sum(m.checked for m in mounts if m.complete),
        "mount_readback": [asdict(m) for m in mounts],
        "session_losses": session_losses_by_fault(
            session_events(cluster.base / "logs"), records, cluster.ttl
        ),
        "stale_data_refusals": len(refusals),
        "stale_data_refusals_by_atsign": {
            a: sum(1 for r in refusals if r["atsign"] == a)
            for a in sorted({r["atsign"] for r in refusals})
        },
        "instances": len(instances),
        "notes": notes,
        **verdict.to_json(),
    }
    report_path = report_dir / "report.json"
    write_json(report_path, report)
    timeline = report_dir / "timeline.png"
    plot_timeline(
        timeline,
        instances,
        records,
        verdict,
        t_begin,
        t_end,
        f"{opts.backend}: {opts.nodes} nodes, {opts.atsigns} atSigns, {len(records)} faults, "
        f"seed {opts.seed}",
    )
    return RunResult(verdict, report, report_path, timeline)


def stale_data_refusals(logs_dir: Path) -> list[dict[str, str]]:
    """Every data-guard refusal the supervisors logged (``event=stale-data-refused``)."""
    out: list[dict[str, str]] = []
    for path in sorted(logs_dir.glob("supervisor-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "event=stale-data-refused" not in line:
                continue
            fields = dict(
                part.split("=", 1) for part in line.split() if "=" in part and "'" not in part
            )
            out.append({"node": fields.get("node", ""), "atsign": fields.get("atsign", "")})
    return out


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_faults(report_dir: Path) -> list[FaultRecord]:
    """The fault records a run checkpointed in ``faults.jsonl``."""
    path = report_dir / "faults.jsonl"
    if path.exists():
        raws = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif (report_dir / "report.json").exists():
        raws = json.loads((report_dir / "report.json").read_text()).get("faults", [])
    else:
        raws = []
    names = {f.name for f in fields(FaultRecord)}
    out = []
    for raw in raws:
        kept = {k: v for k, v in raw.items() if k in names}
        kept["killed"] = tuple(tuple(k) for k in kept.get("killed", ()))
        out.append(FaultRecord(**kept))
    return out


def recheck(report_dir: Path) -> Verdict:
    """Run the checker again on a report directory's saved histories (the end-of-run
    read-back is not repeated: its lost writes come from report.json when present)."""
    from chaos.workload import load_records

    faults = load_faults(report_dir)
    nodes_dir = report_dir / "cluster" / "nodes"
    logs = [
        NodeLogs(d.name, d / "workloads" / "logs", d / "fence.log")
        for d in sorted(p for p in nodes_dir.iterdir() if p.is_dir())
    ]
    instances = collect_instances(logs, faults)
    ops = load_records(report_dir / "client-ops.jsonl")
    readback = report_dir / "readback.json"
    if not readback.exists():
        return check(instances, faults, ops)
    saved = json.loads(readback.read_text())
    return check(instances, faults, ops, saved["lost"], saved["unreadable_atsigns"])


def recheck_session_losses(report_dir: Path) -> dict[str, Any]:
    """The nodes' session losses per fault, read again from a report directory's logs (the
    ttl from its report.json, else the etcd default)."""
    report = report_dir / "report.json"
    ttl = json.loads(report.read_text()).get("ttl") if report.exists() else None
    events = session_events(report_dir / "cluster" / "logs")
    return session_losses_by_fault(
        events, load_faults(report_dir), float(ttl or DEFAULT_TTL["etcd"])
    )


def run_chaos(opts: RunOptions) -> RunResult:
    """Run the campaign (blocking)."""
    return asyncio.run(_campaign(opts))
