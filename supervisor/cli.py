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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from leases.base import normalize_atsign
from supervisor.config import ConfigError, SupervisorConfig, load_config

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


FENCE_NICE = -5
"""Scheduling priority the fence asks for (lower is more CPU)."""


def _err(message: str) -> None:
    """One plain line on stderr (no markup: messages quote user input like [low, high])."""
    typer.echo(message, err=True)


def _fail(message: str, code: int = 1) -> int:
    _err(message)
    return code


ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="SUPERVISOR_CONFIG", help="the node's YAML file"),
]


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


def _load(path: Path) -> SupervisorConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        _err(f"config error: {exc}")
        raise typer.Exit(2) from None


# --- run -------------------------------------------------------------------------------------


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
    from supervisor.api import build_app, start_api
    from supervisor.daemon import Supervisor
    from supervisor.metrics import SupervisorMetrics
    from supervisor.wiring import build_backend, build_registrar, build_runner

    log = logging.getLogger("supervisor")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
            sum(1 for w in holder["sup"].state.workloads.values() if w.state.value == "running")
        ),
        session_alive=lambda: 1.0 if holder["sup"].ready else 0.0,
        draining=lambda: 1.0 if holder["sup"].state.draining else 0.0,
    )
    sup = Supervisor(cfg, backend=backend, runner=runner, registrar=registrar, metrics=metrics)
    holder["sup"] = sup
    try:
        api = await start_api(build_app(sup, metrics), cfg.http.host, cfg.http.port)
    except OSError as exc:
        await registrar.close()
        await backend.close()
        message = f"{config_path}: http.listen: cannot listen on {cfg.http.listen}: {exc.strerror}"
        raise typer.Exit(_fail(message)) from None
    # The fence starts before anything can run, and outlives us if we are killed.
    fence = _start_fence(cfg, config_path)
    log.info("event=fence-started pid=%d", fence.pid)
    log.info("event=started node=%s api=%s", cfg.node.name, sup.api_url)
    try:
        await sup.run(stop)
    finally:
        await api.cleanup()
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
    cfg = _load(config)
    _setup_logging(cfg.log_json, cfg.node.name)
    asyncio.run(_run(cfg, config))


@app.command()
def fence(
    config: ConfigOpt,
    supervisor_pid: Annotated[int, typer.Option(help="the supervisor this fence guards")],
) -> None:
    """The companion fence (started by `run`): stops the node's workloads on a stale heartbeat."""
    from supervisor.fence import Fence
    from supervisor.timing import build_timing, fence_poll_interval
    from supervisor.wiring import build_runner

    cfg = _load(config)
    _setup_logging(cfg.log_json, f"{cfg.node.name}-fence")
    timing = build_timing(cfg)

    async def main() -> None:
        f = Fence(
            build_runner(cfg),
            cfg.heartbeat_path,
            cfg.fence_log_path,
            supervisor_pid=supervisor_pid,
            poll_interval=fence_poll_interval(timing),
            kill_grace=max(0.1, timing.stop_budget / 3),
        )
        await f.run()

    # The fence ignores SIGINT/SIGTERM meant for the supervisor's terminal or group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A busy host must not starve the fence past the claim's expiry: ask for a better
    # scheduling priority (works as root or with CAP_SYS_NICE; otherwise keep the default).
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, FENCE_NICE)
    asyncio.run(main())


@app.command("check-config")
def check_config(config: ConfigOpt) -> None:
    """Validate a node file (exit 2 with the problem if it is wrong)."""
    from supervisor.timing import build_timing

    cfg = _load(config)
    t = build_timing(cfg)
    typer.echo(
        f"{config}: ok (node {cfg.node.name}, {cfg.dcs.backend}, ttl {t.ttl:g}s, renew every "
        f"{t.renew_interval:g}s, self-fence after {t.renew_deadline:g}s, "
        f"{len(cfg.inventory.atsigns)} atSigns)"
    )


# --- operator commands over the node's HTTP API ----------------------------------------------


async def _api(cfg: SupervisorConfig, method: str, path: str, body: Any = None) -> Any:
    host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{cfg.http.port}{path}"
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, json=body) as resp,
    ):
        data = await resp.json()
        if resp.status >= 400:
            raise RuntimeError(data.get("error") or f"HTTP {resp.status}")
        return data


