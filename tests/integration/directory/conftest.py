"""Helpers for directory tests: Consul registrations, a real ``atdirectory`` process, atsdk."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from directory.shards import registrations, service_id, shard_service
from supervisor.registration import NODE_CHECK
from testbed.consul import ConsulAgent
from testbed.ports import free_port
from testbed.process import ManagedProcess, wait_until
from testbed.tls import CertPair, TestCA

ATDIRECTORY = Path(sys.executable).parent / "atdirectory"


def atsign_base(key_prefix: str) -> str:
    """A short, unique atSign stem for one test (``t/test_x-1a2b3c4d`` -> ``x1a2b3c4d``)."""
    slug = re.sub(r"[^a-z0-9]", "", key_prefix.rsplit("/", 1)[-1].lower())
    return slug[-20:]


def consul_put(url: str, path: str, body: Any = None, timeout: float = 5.0) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


class Registrar:
    """Registers ``atserver`` instances the way the supervisor does (TTL checks we flip)."""

    def __init__(self, agent: ConsulAgent, base_dir: Path) -> None:
        self.agent = agent
        self.base_dir = base_dir
        self.ids: list[str] = []
        self.catalog_nodes: set[str] = set()
        self.node_agents: dict[str, ConsulAgent] = {}
        self.agent_of: dict[str, ConsulAgent] = {}  # service ID -> the node agent holding it

    def register(
        self,
        atsign: str,
        port: int,
        token: int | str | None,
        *,
        host: str = "127.0.0.1",
        node: str = "n1",
        cloud: str = "a",
        passing: bool = True,
        service_id: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> str:
        sid = service_id or f"atserver-{atsign.lstrip('@')}-{node}"
        m = {"atsign": atsign, "node": node, "cloud": cloud}
        if token is not None:
            m["fencing_token"] = str(token)
        if meta is not None:
            m = meta
        consul_put(
            self.agent.url,
            "/v1/agent/service/register",
            {
                "Name": "atserver",
                "ID": sid,
                "Address": host,
                "Port": port,
                "Tags": [atsign.lstrip("@")],
                "Meta": m,
                "Check": {
                    "CheckID": f"service:{sid}",
                    "TTL": "3600s",
                    "Status": "passing" if passing else "critical",
                },
            },
        )
        self.ids.append(sid)
        return sid

    def node_agent(self, node: str) -> ConsulAgent:
        """The Consul client agent of test node ``node`` (started on first use, joined to the
        server), with the supervisor's node check ``atfailover-supervisor`` passing: as in
        production, every node has its own agent and so its own node check."""
        agent = self.node_agents.get(node)
        if agent is None:
            agent = ConsulAgent(
                self.base_dir, name=f"{node}-{secrets.token_hex(3)}", join=self.agent
            )
            agent.start()
            self.node_agents[node] = agent
            consul_put(
                agent.url,
                "/v1/agent/check/register",
                {"ID": NODE_CHECK, "Name": f"supervisor on {node} holds its DCS session",
                 "TTL": "3600s", "Status": "passing"},
            )  # fmt: skip
        return agent

    def set_node_alive(self, node: str, alive: bool) -> None:
        """Pass or fail the node's node check: every instance on that Consul node follows."""
        verb = "pass" if alive else "fail"
        consul_put(self.node_agent(node).url, f"/v1/agent/check/{verb}/{NODE_CHECK}")

    def register_like_supervisor(
        self,
        atsign: str,
        port: int,
        token: int,
        *,
        base: str,
        shards: tuple[int, ...] = (1,),
        host: str = "127.0.0.1",
        node: str = "n1",
        cloud: str = "a",
        passing: bool = True,
        id_suffix: str = "",
    ) -> list[str]:
        """One instance per layout in ``shards``, named as ``directory.shards`` says: service
        (legacy or shard), ID ``<service>-<name>``, tags, meta, a TTL check ``<id>:at-protocol``
        on the node's own agent (:meth:`node_agent`), whose node check covers it.
        ``id_suffix`` keeps two owners' IDs apart. Returns the IDs."""
        agent = self.node_agent(node)
        key = atsign.lstrip("@").lower()
        sids = []
        for reg in registrations(atsign, base, shards):
            sid = reg.service_id + id_suffix
            consul_put(
                agent.url,
                "/v1/agent/service/register",
                {
                    "Name": reg.service,
                    "ID": sid,
                    "Address": host,
                    "Port": port,
                    "Tags": [reg.tag, f"node-{node}", f"cloud-{cloud}"],
                    "Meta": {
                        "atsign": f"@{key}",
                        "node": node,
                        "cloud": cloud,
                        "fencing_token": str(token),
                    },
                    "Check": {
                        "CheckID": f"{sid}:at-protocol",
                        "Name": f"@{key} at-protocol round trip",
                        "TTL": "3600s",
                        "Status": "passing" if passing else "critical",
                    },
                },
            )
            self.agent_of[sid] = agent
            sids.append(sid)
        return sids

    def set_probe(self, sid: str, passing: bool) -> None:
        """Pass or fail an instance's at-protocol TTL check (as the supervisor's probe does)."""
        verb = "pass" if passing else "fail"
        consul_put(self._agent_url(sid), f"/v1/agent/check/{verb}/{sid}:at-protocol")

    def _agent_url(self, sid: str) -> str:
        return self.agent_of.get(sid, self.agent).url

    def set_passing(self, sid: str, passing: bool) -> None:
        verb = "pass" if passing else "fail"
        consul_put(self.agent.url, f"/v1/agent/check/{verb}/service:{sid}")

    def deregister(self, sid: str) -> None:
        consul_put(self._agent_url(sid), f"/v1/agent/service/deregister/{sid}")

    def register_bulk(
        self, base: str, count: int, nodes: int = 10, *, service: str = "atserver", shards: int = 1
    ) -> dict[str, str]:
        """``count`` passing instances on synthetic catalog nodes (64 ops per Consul txn), in
        ``service`` or, with ``shards`` > 1, in its shards; returns atSign -> ``host:port``."""
        ops: list[dict[str, Any]] = []
        for n in range(nodes):
            node = f"{base}-sim{n}"
            self.catalog_nodes.add(node)
            ops.append({"Node": {"Verb": "set", "Node": {"Node": node, "Address": "127.0.2.1"}}})
            ops.append({"Check": {"Verb": "set", "Check": self.node_check(node, "passing")}})
        expected: dict[str, str] = {}
        for i in range(count):
            node, name = f"{base}-sim{i % nodes}", f"{base}b{i}"
            if shards > 1:
                name_of = shard_service(service, name, shards)
                sid = service_id(name_of, name)
            else:
                name_of, sid = service, f"bulk-{base}-{i}"
            entry = {
                "ID": sid, "Service": name_of, "Address": f"127.0.2.{i % nodes + 1}",
                "Port": 10000 + i, "Tags": [name],
                "Meta": {"atsign": f"@{name}", "fencing_token": str(i + 1)},
            }  # fmt: skip
            check = {"Node": node, "CheckID": f"c-{sid}", "Name": "at-protocol",
                     "Status": "passing", "ServiceID": sid}  # fmt: skip
            ops.append({"Service": {"Verb": "set", "Node": node, "Service": entry}})
            ops.append({"Check": {"Verb": "set", "Check": check}})
            expected[f"@{name}"] = f"127.0.2.{i % nodes + 1}:{10000 + i}"
        for start in range(0, len(ops), 64):
            consul_put(self.agent.url, "/v1/txn", ops[start : start + 64], timeout=30)
        return expected

    @staticmethod
    def node_check(node: str, status: str) -> dict[str, str]:
        """The supervisor's node check of a synthetic catalog node (no ServiceID)."""
        return {"Node": node, "CheckID": NODE_CHECK, "Name": "supervisor", "Status": status}

    def set_catalog_node_alive(self, node: str, alive: bool) -> None:
        """Pass or fail a synthetic catalog node's node check (as its agent would sync it)."""
        check = self.node_check(node, "passing" if alive else "critical")
        consul_put(self.agent.url, "/v1/txn", [{"Check": {"Verb": "set", "Check": check}}])

    def cleanup(self) -> None:
        for node_agent in self.node_agents.values():
            node_agent.stop()  # a client agent leaves: its node, checks and services go
        self.node_agents.clear()
        if not self.agent.process or not self.agent.process.running():
            return
        for sid in self.ids:
            with contextlib.suppress(OSError):
                self.deregister(sid)
        for node in self.catalog_nodes:
            with contextlib.suppress(OSError):
                consul_put(self.agent.url, "/v1/catalog/deregister", {"Node": node})


