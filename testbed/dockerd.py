"""A Docker engine for tests and local clusters: the running one, or ``dockerd`` started here.

There is no systemd on these machines, so when ``/_ping`` fails we start Debian's
``dockerd`` in the background on the default socket (images then persist in
``/var/lib/docker`` between runs) and stop it, by its PID, when done.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from testbed.process import ManagedProcess, wait_until

DEFAULT_SOCKET = "/var/run/docker.sock"


def docker_socket_path() -> str:
    """The engine socket the Docker SDK's ``from_env`` uses: ``DOCKER_HOST`` if it names a
    unix socket, else the default one."""
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else DEFAULT_SOCKET


def ping(socket_path: str = DEFAULT_SOCKET, timeout: float = 2.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` with ``OK`` on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.") and data.rstrip().endswith(b"OK")
    except OSError:
        return False


class DockerEngine:
    """Ensures an engine answers on ``socket_path``; stops it later only if it started it."""

    def __init__(self, log_dir: Path, socket_path: str = DEFAULT_SOCKET) -> None:
        self.log_dir = log_dir
        self.socket_path = socket_path
        self.process: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket_path}"

    def ensure(self, timeout: float = 60.0) -> None:
        """Use a running engine, or start ``dockerd``; raise RuntimeError saying why it failed."""
        if ping(self.socket_path):
            return
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise RuntimeError("dockerd not found: run scripts/bootstrap.sh (Debian docker.io)")
        self.process = ManagedProcess(
            "dockerd", [dockerd, "-H", self.base_url], self.log_dir / "dockerd.log"
        )
        self.process.start()
        try:
            wait_until(
                lambda: ping(self.socket_path) or self._died(),
                timeout,
                interval=0.2,
                what=f"dockerd on {self.socket_path}",
            )
        except TimeoutError as exc:
            tail = self.process.log_tail(20)
            self.stop()
            raise RuntimeError(f"dockerd did not answer /_ping: {exc}\n{tail}") from exc
        if self._died():
            tail = self.process.log_tail(20)
            self.process = None
            raise RuntimeError(f"dockerd exited at start:\n{tail}")

    def _died(self) -> bool:
        return self.process is not None and not self.process.running()

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)
            self.process = None
