"""``python -m chaos``: the demo and chaos runs on a local cluster.

Exit codes: 0 ok; 1 something did not come up, a bound was missed, or the checker found a
violation; 2 bad arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Local cluster demo and chaos runs for the atSign failover layer.", no_args_is_help=True
)


@app.callback()
def main() -> None:
    """Local cluster demo and chaos runs for the atSign failover layer."""


def _backend(value: str) -> str:
    if value not in ("etcd", "consul"):
        raise typer.BadParameter(f"must be etcd or consul, got {value!r}")
    return value


@app.command()
def demo(
    backend: Annotated[str, typer.Option(callback=_backend, help="etcd or consul")] = "etcd",
    nodes: Annotated[int, typer.Option(min=2, max=8, help="supervisor nodes")] = 4,
    atsigns: Annotated[int, typer.Option(min=1, max=50, help="atSigns")] = 6,
    duration: Annotated[
        float, typer.Option(min=30, help="overall bound in seconds (the tour fails after it)")
    ] = 240.0,
    base_dir: Annotated[
        Path | None, typer.Option(help="where configs, data and logs go [a new temp dir]")
    ] = None,
    interactive: Annotated[
        bool | None,
        typer.Option(help="live table and kill prompt [when stdin is a terminal]"),
    ] = None,
    runner: Annotated[
        str, typer.Option(help="process, or docker (builds the dev image if needed)")
    ] = "process",
    storage: Annotated[
        str,
        typer.Option(
            help="cephfs (a Ceph cluster for the demo, each node its own mount) or local "
            "(one directory on this machine that every node shares: development only)"
        ),
    ] = "cephfs",
    prometheus: Annotated[
        bool,
        typer.Option(
            "--prometheus",
            help="also start a Prometheus (Debian's package) scraping the cluster with the "
            "shipped rules, and print its URL (docs/observability.md)",
        ),
    ] = False,
) -> None:
    """Start a local cluster, show who owns what, fail a node over, read the data back."""
    from chaos.demo import run_demo

    if runner not in ("process", "docker"):
        raise typer.BadParameter(f"--runner must be process or docker, got {runner!r}")
    if storage not in ("cephfs", "local"):
        raise typer.BadParameter(f"--storage must be cephfs or local, got {storage!r}")
    raise typer.Exit(
        run_demo(
            backend, nodes, atsigns, duration, base_dir, interactive, runner, storage, prometheus
        )
    )


def _recovery_table(by_kind: dict[str, dict[str, object]], title: str) -> object:
    from rich.table import Table

    table = Table(title=f"recovery per fault kind ({title})")
    for col in ("kind", "faults", "with outage", "p50 s", "p99 s", "max s"):
        table.add_column(col)
    for k, v in by_kind.items():
        table.add_row(k, str(v["faults"]), str(v["with_outage"]), str(v["recovery_p50_s"]),
                      str(v["recovery_p99_s"]), str(v["recovery_max_s"]))  # fmt: skip
    return table


def _session_table(losses: dict[str, Any]) -> object:
    from rich.table import Table

    left = losses["unattributed"]
    table = Table(
        title="nodes' session losses per fault (an etcd member fault by the member's role); "
        f"outside any fault: {left['losses']} losses, {left['rechecks']} rechecks"
    )
    for col in ("fault", "faults", "with a session loss", "losses", "rechecks"):
        table.add_column(col)
    for group, v in losses["by_group"].items():
        table.add_row(group, str(v["faults"]), str(v["with_session_loss"]), str(v["losses"]),
                      str(v["rechecks"]))  # fmt: skip
    return table


@app.command()
def check(
    report: Annotated[Path, typer.Argument(help="a report directory of `chaos run`")],
) -> None:
    """Run the checker again on a run's saved histories (also of an interrupted run)."""
    from rich.console import Console

    from chaos.run import recheck, recheck_session_losses

    if not (report / "client-ops.jsonl").is_file() or not (report / "cluster").is_dir():
        raise typer.BadParameter(f"{report} has no client-ops.jsonl and cluster/ of a chaos run")
    verdict = recheck(report)
    out = Console()
    out.print(_recovery_table(verdict.recovery_by_kind(), str(report)))
    out.print(_session_table(recheck_session_losses(report)))
    out.print(
        f"{len(verdict.outcomes)} faults, {len(verdict.violations)} violations, "
        f"{len(verdict.fenced_overlaps)} fenced overlaps (frozen owners), "
        f"{verdict.acknowledged_writes} acknowledged writes"
    )
    for v in verdict.violations[:20]:
        out.print(f"[red]{v.check}[/red] {v.atsign}: {v.detail}")
    raise typer.Exit(0 if verdict.ok else 1)