@pytest.fixture
def registrar(consul_agent: ConsulAgent, tmp_path: Path) -> Iterator[Registrar]:
    reg = Registrar(consul_agent, tmp_path)
    try:
        yield reg
    finally:
        reg.cleanup()


class DirectoryProcess:
    """``atdirectory serve`` as a real child process on free loopback ports."""

    def __init__(
        self,
        base_dir: Path,
        consul_url: str,
        cert: CertPair,
        *extra: str,
        name: str = "dir",
        program: list[str] | None = None,
        pythonpath: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        argv = [
            *(program or [str(ATDIRECTORY)]), "serve",
            "--consul", consul_url,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--cert", str(cert.cert), "--key", str(cert.key),
            "--metrics-port", str(self.metrics_port),
            "--consul-wait", "10",
            # The legacy layout unless the test names one (the last wins); the old version
            # (``program``) knows no layouts.
            *(["--shards", "1"] if program is None else []),
            *extra,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATDIRECTORY_")}
        cwd = None
        if pythonpath is not None:  # another version of the directory package
            env["PYTHONPATH"] = str(pythonpath)
            cwd = pythonpath
        self.process = ManagedProcess(name, argv, base_dir / f"{name}.log", env=env, cwd=cwd)

    def start(self) -> None:
        self.process.start()
        wait_until(self.healthy, 20, what=f"atdirectory on {self.port}")

    def healthy(self) -> bool:
        if not self.process.running():
            raise RuntimeError(f"atdirectory exited:\n{self.process.log_tail()}")
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200

    def metrics(self) -> dict[str, float]:
        """Samples by name (labels folded in as ``name{k=v}``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self) -> str:
        return self.process.log_tail(80)


@pytest.fixture
def start_directory(
    tmp_path: Path, consul_agent: ConsulAgent, server_cert: CertPair
) -> Iterator[Any]:
    """Factory: ``start_directory(*extra_args)`` -> a running :class:`DirectoryProcess`."""
    started: list[DirectoryProcess] = []

    def start(
        *extra: str,
        consul_url: str | None = None,
        program: list[str] | None = None,
        pythonpath: Path | None = None,
    ) -> DirectoryProcess:
        d = DirectoryProcess(
            tmp_path, consul_url or consul_agent.url, server_cert, *extra,
            name=f"dir{len(started)}", program=program, pythonpath=pythonpath,
        )  # fmt: skip
        started.append(d)
        d.start()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()
            print(f"\n===== {d.process.name} log (last lines) =====\n{d.log_tail()}")


class AtsdkRoot:
    """atsdk's real ``AtRootConnection``, driven from a daemon thread with bounded waits.

    atsdk has no timeouts and spins when the server closes, so every call is given up
    after ``timeout`` seconds (the thread is a daemon and cannot block the test run).
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: Any = self._call(self._new_connection)

    def _new_connection(self) -> Any:
        from at_client.connections.atrootconnection import AtRootConnection

        # atsdk keeps one root connection per process; tests want their own.
        AtRootConnection._AtRootConnection__instance = None
        return AtRootConnection(self.host, self.port, None, False)

    def _call(self, fn: Any, *args: Any) -> Any:
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, daemon=True, name="atsdk-call").start()
        return fut.result(timeout=self.timeout)

    def find(self, atsign: str) -> str | None:
        """``host:port`` for ``atsign``, or None when the directory answers null."""
        from at_client.common.atsign import AtSign
        from at_client.exception.atexception import AtSecondaryNotFoundException

        try:
            address = self._call(self._conn.find_secondary, AtSign(atsign))
        except AtSecondaryNotFoundException:
            return None
        return str(address)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._conn.disconnect)


@pytest.fixture
def atsdk_root(test_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Factory: ``atsdk_root(port)`` -> :class:`AtsdkRoot` connected to 127.0.0.1:port."""
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.cert_path))
    made: list[AtsdkRoot] = []

    def make(port: int, host: str = "127.0.0.1") -> AtsdkRoot:
        root = AtsdkRoot(host, port)
        made.append(root)
        return root

    try:
        yield make
    finally:
        for r in made:
            r.close()


def client_context(test_ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(test_ca.cert_path))


class TlsLineClient:
    """A plain blocking TLS client of the line protocol, every wait bounded by ``timeout``."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""
        assert self.read_until(b"@") == b"@"

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server; got {self.buf!r}")
            self.buf += chunk
        i = self.buf.index(end) + len(end)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_to_eof(self) -> bytes:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        return self.read_until(b"\r\n@")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
