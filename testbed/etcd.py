"""Real etcd servers (Debian's ``etcd-server``) started by hand on loopback ports."""

from __future__ import annotations

import json
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testbed.ports import free_port
from testbed.process import ManagedProcess, wait_until


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise FileNotFoundError(
            "etcd not found on PATH: run scripts/bootstrap.sh (Debian etcd-server)"
        )
    return path


@dataclass
class EtcdMember:
    """One etcd member; a stopped member can be started again with its data."""

    name: str
    data_dir: Path
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.client_port}"

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.client_url + "/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") in ("true", True))

    def is_leader(self) -> bool:
        req = urllib.request.Request(
            self.client_url + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=1) as resp:
            status = json.loads(resp.read())
        return str(status["leader"]) == str(status["header"]["member_id"])


class EtcdCluster:
    """``size`` members on loopback (1 for a single server, 3 for a quorum)."""

    def __init__(
        self, base_dir: Path, size: int = 1, *, name: str = "etcd", host: str = "127.0.0.1"
    ) -> None:
        """``host``: the address every member listens on (loopback unless told otherwise)."""
        self.base_dir = base_dir
        self.members = [
            EtcdMember(
                name=f"{name}{i}",
                data_dir=base_dir / f"{name}{i}",
                host=host,
                client_port=free_port(host),
                peer_port=free_port(host),
            )
            for i in range(size)
        ]
        self.token = f"{name}-{id(self):x}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            etcd_binary(),
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def start_member(self, m: EtcdMember) -> None:
        if m.process is None:
            m.process = ManagedProcess(m.name, self._argv(m), self.base_dir / f"{m.name}.log")
        m.process.start()

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            self.start_member(m)
        for m in self.members:
            wait_until(m.healthy, timeout, what=f"etcd member {m.name} at {m.client_url}")

    def leader(self) -> EtcdMember:
        for m in self.members:
            if m.process is not None and m.process.running():
                try:
                    if m.is_leader():
                        return m
                except OSError:
                    continue
        raise RuntimeError("no etcd member reports itself leader")

    def kill_member(self, m: EtcdMember) -> None:
        """SIGKILL one member (its data stays, so it can rejoin)."""
        assert m.process is not None
        m.process.kill()

    def restart_member(self, m: EtcdMember, timeout: float = 30.0) -> None:
        self.start_member(m)
        wait_until(m.healthy, timeout, what=f"etcd member {m.name} to rejoin")

    def freeze(self) -> None:
        for m in self.members:
            if m.process is not None:
                m.process.freeze()

    def thaw(self) -> None:
        for m in self.members:
            if m.process is not None:
                m.process.thaw()

    def stop(self) -> None:
        for m in self.members:
            if m.process is not None:
                m.process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {m.name} ---\n{m.process.log_tail(lines)}" for m in self.members if m.process
        )
