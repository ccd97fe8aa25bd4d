"""``python -m chaos demo`` (what ``make demo`` runs): a local cluster and a failover to watch.

Every node mounts CephFS with its own ceph-fuse (``--storage cephfs``, the default; a Ceph
cluster is built for the demo) so the data follows the claim. On a terminal it shows a live
table and lets the user SIGKILL a node. Without a terminal (CI, scripts) it runs a scripted
tour: wait until every atSign is served, write keys to each, SIGKILL the node owning the
most atSigns, wait until they are served elsewhere, read every acknowledged write back
through the new owners, stop everything, exit 0. Anything that does not happen within its
bound, and any write not read back, is reported and the exit code is 1.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from chaos.atclient import client_ssl_context
from chaos.cluster import Cluster, ClusterError, ClusterSpec, Node, summary
from chaos.observe import Observer, OwnerRow, owner_table
from chaos.prometheus import start_prometheus
from chaos.readback import ReadBack, read_all, write_all
from testbed.prometheus import Prometheus, PrometheusError

console = Console()


class DemoFailed(Exception):
    """The demo could not show what it promised (the message says what did not happen)."""


def _print_where(cluster: Cluster) -> None:
    s = summary(cluster)
    console.print(f"[bold]Consul UI:[/bold]   {s.consul_ui}")
    console.print(f"[bold]directory:[/bold]   {s.directory} (TLS, CA {cluster.ca.cert_path})")
    console.print(f"[bold]status:[/bold]      {s.status_command}")
    console.print(f"[bold]nodes:[/bold]       {', '.join(s.nodes)}")
    console.print(f"[bold]logs, configs:[/bold] {cluster.base}")


async def _wait_served(obs: Observer, deadline: float, avoid: str | None = None) -> list[OwnerRow]:
    """Poll until every atSign is passing and the directory answers (not on ``avoid``)."""
    rows: list[OwnerRow] = []
    while time.monotonic() < deadline:
        rows = await obs.snapshot()
        if all(r.served and r.owner != avoid and f"({avoid})" not in r.directory for r in rows):
            return rows
        await asyncio.sleep(0.5)
    raise DemoFailed(
        "not every atSign was served in time: "
        + ", ".join(f"{r.atsign}={r.owner}/{r.health}/{r.directory}" for r in rows if not r.served)
    )


WRITES_PER_ATSIGN = 5


async def _write_all(cluster: Cluster) -> dict[str, list[tuple[str, str]]]:
    """``WRITES_PER_ATSIGN`` keys to every atSign through the directory's answer."""
    ctx = client_ssl_context(cluster.ca.cert_path)
    return await write_all(cluster.atsigns, cluster.directory_address, ctx, WRITES_PER_ATSIGN)


async def _read_all(cluster: Cluster, written: dict[str, list[tuple[str, str]]]) -> list[ReadBack]:
    ctx = client_ssl_context(cluster.ca.cert_path)
    return await read_all(cluster.atsigns, cluster.directory_address, ctx, written)


def readback_table(results: list[ReadBack], moved: list[str]) -> Table:
    """One row per atSign: who serves it now and ``N/N`` writes read back."""
    table = Table(title="acknowledged writes read back after the failover")
    for col in ("atSign", "moved", "served by", "read back", "problem"):
        table.add_column(col)
    for r in results:
        where = f"{r.served_by[0]}:{r.served_by[1]}" if r.served_by else "-"
        ok = "green" if r.complete else "red"
        problem = r.error or (f"missing {', '.join(r.missing[:3])}" if r.missing else "")
        table.add_row(
            r.atsign,
            "yes" if r.atsign in moved else "",
            where,
            f"[{ok}]{r.found}/{r.written}[/{ok}]",
            problem,
        )
    return table


def _busiest(cluster: Cluster, rows: list[OwnerRow]) -> Node:
    counts = {n.name: 0 for n in cluster.nodes}
    for r in rows:
        if r.owner in counts:
            counts[r.owner] += 1
    return cluster.node(max(counts, key=lambda n: counts[n]))


async def scripted_tour(cluster: Cluster, deadline: float) -> None:
    obs = Observer(cluster)
    try:
        console.print("waiting until every atSign is served ...")
        t0 = time.monotonic()
        rows = await _wait_served(obs, deadline)
        console.print(owner_table(rows, f"all served after {time.monotonic() - t0:.1f}s"))
        written = await _write_all(cluster)
        short = {a: len(w) for a, w in written.items() if len(w) < WRITES_PER_ATSIGN}
        if short:
            raise DemoFailed(f"writes not acknowledged before the kill: {short}")
        console.print(
            f"wrote {WRITES_PER_ATSIGN} keys to each of {len(written)} atSigns "
            f"(every write acknowledged); data on {cluster.spec.storage}"
        )
        victim = _busiest(cluster, rows)
        moved = [r.atsign for r in rows if r.owner == victim.name]
        console.print(
            f"[bold red]SIGKILL node {victim.name}[/bold red] (supervisor, fence and "
            f"{len(moved)} atServers: {', '.join(moved)}); ttl is {cluster.ttl:g}s"
        )
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill_node)
        rows = await _wait_served(obs, deadline, avoid=victim.name)
        took = time.monotonic() - killed
        console.print(owner_table(rows, f"after the failover ({took:.1f}s after the kill)"))
        console.print(
            f"failover: {len(moved)} atSigns moved off {victim.name} in {took:.1f}s "
            f"(ttl {cluster.ttl:g}s)"
        )
        results = await _read_all(cluster, written)
        console.print(readback_table(results, moved))
        lost = [r.summary() for r in results if not r.complete]
        if lost:
            raise DemoFailed(f"acknowledged writes not read back: {lost}")
        total = sum(r.found for r in results)
        console.print(f"read back {total}/{total} acknowledged writes after the failover")
    finally:
        await obs.close()


