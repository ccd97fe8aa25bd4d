"""``atdirectory``: run an atDirectory replica, or ask one where an atSign lives."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from directory.config import ConfigError, DirectoryConfig, load_config
from directory.logs import configure_logging
from directory.protocol import AtSignError, atsign_key
from directory.service import DirectoryService
from directory.shards import DEFAULT_BASE, DEFAULT_SHARDS, dns_name, registrations

app = typer.Typer(
    help="The atDirectory: answers 'where is @alice?' from Consul's health data.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main() -> None:
    """The atDirectory (TLS, port 64) backed by Consul."""


async def _serve(config: DirectoryConfig) -> None:
    service = DirectoryService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()


@app.command()
def serve(
    consul: Annotated[
        str | None, typer.Option(help="Consul HTTP URL [http://127.0.0.1:8500]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [64]")] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    metrics_host: Annotated[str | None, typer.Option(help="Metrics listen address")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Metrics port, 0: any [9640]")] = None,
    service: Annotated[
        str | None, typer.Option(help="Consul service of the legacy layout [atserver]")
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(help="Layouts to follow: shard counts, 1 = legacy, e.g. 1,256 [256]"),
    ] = None,
    max_line_bytes: Annotated[int | None, typer.Option(help="Longest accepted line [512]")] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Close idle clients after s [300]")
    ] = None,
    max_connections: Annotated[int | None, typer.Option(help="Open connections [10000]")] = None,
    handshake_timeout: Annotated[float | None, typer.Option(help="TLS handshake s [10]")] = None,
    write_timeout: Annotated[
        float | None, typer.Option(help="Client must read within s [10]")
    ] = None,
    consul_wait: Annotated[
        float | None, typer.Option(help="Failing-checks query wait s [30]")
    ] = None,
    consul_list_wait: Annotated[
        float | None, typer.Option(help="Service list query wait s [300]")
    ] = None,
    consul_connect_timeout: Annotated[
        float | None, typer.Option(help="Consul connect timeout s [3]")
    ] = None,
    consul_backoff_max: Annotated[
        float | None, typer.Option(help="Longest pause between Consul retries s [5]")
    ] = None,
    consul_stale: Annotated[
        bool | None, typer.Option(help="Let any Consul server answer [no]")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json [text]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (or ATDIRECTORY_CONFIG)")
    ] = None,
) -> None:
    """Serve lookups over TLS. Settings: options > ATDIRECTORY_<NAME> env > --config file."""
    given: dict[str, Any] = {
        "consul": consul, "host": host, "port": port, "cert": cert, "key": key,
        "metrics_host": metrics_host, "metrics_port": metrics_port, "service": service,
        "shards": shards, "consul_list_wait": consul_list_wait,
        "max_line_bytes": max_line_bytes, "idle_timeout": idle_timeout,
        "max_connections": max_connections, "handshake_timeout": handshake_timeout,
        "write_timeout": write_timeout, "consul_wait": consul_wait,
        "consul_connect_timeout": consul_connect_timeout,
        "consul_backoff_max": consul_backoff_max, "consul_stale": consul_stale,
        "log_format": log_format, "log_level": log_level,
    }  # fmt: skip
    try:
        settings = load_config(given, os.environ, config)
    except ConfigError as exc:
        typer.echo(f"atdirectory: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except (OSError, ValueError) as exc:
        typer.echo(f"atdirectory: {exc}", err=True)
        raise typer.Exit(1) from None


def _lookup_once(host: str, port: int, atsign: str, ca: Path | None, timeout: float) -> str:
    import socket

    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        buf = b""
        while not buf.endswith(b"@"):
            chunk = tls.recv(1024)
            if not chunk:
                raise ConnectionError("directory closed the connection")
            buf += chunk
        tls.sendall(atsign.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n@") and not buf.endswith(b"\r\n"):
            chunk = tls.recv(1024)
            if not chunk:
                break
            buf += chunk
        tls.sendall(b"@exit\n")
    return buf.decode(errors="replace").removesuffix("@").strip()


@app.command()
def lookup(
    atsign: Annotated[str, typer.Argument(help="The atSign, e.g. @alice")],
    host: Annotated[str, typer.Option(help="Directory host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Directory port")] = 64,
    ca: Annotated[Path | None, typer.Option(help="CA certificate to trust (PEM)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for each network step")] = 5.0,
) -> None:
    """Ask a directory where ATSIGN's atServer is; exit 1 if it answers null."""
    try:
        key = atsign_key(atsign)
    except AtSignError as exc:
        typer.echo(f"atdirectory: ATSIGN {atsign!r}: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        answer = _lookup_once(host, port, key, ca, timeout)
    except (OSError, ssl.SSLError) as exc:
        typer.echo(f"atdirectory: {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(answer)
    if answer == "null" or answer.startswith("error:"):
        raise typer.Exit(1)


@app.command()
def shard(
    atsign: Annotated[str, typer.Argument(help="The atSign, e.g. @alice")],
    service: Annotated[str, typer.Option(help="Service of the legacy layout")] = DEFAULT_BASE,
    shards: Annotated[str, typer.Option(help="Shard counts, e.g. 1,256")] = f"1,{DEFAULT_SHARDS}",
    domain: Annotated[str, typer.Option(help="Consul DNS domain")] = "consul",
) -> None:
    """Where ATSIGN is registered in Consul: service, service ID and DNS name per layout."""
    try:
        counts = [int(p) for p in shards.split(",")]
    except ValueError:
        typer.echo(f"atdirectory: --shards: must be counts like 1,256, got {shards!r}", err=True)
        raise typer.Exit(2) from None
    try:
        regs = registrations(atsign, service, counts)
    except (ValueError, AtSignError) as exc:
        typer.echo(f"atdirectory: {exc}", err=True)
        raise typer.Exit(2) from None
    for reg in regs:
        typer.echo(
            f"shards={reg.shards} service={reg.service} id={reg.service_id} tag={reg.tag} "
            f"dns={dns_name(reg.service, reg.tag, domain)}"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
