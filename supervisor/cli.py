"""``supervisor``: run the node daemon, its fence, and the operator commands.

Exit codes: 0 ok, 1 the operation failed or timed out, 2 bad configuration or
arguments (the message names the file, the field and the problem).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from aiohttp import web
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from leases.base import normalize_atsign
from supervisor.api_client import bearer, client_tls, local_api_url, server_tls
from supervisor.cli_common import ConfigOpt, err, load
from supervisor.config import SupervisorConfig, is_loopback
from supervisor.registration import entry_health

app = typer.Typer(
    help=(
        "Per-node failover supervisor for atServers: together the nodes keep every atSign of "
        "the inventory running exactly once (claims on etcd or Consul, fencing tokens, Consul "
        "registration).\n\n"
        "Every command reads the node's YAML file (--config or $SUPERVISOR_CONFIG); fields can "
        "be overridden with SUPERVISOR__SECTION__FIELD=value. Exit codes: 0 ok, 1 the "
        "operation failed or timed out, 2 bad configuration or arguments. See docs/supervisor.md."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks print locals, which may hold secrets
)


REPORTS_PER_POLL = 200
"""Handoff reports asked for per /status poll while waiting (the node keeps this many)."""

FENCE_NICE = -5
"""Scheduling priority the fence asks for (lower is more CPU)."""


def _fail(message: str, code: int = 1) -> int:
    err(message)
    return code


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def _setup_logging(as_json: bool, node: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {node} %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# --- run -------------------------------------------------------------------------------------

RUNNER_THREADS = 64
"""Worker threads for blocking runner calls (the asyncio default is min(32, cores + 4))."""


def _raise_open_files_limit() -> None:
    """A node with a thousand atServers holds a pidfd and a probe socket for each."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start_fence(cfg: SupervisorConfig, config_path: Path) -> subprocess.Popen[bytes]:
    """Start the fence in its own session so signals to our process group miss it."""
    cfg.runner.state_dir.mkdir(parents=True, exist_ok=True)
    out = open(cfg.runner.state_dir / "fence.out", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor.cli",
                "fence",
                "--config",
                str(config_path.resolve()),
                "--supervisor-pid",
                str(os.getpid()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()
    (cfg.runner.state_dir / "fence.pid").write_text(str(proc.pid))
    return proc


async def _run(cfg: SupervisorConfig, config_path: Path) -> None:
    from supervisor.api import build_app, build_public_app, start_api
    from supervisor.api_auth import Credentials
    from supervisor.daemon import Supervisor
    from supervisor.metrics import SupervisorMetrics
    from supervisor.wiring import build_backend, build_node_health, build_registrar, build_runner

    log = logging.getLogger("supervisor")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Runner calls block in threads (docker SDK, psutil, waiting for a process to exit):
    # enough of them that a thousand stops at shutdown do not queue six at a time.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=RUNNER_THREADS))
    _raise_open_files_limit()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (a terminal hang-up, `systemctl reload`) must not take the node's atSigns
    # down: its default action would kill us without a clean shutdown. Nothing in the
    # node file is reloaded in place (see docs/supervisor.md, Signals).
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning(
            "event=sighup action=ignored detail='nothing is reloaded; restart the node "
            "(SIGTERM, then start) to apply a changed config'"
        ),
    )
    try:
        backend = build_backend(cfg)
        runner = build_runner(cfg)
        registrar = build_registrar(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        raise typer.Exit(_fail(f"{config_path}: cannot set up the node: {exc}")) from None
    registry = CollectorRegistry()
    holder: dict[str, Supervisor] = {}
    metrics = SupervisorMetrics(
        registry,
        claims_held=lambda: float(len(holder["sup"].held())),
        workloads_running=lambda: float(
            sum(1 for w in holder["sup"].ctx.workloads.items.values() if w.state.value == "running")
        ),
        session_alive=lambda: 1.0 if holder["sup"].ready else 0.0,
        draining=lambda: 1.0 if holder["sup"].state.draining else 0.0,
        consul_requests=lambda: float(registrar.calls),
    )
    sup = Supervisor(
        cfg,
        backend=backend,
        runner=runner,
        registrar=registrar,
        metrics=metrics,
        session_backend=lambda: build_backend(cfg),  # the keeper's own, on its own loop
        node_health=build_node_health(cfg),
    )
    holder["sup"] = sup
    credentials = Credentials.from_config(cfg.http.auth) if cfg.http.auth is not None else None
    listeners: list[web.AppRunner] = []
    try:
        listeners.append(
            await start_api(
                build_app(sup, metrics, credentials),
                cfg.http.host,
                cfg.http.port,
                server_tls(cfg.http),
            )
        )
        field, where = "http.public_listen", cfg.http.public
        if where is not None:
            host, _, port = where.rpartition(":")
            listeners.append(
                await start_api(build_public_app(sup, metrics), host.strip("[]"), int(port))
            )
    except OSError as exc:
        if not listeners:
            field, where = "http.listen", cfg.http.listen
        for listener in listeners:
            await listener.cleanup()
        await registrar.close()
        await backend.close()
        message = f"{config_path}: {field}: cannot listen on {where}: {exc.strerror}"
        raise typer.Exit(_fail(message)) from None
    if credentials is None and not is_loopback(cfg.http.host):
        log.warning(
            "event=api-unauthenticated listen=%s detail='anyone who reaches it can drain this "
            "node (http.allow_unauthenticated)'",
            cfg.http.listen,
        )
    # The fence starts before anything can run, and outlives us if we are killed.
    fence = _start_fence(cfg, config_path)
    log.info("event=fence-started pid=%d", fence.pid)
    log.info(
        "event=started node=%s api=%s auth=%s public=%s",
        cfg.node.name,
        sup.api_url,
        "on" if credentials is not None else "off",
        cfg.http.public or "-",
    )
    try:
        await sup.run(stop)
    finally:
        for listener in listeners:
            await listener.cleanup()
        with contextlib.suppress(Exception):
            await backend.close()
        # The fence exits by itself after the 'stopped' heartbeat; make sure of it.
        for _ in range(50):
            if fence.poll() is not None:
                break
            await asyncio.sleep(0.1)
        if fence.poll() is None:
            fence.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                fence.wait(timeout=5)


@app.command()
def run(config: ConfigOpt) -> None:
    """Run this node's supervisor (and its fence) until SIGTERM/SIGINT."""
    cfg = load(config)
    _setup_logging(cfg.log_json, cfg.node.name)
    asyncio.run(_run(cfg, config))


@app.command()
def fence(
    config: ConfigOpt,
    supervisor_pid: Annotated[int, typer.Option(help="the supervisor this fence guards")],
) -> None:
    """The companion fence (started by `run`): stops the node's workloads on a stale heartbeat."""
    from supervisor.deadline import within
    from supervisor.fence import Fence
    from supervisor.timing import build_timing, fence_poll_interval
    from supervisor.wiring import build_backend, build_runner

    cfg = load(config)
    _setup_logging(cfg.log_json, f"{cfg.node.name}-fence")
    timing = build_timing(cfg)

    async def main() -> None:
        backend = build_backend(cfg)  # connects lazily: only if a session is to be ended

        async def release(session_id: str) -> None:
            await within(backend.revoke_session(session_id, timing.ttl / 2), timing.ttl / 2)

        f = Fence(
            build_runner(cfg),
            cfg.heartbeat_path,
            cfg.fence_log_path,
            supervisor_pid=supervisor_pid,
            poll_interval=fence_poll_interval(timing),
            kill_grace=max(0.1, timing.stop_budget / 3),
            session_record=cfg.session_record_path,
            release_session=release,
            session_ttl=timing.ttl,
        )
        try:
            await f.run()
        finally:
            with contextlib.suppress(Exception):
                await backend.close()

    # The fence ignores SIGINT/SIGHUP meant for the supervisor's terminal or group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A busy host must not starve the fence past the claim's expiry: ask for a better
    # scheduling priority (works as root or with CAP_SYS_NICE; otherwise keep the default).
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, FENCE_NICE)
    asyncio.run(main())


@app.command("check-config")
def check_config(config: ConfigOpt) -> None:
    """Validate a node file (exit 2 with the problem if it is wrong)."""
    from supervisor.timing import build_timing

    cfg = load(config)
    t = build_timing(cfg)
    typer.echo(
        f"{config}: ok (node {cfg.node.name}, {cfg.dcs.backend}, ttl {t.ttl:g}s, renew every "
        f"{t.renew_interval:g}s, self-fence after {t.renew_deadline:g}s, "
        f"{len(cfg.inventory.atsigns)} atSigns, node API {cfg.http.scheme} "
        f"{'with tokens' if cfg.http.auth is not None else 'without credentials'})"
    )


# --- operator commands over the node's HTTP API ----------------------------------------------


async def _api(cfg: SupervisorConfig, method: str, path: str, body: Any = None) -> Any:
    url = local_api_url(cfg.http, cfg.node) + path
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(
            method,
            url,
            json=body,
            headers=bearer(cfg.http.auth.operator_token if cfg.http.auth else None),
            ssl=client_tls(cfg.http) or True,
        ) as resp,
    ):
        data = await resp.json(content_type=None)
        if resp.status in (401, 403):
            raise RuntimeError(f"refused ({resp.status}): {data.get('error')}")
        if resp.status >= 400:
            raise RuntimeError(data.get("error") or f"HTTP {resp.status}")
        return data


