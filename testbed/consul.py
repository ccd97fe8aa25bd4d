"""A real Consul agent on loopback ports: a dev agent, or a one-server agent with a data dir."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

from testbed.ports import free_port
from testbed.process import ManagedProcess, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent


def consul_binary() -> str:
    """``consul`` on PATH, else the one ``scripts/install-consul.sh`` put in ``.tools/bin``."""
    path = shutil.which("consul")
    if path:
        return path
    local = REPO_ROOT / ".tools" / "bin" / "consul"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    raise FileNotFoundError("consul not found: run scripts/install-consul.sh")


class ConsulAgent:
    """One agent that is server and client in one process.

    ``persistent=False`` (default) runs ``-dev``: in-memory state, lost on restart.
    ``persistent=True`` runs a single server with a data dir, so a restart keeps KV, sessions
    and the Raft index (as a real Consul server cluster does); it takes a few seconds longer
    to elect itself. ``http_max_conns_per_client``: Consul's limit of concurrent HTTP
    connections per client address (Consul's default 200; here 1,000, as the ansible role
    sets it: a directory following 256 shards holds 260 long polls); None: Consul's own.
    ``join=server`` runs a *client* agent joined to that server's LAN pool instead: one per
    supervisor node, as in production (a node's checks live on its own Consul node).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        host: str = "127.0.0.1",
        name: str = "consul",
        persistent: bool = False,
        http_max_conns_per_client: int | None = 1000,
        join: ConsulAgent | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.join = join
        self.host = host
        self.name = name
        self.persistent = persistent
        self.http_max_conns_per_client = http_max_conns_per_client
        self.http_port = free_port(host)
        self.dns_port = free_port(host)
        self.serf_lan_port = free_port(host)
        self.serf_wan_port = free_port(host)
        self.server_port = free_port(host)
        self.grpc_port = free_port(host)
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _argv(self) -> list[str]:
        ports = (
            f"ports {{ http = {self.http_port}, dns = {self.dns_port}, "
            f"serf_lan = {self.serf_lan_port}, serf_wan = {self.serf_wan_port}, "
            f"server = {self.server_port}, grpc = {self.grpc_port} }}"
        )
        if self.join is not None:
            data_dir = self.base_dir / f"{self.name}-data"
            data_dir.mkdir(parents=True, exist_ok=True)
            mode = [
                "-data-dir", str(data_dir),
                "-retry-join", f"{self.join.host}:{self.join.serf_lan_port}",
                "-retry-interval", "1s",
            ]  # fmt: skip
        elif self.persistent:
            data_dir = self.base_dir / f"{self.name}-data"
            data_dir.mkdir(parents=True, exist_ok=True)
            mode = ["-server", "-bootstrap-expect=1", "-ui", "-data-dir", str(data_dir)]
        else:
            mode = ["-dev"]
        limits = []
        if self.http_max_conns_per_client is not None:
            limits = [
                "-hcl", f"limits {{ http_max_conns_per_client = {self.http_max_conns_per_client} }}"
            ]  # fmt: skip
        return [
            consul_binary(), "agent", *mode,
            "-node", self.name,
            "-bind", self.host, "-client", self.host,
            "-hcl", ports,
            "-hcl", 'log_level = "info"',
            *limits,
        ]  # fmt: skip

    def ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=1) as resp:
            leader = json.loads(resp.read())
        if not leader:
            return False
        with urllib.request.urlopen(self.url + "/v1/agent/self", timeout=1) as resp:
            return resp.status == 200

    def start(self, timeout: float = 30.0) -> None:
        if self.process is None:
            self.process = ManagedProcess(
                self.name, self._argv(), self.base_dir / f"{self.name}.log"
            )
        self.process.start()
        wait_until(self.ready, timeout, what=f"Consul agent at {self.url}")

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again (dev mode loses all state; persistent mode keeps it)."""
        self.stop()
        self.start(timeout)

    def freeze(self) -> None:
        assert self.process is not None
        self.process.freeze()

    def thaw(self) -> None:
        assert self.process is not None
        self.process.thaw()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process else "(never started)"
