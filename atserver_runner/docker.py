"""Run atServers as Docker containers through the ``docker`` SDK (calls run in threads).

One container per atSign and node, named ``atserver-<node>-<atsign without @>`` and
labelled ``atfailover.atsign`` / ``atfailover.node`` / ``atfailover.fencing_token`` (plus
host and port), so :meth:`DockerRunner.list` finds them again after a supervisor restart.
Hardening: ``init=True`` (signals reach the server), no restart policy (the supervisor
decides), ``cap_drop=ALL``, ``no-new-privileges``, a small ``/tmp`` tmpfs, a non-root
user, optional CPU and memory limits. (The root filesystem stays writable only because
``put_archive`` cannot copy the TLS files into a read-only one; the server writes nothing
outside ``/data``.)

The container is configured through environment variables the dev atServer reads
(``ATSERVER_ATSIGN``, ``ATSERVER_FENCING_TOKEN``, ``ATSERVER_PORT``, ``ATSERVER_HOST``,
``ATSERVER_DATA_DIR``, ``ATSERVER_CERT``, ``ATSERVER_KEY``) plus ``spec.env``;
``spec.command``, if given, replaces the image's CMD. The TLS certificate and key are copied
into the created container (``put_archive``, readable only by the container user) rather
than bind-mounted, so their host file modes do not matter and they never appear in the
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import ssl
import tarfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from atserver_runner.base import (
    ProbeResult,
    RunnerError,
    Workload,
    WorkloadSpec,
    WorkloadState,
    check_data_dir,
)
from atserver_runner.probe import probe_atserver, probe_ssl_context
from atserver_runner.process import safe_name

LABEL_ATSIGN = "atfailover.atsign"
LABEL_NODE = "atfailover.node"
LABEL_TOKEN = "atfailover.fencing_token"
LABEL_HOST = "atfailover.host"
LABEL_PORT = "atfailover.port"

CONTAINER_DATA_DIR = "/data"
CONTAINER_TLS_DIR = "/run/atserver-tls"
DEFAULT_CONTAINER_PORT = 6464
DEFAULT_CONTAINER_UID = 10001
STOP_POLL_S = 0.05
WATCHED_ACTIONS = frozenset({"start", "die", "destroy", "oom", "pause", "unpause"})
KILL_WAIT_S = 10.0


def container_name(node: str, atsign: str) -> str:
    """``atserver-<node>-<atsign without @>`` with characters Docker allows."""
    return f"atserver-{safe_name(node)}-{safe_name(atsign)}"


def _tls_archive(cert: Path, key: Path, uid: int, gid: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        top = tarfile.TarInfo(CONTAINER_TLS_DIR.lstrip("/"))
        top.type, top.mode, top.uid, top.gid = tarfile.DIRTYPE, 0o500, uid, gid
        tar.addfile(top)
        for name, path in (("cert.pem", cert), ("key.pem", key)):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{CONTAINER_TLS_DIR.lstrip('/')}/{name}")
            info.size, info.mode, info.uid, info.gid = len(data), 0o400, uid, gid
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class DockerRunner:
    """Starts, stops, finds and probes atServer containers of one node.

    ``client``: a ``docker.DockerClient``. ``image``: the atServer image (the dev image is
    built by ``python -m atserver_runner.devserver.image build``). ``tls_cert``/``tls_key``:
    copied into every container at ``/run/atserver-tls/{cert,key}.pem``.
    ``run_as``: ``"uid:gid"`` for the container; by default the caller's uid:gid, or
    ``10001:10001`` when the caller is root, in which case the data dir is chown'ed to it so
    the non-root server can write there. ``data_root``: when given, a spec whose data
    directory is not inside it is refused before any Docker call or chown.
    """

    def __init__(
        self,
        node: str,
        client: Any,
        *,
        image: str,
        publish_host: str = "127.0.0.1",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        container_port: int = DEFAULT_CONTAINER_PORT,
        run_as: str | None = None,
        probe_ca: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        data_root: Path | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("DockerRunner: give both tls_cert and tls_key, or neither")
        self.node = node
        self.data_root = data_root
        self.client = client
        self.image = image
        self.publish_host = publish_host
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.container_port = container_port
        if run_as is None:
            uid = os.getuid()
            run_as = (
                f"{uid}:{os.getgid()}"
                if uid != 0
                else f"{DEFAULT_CONTAINER_UID}:{DEFAULT_CONTAINER_UID}"
            )
        self.run_as = run_as
        uid_s, _, gid_s = run_as.partition(":")
        self._uid, self._gid = int(uid_s), int(gid_s or uid_s)
        self.extra_env = dict(extra_env or {})
        self._probe_ssl: ssl.SSLContext = probe_ssl_context(probe_ca)

    # --- finding -----------------------------------------------------------------------------

    def _get(self, atsign: str) -> Any | None:
        import docker.errors

        try:
            return self.client.containers.get(container_name(self.node, atsign))
        except docker.errors.NotFound:
            return None

    def _workload(self, container: Any) -> Workload:
        labels: dict[str, str] = container.labels or {}
        state: dict[str, Any] = container.attrs.get("State", {})
        # A paused (frozen) container still holds its port and data dir: it counts as
        # RUNNING, like a SIGSTOPped process; probe() reports it unhealthy.
        running = bool(state.get("Running"))
        started = state.get("StartedAt") or ""
        return Workload(
            atsign=labels.get(LABEL_ATSIGN, ""),
            node=labels.get(LABEL_NODE, ""),
            fencing_token=int(labels.get(LABEL_TOKEN, "0")),
            host=labels.get(LABEL_HOST, self.publish_host),
            port=int(labels.get(LABEL_PORT, "0")),
            state=WorkloadState.RUNNING if running else WorkloadState.STOPPED,
            ident=str(container.id),
            started_at=_parse_docker_time(started),
            exit_code=None if running else state.get("ExitCode"),
        )

    def _list_sync(self) -> list[Workload]:
        containers = self.client.containers.list(
            all=True,
            filters={"label": [f"{LABEL_NODE}={self.node}"]},
            # a container removed between the list and its inspect is gone, not an error
            ignore_removed=True,
        )
        return sorted((self._workload(c) for c in containers), key=lambda w: w.atsign)

    async def list(self) -> list[Workload]:
        """Every container of this node (running or exited), found by label."""
        return await asyncio.to_thread(self._list_sync)

    # --- starting ----------------------------------------------------------------------------

    def _prepare_data_dir(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            for root, dirs, files in os.walk(data_dir):
                os.chown(root, self._uid, self._gid)
                for name in dirs + files:
                    os.chown(os.path.join(root, name), self._uid, self._gid, follow_symlinks=False)

    def _start_sync(self, spec: WorkloadSpec) -> Workload:
        import docker.errors

        # Before any Docker call: as root, the data dir is chown'ed recursively below.
        check_data_dir(self.data_root, spec)
        existing = self._get(spec.atsign)
        if existing is not None:
            current = self._workload(existing)
            if current.state is WorkloadState.RUNNING:
                if current.fencing_token == spec.fencing_token:
                    return current
                raise RunnerError(
                    f"{spec.atsign}: container {existing.name} already runs with fencing token "
                    f"{current.fencing_token}; stop it before starting token {spec.fencing_token}"
                )
            existing.remove(force=True)
        image = spec.image or self.image
        self._prepare_data_dir(spec.data_dir)
        env = {
            "ATSERVER_ATSIGN": spec.atsign,
            "ATSERVER_FENCING_TOKEN": str(spec.fencing_token),
            "ATSERVER_PORT": str(self.container_port),
            "ATSERVER_HOST": "0.0.0.0",
            "ATSERVER_DATA_DIR": CONTAINER_DATA_DIR,
            **self.extra_env,
            **spec.env,
        }
        if self.tls_cert is not None:
            env["ATSERVER_CERT"] = f"{CONTAINER_TLS_DIR}/cert.pem"
            env["ATSERVER_KEY"] = f"{CONTAINER_TLS_DIR}/key.pem"
        kwargs: dict[str, Any] = {
            "name": container_name(self.node, spec.atsign),
            "labels": {
                LABEL_ATSIGN: spec.atsign,
                LABEL_NODE: self.node,
                LABEL_TOKEN: str(spec.fencing_token),
                LABEL_HOST: spec.host,
                LABEL_PORT: str(spec.port),
            },
            "environment": env,
            "ports": {f"{self.container_port}/tcp": (spec.host, spec.port)},
            "volumes": {str(spec.data_dir.resolve()): {"bind": CONTAINER_DATA_DIR, "mode": "rw"}},
            "init": True,
            "cap_drop": ["ALL"],
            "privileged": False,
            "security_opt": ["no-new-privileges"],
            "tmpfs": {"/tmp": "rw,size=16m,mode=1777"},
            "user": self.run_as,
            "detach": True,
        }
        if spec.command:
            kwargs["command"] = list(spec.command)
        if spec.limits.cpus is not None:
            kwargs["nano_cpus"] = int(spec.limits.cpus * 1e9)
        if spec.limits.memory_bytes is not None:
            kwargs["mem_limit"] = spec.limits.memory_bytes
        try:
            container = self.client.containers.create(image, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise RunnerError(
                f"{spec.atsign}: image {image!r} not found (build the dev image with "
                "`python -m atserver_runner.devserver.image build`)"
            ) from exc
        except docker.errors.APIError as exc:
            raise RunnerError(f"{spec.atsign}: cannot create container: {exc}") from exc
        try:
            if self.tls_cert is not None and self.tls_key is not None:
                archive = _tls_archive(self.tls_cert, self.tls_key, self._uid, self._gid)
                container.put_archive("/", archive)
            container.start()
            container.reload()
        except docker.errors.APIError as exc:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
            raise RunnerError(f"{spec.atsign}: cannot start container: {exc}") from exc
        return self._workload(container)

    async def start(self, spec: WorkloadSpec) -> Workload:
        """Create and start the container (or return the running one with the same token)."""
        return await asyncio.to_thread(self._start_sync, spec)

    # --- stopping ----------------------------------------------------------------------------

    def _stop_sync(self, atsign: str, timeout: float) -> bool:
        import docker.errors

        container = self._get(atsign)
        if container is None:
            return False
        was_running = self._workload(container).state is WorkloadState.RUNNING
        try:
            if was_running:
                if container.attrs.get("State", {}).get("Paused"):
                    container.unpause()  # a frozen server cannot handle SIGTERM
                self._terminate(container, timeout)
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            raise RunnerError(f"{atsign}: cannot stop container {container.name}: {exc}") from exc
        return was_running

    def _terminate(self, container: Any, timeout: float) -> None:
        """SIGTERM (tini forwards it to the server), SIGKILL after ``timeout`` seconds.

        Done by hand rather than with ``docker stop``, whose grace period is whole seconds:
        the fence stops workloads within a sub-second budget of the timing table."""
        import docker.errors

        with contextlib.suppress(docker.errors.APIError):  # it may have exited meanwhile
            container.kill(signal="SIGTERM")
        if self._wait_exited(container, timeout):
            return
        with contextlib.suppress(docker.errors.APIError):
            container.kill(signal="SIGKILL")
        if not self._wait_exited(container, KILL_WAIT_S):
            raise RunnerError(f"container {container.name} still runs {KILL_WAIT_S}s after SIGKILL")

    @staticmethod
    def _wait_exited(container: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            container.reload()
            if not container.attrs.get("State", {}).get("Running"):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(STOP_POLL_S, left))

    async def stop(self, atsign: str, timeout: float = 10.0) -> bool:
        """Stop (SIGTERM, SIGKILL after ``timeout``) and remove the container."""
        return await asyncio.to_thread(self._stop_sync, atsign, timeout)

    async def logs(self, atsign: str, tail: int = 100) -> str:
        """The container's last output lines (for error reports)."""

        def read() -> str:
            container = self._get(atsign)
            if container is None:
                return ""
            return bytes(container.logs(tail=tail)).decode(errors="replace")

        return await asyncio.to_thread(read)

    async def inspect(self, atsign: str) -> Workload | None:
        """The atSign's container (running or exited), or ``None``."""

        def one() -> Workload | None:
            import docker.errors

            try:
                container = self._get(atsign)
            except docker.errors.NotFound:  # removed between lookup and inspect
                return None
            return None if container is None else self._workload(container)

        return await asyncio.to_thread(one)

    async def events(self) -> AsyncIterator[str]:
        """atSigns whose container started, died or was removed (Docker's event stream,
        filtered to this node's label), as it happens."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException] = asyncio.Queue()
        stream = await asyncio.to_thread(
            self.client.events,
            decode=True,
            filters={"type": "container", "label": f"{LABEL_NODE}={self.node}"},
        )

        def pump() -> None:
            try:
                for event in stream:
                    if event.get("Action") not in WATCHED_ACTIONS:
                        continue
                    atsign = ((event.get("Actor") or {}).get("Attributes") or {}).get(LABEL_ATSIGN)
                    if atsign:
                        loop.call_soon_threadsafe(queue.put_nowait, atsign)
            except Exception as exc:  # the engine went away: the consumer sees it
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, exc)

        reader = asyncio.create_task(asyncio.to_thread(pump))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RunnerError(f"Docker event stream of node {self.node} ended: {item}")
                yield item
        finally:
            stream.close()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    # --- probing -----------------------------------------------------------------------------

    async def probe(self, atsign: str, timeout: float = 2.0) -> ProbeResult:
        container = await asyncio.to_thread(self._get, atsign)
        if container is None:
            return ProbeResult(False, f"{atsign}: no container on node {self.node}")
        w = self._workload(container)
        if w.state is not WorkloadState.RUNNING:
            return ProbeResult(False, f"{atsign}: container exited with code {w.exit_code}")
        result = await probe_atserver(
            w.host, w.port, timeout=timeout, ssl_context=self._probe_ssl, expect_atsign=atsign
        )
        if not result.healthy and container.attrs.get("State", {}).get("Paused"):
            return ProbeResult(False, f"container is paused: {result.detail}", result.latency_s)
        return result


def _parse_docker_time(text: str) -> float:
    """Docker's RFC 3339 timestamps with nanoseconds -> epoch seconds (0.0 if absent)."""
    import datetime as dt

    if not text or text.startswith("0001-"):
        return 0.0
    main, _, frac = text.rstrip("Z").partition(".")
    try:
        base = dt.datetime.fromisoformat(main).replace(tzinfo=dt.UTC)
    except ValueError:
        return 0.0
    fraction = float("0." + frac.split("+")[0].split("-")[0]) if frac else 0.0
    return base.timestamp() + fraction
