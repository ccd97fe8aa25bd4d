"""What a start needs besides the claim: a free port, and the spec handed to the runner."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Collection

from atserver_runner.base import WorkloadSpec
from atserver_runner.paths import atsign_dir
from supervisor.config import SupervisorConfig

SpecBuilder = Callable[[str, int, int], WorkloadSpec]
"""(atsign, port, fencing_token) -> the spec to start. Its data dir must be
``atserver_runner.paths.atsign_dir(runner.data_root, atsign)`` (the data guard's)."""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports of ``runner.port_range`` round-robin: O(1) per start, not O(range)."""

    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.low = low
        self.high = high
        self._next = low
        self.reserved: set[int] = set()

    def allocate(self, in_use: Collection[int]) -> int:
        size = self.high - self.low + 1
        for i in range(size):
            port = self.low + (self._next - self.low + i) % size
            if port in in_use or port in self.reserved:
                continue
            if port_free(self.host, port):
                self.reserved.add(port)
                self._next = port + 1
                return port
        raise RuntimeError(f"no free port in runner.port_range {self.low}-{self.high}")

    def release(self, port: int) -> None:
        self.reserved.discard(port)


def default_spec_builder(cfg: SupervisorConfig) -> SpecBuilder:
    """The spec of the configured runner: ``runner.command`` (a template), the dev atServer
    for the process runner, or the image's own command for Docker."""
    r = cfg.runner

    def build(atsign: str, port: int, token: int) -> WorkloadSpec:
        data_dir = atsign_dir(r.data_root, atsign)
        subst = {
            "atsign": atsign,
            "name": data_dir.name,
            "host": cfg.node.address,
            "port": str(port),
            "data_dir": str(data_dir),
            "token": str(token),
            "cert": str(r.tls.cert) if r.tls and r.tls.cert else "",
            "key": str(r.tls.key) if r.tls and r.tls.key else "",
        }
        if r.command:
            command = [part.format(**subst) for part in r.command]
        elif r.kind == "process":
            from atserver_runner import devserver

            if r.tls is None or r.tls.cert is None or r.tls.key is None:
                raise RuntimeError("runner.tls.cert/key are needed to run the dev atServer")
            command = devserver.argv(
                python=sys.executable,
                atsign=atsign,
                host=cfg.node.address,
                port=port,
                data_dir=data_dir,
                fencing_token=token,
                cert=r.tls.cert,
                key=r.tls.key,
            )
        else:
            command = []
        return WorkloadSpec(
            atsign=atsign,
            node=cfg.node.name,
            port=port,
            data_dir=data_dir,
            fencing_token=token,
            host=cfg.node.address,
            image=r.image,
            command=tuple(command),
            env=dict(r.env),
        )

    return build