def _call(cfg: SupervisorConfig, method: str, path: str, body: Any = None) -> Any:
    try:
        return asyncio.run(_api(cfg, method, path, body))
    except (aiohttp.ClientError, TimeoutError) as exc:
        _err(f"cannot reach the supervisor of {cfg.node.name} at {cfg.http.listen}: {exc}")
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        _err(f"{cfg.node.name}: {exc}")
        raise typer.Exit(1) from None


def _print_reports(reports: list[dict[str, Any]]) -> None:
    for r in reports:
        if r["unavailable_s"] is not None:
            typer.echo(f"{r['atsign']}: moved to {r['to_node']}, unavailable {r['unavailable_s']}s")
        else:
            typer.echo(f"{r['atsign']}: {r['note'] or 'handed off'}")


@app.command()
def drain(
    config: ConfigOpt,
    wait: Annotated[bool, typer.Option(help="wait until every atSign moved")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
) -> None:
    """Move every atSign off this node, one by one; then claim nothing until `resume`."""
    cfg = _load(config)
    earlier = len(_call(cfg, "GET", "/status")["handoff_reports"])
    typer.echo(_call(cfg, "POST", "/drain")["message"])
    if not wait:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _call(cfg, "GET", "/status")
        if st["drained"]:
            _print_reports(st["handoff_reports"][earlier:])
            typer.echo(f"{cfg.node.name} drained: holding nothing")
            return
        time.sleep(0.2)
    _err(f"{cfg.node.name} not drained after {timeout:g}s")
    raise typer.Exit(1)


@app.command()
def resume(config: ConfigOpt) -> None:
    """Let a drained node claim atSigns again."""
    cfg = _load(config)
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
    cfg = _load(config)
    try:
        name = normalize_atsign(atsign)
    except ValueError as exc:
        _err(f"ATSIGN: {exc}")
        raise typer.Exit(2) from None
    typer.echo(_call(cfg, "POST", "/handoff", {"atsign": name})["message"])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _call(cfg, "GET", "/status")
        mine = [r for r in st["handoff_reports"] if r["atsign"] == name]
        if mine:
            _print_reports(mine[-1:])
            return
        time.sleep(0.2)
    _err(f"{name}: no standby took over within {timeout:g}s")
    raise typer.Exit(1)


async def _status_rows(cfg: SupervisorConfig) -> list[dict[str, Any]]:
    from supervisor.wiring import build_backend, build_registrar

    backend = build_backend(cfg)
    registrar = build_registrar(cfg)
    try:
        from supervisor.deadline import within

        claims = await within(backend.owners(), 10)
        entries = await registrar.health()
    finally:
        await backend.close()
        await registrar.close()
    health: dict[str, dict[str, str]] = {}
    for e in entries:
        meta = (e.get("Service") or {}).get("Meta") or {}
        checks = [c for c in e.get("Checks", []) if c.get("ServiceID")]
        state = (
            "passing"
            if checks and all(c["Status"] == "passing" for c in checks)
            else ("critical" if checks else "unknown")
        )
        health.setdefault(meta.get("atsign", ""), {})[meta.get("node", "")] = state
    rows = []
    atsigns = sorted({a.atsign for a in cfg.inventory.atsigns} | set(claims))
    for atsign in atsigns:
        c = claims.get(atsign)
        node = c.info.node if c else None
        rows.append(
            {
                "atsign": atsign,
                "owner": node,
                "cloud": c.info.cloud if c else None,
                "token": c.token if c else None,
                "health": health.get(atsign, {}).get(node or "", "unregistered")
                if c
                else "unclaimed",
                "since": float(c.info.extra.get("since", 0) or 0) if c else None,
            }
        )
    return rows


@app.command()
def status(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every atSign's owner, cloud, token, health and since, read from the DCS and Consul."""
    cfg = _load(config)
    try:
        rows = asyncio.run(_status_rows(cfg))
    except Exception as exc:
        _err(f"cannot read the DCS/Consul: {exc!r}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"atSigns ({cfg.dcs.backend} prefix {cfg.dcs.prefix})")
    for col in ("atSign", "owner", "cloud", "token", "health", "since"):
        table.add_column(col)
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])) if r["since"] else ""
        table.add_row(
            r["atsign"],
            r["owner"] or "-",
            r["cloud"] or "-",
            str(r["token"] or "-"),
            r["health"],
            since,
        )
    Console().print(table)


if __name__ == "__main__":
    app()