def _call(cfg: SupervisorConfig, method: str, path: str, body: Any = None) -> Any:
    try:
        return asyncio.run(_api(cfg, method, path, body))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        err(f"cannot reach the supervisor of {cfg.node.name} at {cfg.http.listen}: {exc}")
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        err(f"{cfg.node.name}: {exc}")
        raise typer.Exit(1) from None


def _print_reports(reports: list[dict[str, Any]]) -> None:
    for r in reports:
        if r["unavailable_s"] is not None:
            typer.echo(f"{r['atsign']}: moved to {r['to_node']}, unavailable {r['unavailable_s']}s")
        else:
            typer.echo(f"{r['atsign']}: {r['note'] or 'handed off'}")


def _reports_after(st: dict[str, Any], seq: int) -> list[dict[str, Any]]:
    """Finished handoff reports newer than ``seq`` (reports are numbered 1, 2, 3, ...)."""
    return [r for r in st["handoff_reports"] if int(r.get("seq", 0)) > seq]


@app.command()
def drain(
    config: ConfigOpt,
    wait: Annotated[bool, typer.Option(help="wait until every atSign moved")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
) -> None:
    """Move every atSign off this node, one by one; then claim nothing until `resume`."""
    cfg = load(config)
    seen = int(_call(cfg, "GET", "/status?reports=0").get("handoff_reports_total", 0))
    typer.echo(_call(cfg, "POST", "/drain")["message"])
    if not wait:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _call(cfg, "GET", f"/status?reports={REPORTS_PER_POLL}")
        fresh = _reports_after(st, seen)
        _print_reports(fresh)
        seen = max([seen, *(int(r["seq"]) for r in fresh)])
        if st["drained"]:
            typer.echo(f"{cfg.node.name} drained: holding nothing")
            return
        time.sleep(0.2)
    err(f"{cfg.node.name} not drained after {timeout:g}s")
    raise typer.Exit(1)


@app.command()
def resume(config: ConfigOpt) -> None:
    """Let a drained node claim atSigns again."""
    cfg = load(config)
    typer.echo(_call(cfg, "POST", "/resume")["message"])


@app.command()
def handoff(
    atsign: Annotated[str, typer.Argument(help="the atSign to move, e.g. @alice")],
    config: ConfigOpt,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 120.0,
) -> None:
    """Hand one atSign off to a standby now (planned: stop, deregister, release).

    Give the config of the node that holds the atSign; it waits until another node serves it.
    """
    cfg = load(config)
    try:
        name = normalize_atsign(atsign)
    except ValueError as exc:
        err(f"ATSIGN: {exc}")
        raise typer.Exit(2) from None
    seen = int(_call(cfg, "GET", "/status?reports=0").get("handoff_reports_total", 0))
    typer.echo(_call(cfg, "POST", "/handoff", {"atsign": name})["message"])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _call(cfg, "GET", f"/status?reports={REPORTS_PER_POLL}")
        mine = [r for r in _reports_after(st, seen) if r["atsign"] == name]
        if mine:
            _print_reports(mine[-1:])
            return
        time.sleep(0.2)
    err(f"{name}: no standby took over within {timeout:g}s")
    raise typer.Exit(1)


async def _status_rows(
    cfg: SupervisorConfig,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(a row per atSign, the live node records)."""
    from supervisor.wiring import build_backend, build_registrar

    backend = build_backend(cfg)
    registrar = build_registrar(cfg)
    try:
        from supervisor.deadline import within

        claims = await within(backend.owners(), 10)
        generations = await within(backend.generations(), 10)
        node_records = await within(backend.nodes(), 10)
        listed = {a.atsign for a in cfg.inventory.atsigns}
        if cfg.inventory.source == "dcs":
            records, _ = await within(backend.atsign_records(), 10)
            listed = {a for a, r in records.items() if not r.disabled}
        entries = await registrar.health(atsigns=listed | set(claims))
    finally:
        await backend.close()
        await registrar.close()
    health: dict[str, dict[str, str]] = {}
    for e in entries:
        meta = (e.get("Service") or {}).get("Meta") or {}
        per_node = health.setdefault(meta.get("atsign", ""), {})
        node, state = meta.get("node", ""), entry_health(e)
        if per_node.get(node) != "passing":  # one per layout while migrating: passing wins
            per_node[node] = state
    refused: dict[str, dict[str, str]] = {}
    for name, rec in node_records.items():
        for atsign, reason in (rec.get("refused") or {}).items():
            refused.setdefault(atsign, {})[name] = str(reason)
    rows = []
    atsigns = sorted(listed | set(claims))
    for atsign in atsigns:
        c = claims.get(atsign)
        g = generations.get(atsign)
        node = c.info.node if c else None
        if c:
            state = health.get(atsign, {}).get(node or "", "unregistered")
        elif atsign in refused:
            # The data guard: no node with current data is serving it (visible, never empty).
            state = "stale-data@" + ",".join(sorted(refused[atsign]))
        else:
            state = "unclaimed"
        rows.append(
            {
                "atsign": atsign,
                "owner": node,
                "cloud": c.info.cloud if c else None,
                "token": c.token if c else None,
                "health": state,
                "since": float(c.info.extra.get("since", 0) or 0) if c else None,
                "generation": g.token if g else None,
                "generation_node": (g.accepted_by or g.node) if g else None,
                "refused": refused.get(atsign, {}),
            }
        )
    return rows, node_records


@app.command()
def status(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every atSign's owner, cloud, token, health, generation and since (DCS and Consul).

    Health ``stale-data@b1`` means no node serves the atSign and node b1 refused to, because
    its data dir is not the atSign's latest (see `supervisor data accept`).
    """
    cfg = load(config)
    try:
        rows, members = asyncio.run(_status_rows(cfg))
    except Exception as exc:
        err(f"cannot read the DCS/Consul: {exc!r}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"atSigns ({cfg.dcs.backend} prefix {cfg.dcs.prefix})")
    for col in ("atSign", "owner", "cloud", "token", "health", "generation", "since"):
        table.add_column(col)
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])) if r["since"] else ""
        gen = f"{r['generation']} ({r['generation_node']})" if r["generation"] else "-"
        table.add_row(
            r["atsign"],
            r["owner"] or "-",
            r["cloud"] or "-",
            str(r["token"] or "-"),
            r["health"],
            gen,
            since,
        )
    Console().print(table)
    for r in rows:
        for node, reason in sorted(r["refused"].items()):
            typer.echo(f"{r['atsign']}: refused by {node}: {reason}")
    live = ", ".join(f"{n} ({rec.get('cloud', '?')})" for n, rec in sorted(members.items()))
    typer.echo(f"live nodes: {live or 'none'}")