@app.command()
def run(
    backend: Annotated[str, typer.Option(callback=_backend, help="etcd or consul")] = "etcd",
    nodes: Annotated[int, typer.Option(min=2, max=8, help="supervisor nodes")] = 3,
    atsigns: Annotated[int, typer.Option(min=1, max=50, help="atSigns")] = 4,
    faults: Annotated[int, typer.Option(min=0, help="how many faults to inject")] = 10,
    seed: Annotated[int, typer.Option(help="seed of the fault schedule")] = 1,
    report: Annotated[Path, typer.Option(help="directory for report.json and timeline.png")] = Path(
        "chaos-report"
    ),
    ttl: Annotated[
        float | None, typer.Option(help="claim ttl in seconds [etcd 6, consul 10]")
    ] = None,
    kind: Annotated[
        list[str] | None, typer.Option(help="only these fault kinds (repeatable)")
    ] = None,
    data_roots: Annotated[
        str,
        typer.Option(
            help="shared (one data root, the data follows the claim) or per-node (a disk per "
            "node: the data guard refuses takeovers from a copy that is not the latest)"
        ),
    ] = "shared",
    storage: Annotated[
        str,
        typer.Option(
            help="cephfs (a Ceph cluster for the run, each node its own mount; adds the "
            "kill-osd, kill-active-mds and freeze-node faults) or local (--data-roots)"
        ),
    ] = "cephfs",
    session_checks: Annotated[
        bool,
        typer.Option(
            help="Consul: bind each node's session to its agent's serfHealth and a 2.5 s TTL "
            "check (renew 1 s, self-fence after 3 s, lock-delay 5 s)"
        ),
    ] = False,
) -> None:
    """Inject a seeded schedule of faults, check the histories, write a report."""
    from rich.console import Console

    from chaos.cluster import ClusterError
    from chaos.faults import kinds_for
    from chaos.run import RunOptions, run_chaos

    if data_roots not in ("shared", "per-node"):
        raise typer.BadParameter(f"--data-roots must be shared or per-node, got {data_roots!r}")
    if storage not in ("cephfs", "local"):
        raise typer.BadParameter(f"--storage must be cephfs or local, got {storage!r}")
    if session_checks and backend != "consul":
        raise typer.BadParameter(
            f"--session-checks is a Consul setting; --backend is {backend}",
            param_hint="--session-checks",
        )
    valid = kinds_for(backend, partition=True, opt_in=True, storage=storage)
    for k in kind or []:
        if k not in valid:
            raise typer.BadParameter(
                f"{k!r} is not a fault kind for {backend} on {storage} storage: {list(valid)}"
            )
    opts = RunOptions(
        backend=backend, nodes=nodes, atsigns=atsigns, faults=faults, seed=seed,
        report_dir=report, ttl=ttl, kinds=tuple(kind or ()), data_roots=data_roots,
        storage=storage, session_checks=session_checks,
    )  # fmt: skip
    out = Console()
    try:
        result = run_chaos(opts)
    except ClusterError as exc:
        out.print(f"[red]the cluster did not come up or settle:[/red] {exc}")
        raise typer.Exit(1) from None
    r = result.report
    out.print(_recovery_table(r["recovery_by_kind"], f"{backend}, ttl {r['ttl']:g}s"))
    out.print(_session_table(r["session_losses"]))
    out.print(
        f"{len(r['violations'])} violations, {r['lost_writes']} lost writes, "
        f"{len(r['fenced_overlaps'])} fenced overlaps (frozen owners), "
        f"{r['acknowledged_writes']} acknowledged writes "
        f"({r['verified_through_other_mounts']} also read through another node's mount), "
        f"{r['stale_data_refusals']} stale-data refusals, {r['duration_s']}s; "
        f"report {result.report_path}, timeline {result.timeline_path}"
    )
    for v in r["violations"][:20]:
        out.print(f"[red]{v['check']}[/red] {v['atsign']}: {v['detail']}")
    for note in r["notes"]:
        out.print(f"[yellow]note:[/yellow] {note}")
    raise typer.Exit(0 if result.verdict.ok and not r["notes"] else 1)


if __name__ == "__main__":
    app()