async def interactive(cluster: Cluster, deadline: float) -> None:
    obs = Observer(cluster)
    loop = asyncio.get_running_loop()
    console.print(
        "Type a node name and Enter to SIGKILL that whole node "
        "(supervisor, fence, atServers), 'r NAME' to restart it, 'q' to quit."
    )
    pending: asyncio.Future[str] = loop.run_in_executor(None, sys.stdin.readline)
    message = ""
    try:
        with Live(console=console, refresh_per_second=2) as live:
            while time.monotonic() < deadline:
                rows = await obs.snapshot()
                live.update(owner_table(rows, time.strftime("%H:%M:%S ") + message))
                done, _ = await asyncio.wait({pending}, timeout=1.0)
                if not done:
                    continue
                raw = pending.result()
                if raw == "":  # end of input
                    return
                line = raw.strip()
                pending = loop.run_in_executor(None, sys.stdin.readline)
                if line in ("q", "quit", "exit"):
                    return
                if not line:
                    continue
                restart = line.startswith("r ")
                name = line[2:].strip() if restart else line
                try:
                    node = cluster.node(name)
                except KeyError as exc:
                    message = str(exc)
                    continue
                if restart:
                    node.start()
                    message = f"restarted {name}"
                else:
                    await asyncio.to_thread(node.kill_node)
                    message = f"killed {name} at {time.strftime('%H:%M:%S')}: watch the failover"
    finally:
        await obs.close()


def _print_alerts(prom: Prometheus, wait: float = 20.0) -> None:
    """The alerts firing after the tour's kill (the session alert for that node: a scrape
    every 2 s and ``for: 5s``), waiting ``wait`` seconds at most for the first one."""
    firing: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while True:
        try:
            firing = prom.alerts("firing")
        except (OSError, PrometheusError) as exc:
            console.print(f"[red]Prometheus did not answer:[/red] {exc}")
            return
        if firing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = sorted(
        f"{a['labels']['alertname']}"
        + (f" (node {a['labels']['node']})" if "node" in a["labels"] else "")
        for a in firing
    )
    console.print(f"[bold]alerts firing:[/bold] {', '.join(names) or 'none'} ({prom.url}/alerts)")


def run_demo(
    backend: str = "etcd",
    nodes: int = 4,
    atsigns: int = 6,
    duration: float = 240.0,
    base_dir: Path | None = None,
    interactive_mode: bool | None = None,
    runner: str = "process",
    storage: str = "cephfs",
    prometheus: bool = False,
) -> int:
    """Start the default local cluster and run the tour; return the exit code."""
    base = base_dir or Path(tempfile.mkdtemp(prefix="atfailover-demo-"))
    deadline = time.monotonic() + duration
    spec = ClusterSpec(
        base_dir=base,
        backend=backend,  # type: ignore[arg-type]
        nodes=nodes,
        atsigns=atsigns,
        runner=runner,  # type: ignore[arg-type]
        storage=storage,  # type: ignore[arg-type]
    )
    tty = sys.stdin.isatty() if interactive_mode is None else interactive_mode
    console.print(
        f"starting a local cluster in {base}: {backend} "
        f"({'3 members: cloud-a, cloud-b, witness' if backend == 'etcd' else 'Consul'}), "
        f"Consul agent, directory, {nodes} supervisor nodes, {atsigns} atSigns "
        f"({runner} runner), "
        + (
            "CephFS (3 mons, mgr, 3 OSDs, 2 MDS; a ceph-fuse per node)"
            if storage == "cephfs"
            else "local data directories (one machine: nodes share them)"
        )
        + " ..."
    )
    cluster = Cluster(spec)
    prom: Prometheus | None = None
    try:
        try:
            cluster.start()
            if prometheus:
                prom = start_prometheus(cluster)
        except (ClusterError, OSError, TimeoutError, PrometheusError) as exc:
            console.print(f"[red]the cluster did not come up:[/red] {exc}")
            return 1
        _print_where(cluster)
        if prom is not None:
            console.print(
                f"[bold]Prometheus:[/bold]  {prom.url} (alerts: {prom.url}/alerts; "
                f"dashboard queries: configs/grafana/atfailover.json)"
            )
        try:
            if tty:
                asyncio.run(interactive(cluster, deadline))
            else:
                asyncio.run(scripted_tour(cluster, deadline))
            if prom is not None:
                _print_alerts(prom)
        except DemoFailed as exc:
            console.print(f"[red]demo failed:[/red] {exc}")
            return 1
        except KeyboardInterrupt:
            console.print("interrupted")
        return 0
    finally:
        if prom is not None:
            prom.stop()
        console.print("stopping the cluster ...")
        cluster.stop()
        left = cluster.leftovers()
        if left:
            console.print(f"[red]still running after stop:[/red] {left}")
        else:
            console.print(f"stopped; logs stay in {base}")