@app.command()
def nodes(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The live members: every node whose session publishes its record in the DCS."""
    from supervisor.deadline import within
    from supervisor.wiring import build_backend

    cfg = load(config)

    async def read() -> dict[str, dict[str, Any]]:
        backend = build_backend(cfg)
        try:
            return await within(backend.nodes(), 10)
        finally:
            await backend.close()

    try:
        records = asyncio.run(read())
    except Exception as exc:
        err(f"cannot read the DCS: {exc!r}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(records, indent=2, sort_keys=True))
        return
    table = Table(title=f"live nodes ({cfg.dcs.backend} prefix {cfg.dcs.prefix})")
    for col in ("node", "cloud", "zone", "address", "api", "capacity", "storage", "draining"):
        table.add_column(col)
    for name, r in sorted(records.items()):
        storage = r.get("storage") or {}
        table.add_row(
            name,
            str(r.get("cloud", "-")),
            str(r.get("zone") or "-"),
            str(r.get("address", "-")),
            str(r.get("api") or "-"),
            str(r.get("capacity", "-")),
            "ready" if storage.get("ready", True) else f"not ready: {storage.get('reason', '')}",
            "yes" if r.get("draining") else "no",
        )
    Console().print(table)


def _register_subcommands() -> None:
    from supervisor.atsigns_cli import atsigns_app
    from supervisor.data_cli import data_app

    app.add_typer(data_app, name="data")
    app.add_typer(atsigns_app, name="atsigns")


_register_subcommands()

if __name__ == "__main__":
    app()
