"""``python -m atserver_runner.devserver``: run one dev atServer until SIGTERM.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 could not start (TLS files, port, storage);
2 bad arguments; 3 the fence file holds a higher token (refused to start);
4 a higher token took over while serving (stopped); 5 the storage stopped answering (stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from atserver_runner.devserver import CRAM_SECRET_ENV
from atserver_runner.devserver.fence import FenceError, FenceFileCorrupt
from atserver_runner.devserver.protocol import ProtocolError, normalize_atsign
from atserver_runner.devserver.server import (
    EXIT_ERROR,
    EXIT_FENCED_AT_START,
    EXIT_USAGE,
    DevServer,
    DevServerConfig,
    log_event,
)
from atserver_runner.devserver.store import StoreCorrupt


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("ATSERVER_" + name.upper().replace("-", "_"), default)


def parse_args(args: Sequence[str]) -> DevServerConfig:
    """Command line (with ATSERVER_* environment defaults) -> config; exits 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog="python -m atserver_runner.devserver",
        description="Dev atServer for one atSign (TLS, at protocol, fencing token). "
        "Every option defaults to the environment variable ATSERVER_<OPTION>.",
    )
    ap.add_argument("--atsign", default=_env("atsign"), help="the atSign served, e.g. @alice")
    ap.add_argument("--host", default=_env("host", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=_env("port"))
    ap.add_argument("--data-dir", type=Path, default=_env("data-dir"))
    ap.add_argument("--fencing-token", type=int, default=_env("fencing-token"))
    ap.add_argument("--cert", type=Path, default=_env("cert"), help="TLS certificate chain (PEM)")
    ap.add_argument("--key", type=Path, default=_env("key"), help="TLS private key (PEM)")
    ap.add_argument(
        "--cram-secret-file",
        type=Path,
        default=_env("cram-secret-file"),
        help=f"file holding the CRAM secret for onboarding (or env {CRAM_SECRET_ENV})",
    )
    ap.add_argument(
        "--pkam-public-key-file",
        type=Path,
        default=_env("pkam-public-key-file"),
        help="file holding the PKAM public key (base64 DER) to install instead of onboarding",
    )
    ap.add_argument(
        "--pkam-public-key",
        default=_env("pkam-public-key"),
        help="the PKAM public key itself (base64 DER), e.g. from the environment in a container",
    )
    ap.add_argument(
        "--max-line-bytes", type=int, default=int(_env("max-line-bytes", "1048576") or 0)
    )
    ap.add_argument("--fence-poll", type=float, default=float(_env("fence-poll", "1.0") or 0))
    ap.add_argument("--idle-timeout", type=float, default=float(_env("idle-timeout", "600") or 0))
    ap.add_argument("--max-connections", type=int, default=int(_env("max-connections", "256") or 0))
    ap.add_argument("--write-timeout", type=float, default=float(_env("write-timeout", "30") or 0))
    ap.add_argument("--log-json", action="store_true", default=_env("log-json") == "1")
    ns = ap.parse_args(list(args))
    for name in ("atsign", "port", "data_dir", "fencing_token", "cert", "key"):
        if getattr(ns, name) is None:
            ap.error(f"--{name.replace('_', '-')} is required (or ATSERVER_{name.upper()})")
    try:
        atsign = normalize_atsign(ns.atsign)
    except ProtocolError as exc:
        ap.error(f"--atsign: {exc.detail}")
    if not 0 < ns.port < 65536:
        ap.error(f"--port: {ns.port} is not a TCP port")
    if ns.fencing_token < 0:
        ap.error(f"--fencing-token: must be >= 0, got {ns.fencing_token}")
    if ns.max_connections < 1:
        ap.error(f"--max-connections: must be at least 1, got {ns.max_connections}")
    for name in ("idle_timeout", "write_timeout", "fence_poll"):
        if getattr(ns, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: must be > 0, got {getattr(ns, name)}")
    if ns.max_line_bytes < 1024:
        ap.error("--max-line-bytes: must be at least 1024")
    for name in ("cert", "key"):
        path: Path = getattr(ns, name)
        if not path.is_file():
            ap.error(f"--{name}: {path} is not a readable file")
    cram_secret = os.environ.get(CRAM_SECRET_ENV)
    if ns.cram_secret_file is not None:
        try:
            cram_secret = ns.cram_secret_file.read_text().strip()
        except OSError as exc:
            ap.error(f"--cram-secret-file: {exc}")
    pkam_key = ns.pkam_public_key
    if ns.pkam_public_key_file is not None:
        try:
            pkam_key = ns.pkam_public_key_file.read_text().strip()
        except OSError as exc:
            ap.error(f"--pkam-public-key-file: {exc}")
    return DevServerConfig(
        atsign=atsign,
        host=ns.host,
        port=ns.port,
        data_dir=ns.data_dir,
        fencing_token=ns.fencing_token,
        cert=ns.cert,
        key=ns.key,
        cram_secret=cram_secret or None,
        pkam_public_key=pkam_key,
        max_line_bytes=ns.max_line_bytes,
        fence_poll_s=ns.fence_poll,
        idle_timeout_s=ns.idle_timeout,
        max_connections=ns.max_connections,
        write_timeout_s=ns.write_timeout,
        json_logs=ns.log_json,
    )


async def serve(config: DevServerConfig) -> int:
    """Run until SIGTERM/SIGINT or until fenced; return the exit code."""
    server = DevServer(config)
    try:
        await server.start()
    except FenceError as exc:
        log_event(
            "refused_to_start", json_logs=config.json_logs, atsign=config.atsign, reason=str(exc)
        )
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FENCED_AT_START
    except (OSError, ValueError, StoreCorrupt, FenceFileCorrupt) as exc:
        log_event("start_failed", json_logs=config.json_logs, atsign=config.atsign, reason=str(exc))
        print(
            f"error: cannot start the dev atServer for {config.atsign}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        server.backend.close()
        return EXIT_ERROR
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    return await server.wait()


def main(args: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(sys.argv[1:] if args is None else args)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
