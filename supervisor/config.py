"""The node configuration: one YAML file per node, validated at load.

Every mistake is reported as ``FILE: FIELD: PROBLEM`` (:class:`ConfigError`),
and the CLI exits with code 2 on it. Environment variables override fields
(12-factor): ``SUPERVISOR__DCS__BACKEND=consul`` sets ``dcs.backend``; values
are parsed as YAML, so ``SUPERVISOR__DCS__ETCD__ENDPOINTS='[a:1, b:2]'`` works.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from directory.shards import DEFAULT_SHARDS, check_shards, normalize_layouts
from leases.base import normalize_atsign
from supervisor.tokens import read_token_env, read_token_file

ENV_PREFIX = "SUPERVISOR__"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_seconds(value: str) -> float:
    """Seconds in a Go duration string as Consul takes it (``90s``, ``1m30s``, ``2h``)."""
    text = value.strip()
    parts = _DURATION_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration like 90s, 1m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


@dataclass(frozen=True)
class Problem:
    """One mistake: which file, which field (dotted; may be empty), what is wrong."""

    file: str
    field: str
    problem: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.problem}"


class ConfigError(Exception):
    """Configuration problems: every one found, each naming its file, field and problem.

    ``file``/``field``/``problem`` are those of the first; ``problems`` holds all of them,
    and ``str()`` is one ``FILE: FIELD: PROBLEM`` line per problem.
    """

    def __init__(self, file: str, field: str, problem: str, *more: Problem) -> None:
        self.problems: list[Problem] = [Problem(file, field, problem), *more]
        self.file = file
        self.field = field
        self.problem = problem
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> ConfigError:
        first, *rest = problems
        return cls(first.file, first.field, first.problem, *rest)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = TypeVar("_M", bound=_Model)


class NodeConfig(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cloud: str = Field(min_length=1)
    zone: str = ""
    address: str = Field(min_length=1, description="where clients reach this node's atServers")


class TLSFiles(_Model):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TLSFiles:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} file {path} does not exist")
        # Load them now, so a wrong file is a config error and not a traceback later.
        try:
            if self.ca is not None:
                ssl.create_default_context(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ca file {self.ca} holds no usable certificate: {exc}") from None
        try:
            if self.cert is not None and self.key is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cert {self.cert} and key {self.key} are not a usable pair: {exc}"
            ) from None
        return self


class EtcdConfig(_Model):
    endpoints: list[str] = Field(min_length=1)
    tls: TLSFiles | None = None
    username: str | None = None
    password: str | None = None

    @field_validator("endpoints")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for ep in value:
            host, sep, port = ep.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"endpoint {ep!r} is not host:port")
        return value


class ConsulDCSConfig(_Model):
    url: str | None = Field(default=None, description="defaults to consul.url")
    token: str | None = None
    lock_delay: float = Field(default=15.0, ge=0)
    session_check_ttl: float | None = Field(
        default=None,
        ge=1,
        description="bind the session to serfHealth and a TTL check of this many seconds "
        "(failover in seconds, not 2 x ttl); needs renew_deadline + stop_budget < lock_delay",
    )


class DCSConfig(_Model):
    backend: Literal["etcd", "consul"]
    prefix: str = Field(default="atfailover", min_length=1)
    etcd: EtcdConfig | None = None
    consul: ConsulDCSConfig | None = None

    @model_validator(mode="after")
    def _section(self) -> DCSConfig:
        if self.backend == "etcd" and self.etcd is None:
            raise ValueError("backend is etcd but the dcs.etcd section (endpoints) is missing")
        return self


class TimingConfig(_Model):
    ttl: float
    renew_interval: float | None = None
    renew_deadline: float | None = None
    stop_budget: float | None = None
    request_timeout: float | None = None
    probe_interval: float = Field(
        default=5.0, gt=0, description="seconds between probes of one atServer (spread)"
    )
    resync_interval: float = Field(
        default=30.0, gt=0, description="seconds between full reconciles (anti-entropy)"
    )


class ConsulRegistration(_Model):
    url: str = Field(min_length=1, description="the Consul agent of this node")
    token: str | None = None
    service_name: str = Field(
        default="atserver",
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        max_length=60,
        description="base name of the atServer services: the legacy layout's service, and "
        "the shards' <name>-<hex>",
    )
    shards: tuple[int, ...] = Field(
        default=(DEFAULT_SHARDS,),
        description="layouts to register every atSign in (directory.shards): shard counts, "
        "1 = the legacy single service; [1, 256] during the migration",
    )
    deregister_critical_after: str = "1m"
    request_timeout: float = Field(default=2.0, gt=0)

    @field_validator("shards", mode="before")
    @classmethod
    def _one_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)  # shards: 256
        return value

    @field_validator("shards")
    @classmethod
    def _layouts(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for count in value:
            check_shards(count)
        return normalize_layouts(value)

    @field_validator("deregister_critical_after")
    @classmethod
    def _at_least_a_minute(cls, value: str) -> str:
        seconds = go_duration_seconds(value)
        if seconds < 60:
            raise ValueError(
                f"{value!r} is below Consul's minimum of 1m (Consul would silently use 1m)"
            )
        return value


class RunnerConfig(_Model):
    kind: Literal["process", "docker"]
    image: str | None = None
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict, description="environment of every atServer (process or container)"
    )
    port_range: tuple[int, int]
    data_root: Path
    state_dir: Path
    tls: TLSFiles | None = None
    docker_url: str | None = None
    stop_timeout: float = Field(default=5.0, gt=0)
    start_timeout: float = Field(default=20.0, gt=0)

    @field_validator("port_range")
    @classmethod
    def _ports(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not (1 <= low <= high <= 65535):
            raise ValueError(
                f"must be [low, high] with 1 <= low <= high <= 65535, got {list(value)}"
            )
        return value

    @model_validator(mode="after")
    def _image(self) -> RunnerConfig:
        if self.kind == "docker" and not self.image:
            raise ValueError("kind is docker but no image is given")
        return self


class CephFSConfig(_Model):
    """How this node reaches CephFS (``storage.kind: cephfs``); see docs/storage.md."""

    conf: Path = Field(description="ceph.conf of the cluster")
    fs_name: str = Field(default="atfs", min_length=1)
    entity: str = Field(
        pattern=r"^client\.[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="this node's cephx user (client.<node>), limited to the data path",
    )
    keyring: Path | None = Field(default=None, description="its keyring (managed mounts)")
    root: str = Field(
        default="/atservers", pattern=r"^/", description="the path in the fs at data_root"
    )
    mount: Literal["managed", "external"] = Field(
        default="managed",
        description="managed: the supervisor runs ceph-fuse and mounts anew after a fence",
    )
    admin_socket: Path | None = Field(
        default=None, description="the mount's admin socket (default: in state_dir)"
    )
    fencer_entity: str = Field(
        default="client.fence", pattern=r"^client\.[A-Za-z0-9_][A-Za-z0-9_.-]*$"
    )
    fencer_keyring: Path = Field(description="keyring of the fencer key (evict, blocklist)")
    evict_timeout: float = Field(default=10.0, gt=0)
    mount_timeout: float = Field(default=60.0, gt=0)
    ceph_fuse: str = Field(default="ceph-fuse", min_length=1)

    @model_validator(mode="after")
    def _managed_needs_keyring(self) -> CephFSConfig:
        if self.mount == "managed" and self.keyring is None:
            raise ValueError("mount is managed but no keyring is given")
        for name in ("conf", "fencer_keyring", "keyring"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} file {path} does not exist")
        return self


class StorageConfig(_Model):
    """Where ``runner.data_root`` lives, and how the node checks it (docs/storage.md)."""

    kind: Literal["local", "shared", "cephfs"] = Field(
        default="local",
        description="local: one machine; shared: any POSIX shared fs; cephfs: with eviction",
    )
    probe_interval: float = Field(default=2.0, gt=0)
    probe_timeout: float = Field(default=2.0, gt=0)
    fail_after: int = Field(default=2, ge=1, description="failed probes in a row: not ready")
    fstype: str | None = Field(
        default=None, description="the file system type data_root must be on (shared)"
    )
    cephfs: CephFSConfig | None = None

    @model_validator(mode="after")
    def _cephfs_section(self) -> StorageConfig:
        if self.kind == "cephfs" and self.cephfs is None:
            raise ValueError("kind is cephfs but the storage.cephfs section is missing")
        if self.kind != "cephfs" and self.cephfs is not None:
            raise ValueError(f"kind is {self.kind}: the storage.cephfs section does not apply")
        return self


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and 127.0.0.0/8 or ::1 (not for wildcards or names)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenSource(_Model):
    """Where one role's bearer token(s) come from: a file (one per line) or a variable.

    The token is read when the config loads, so a missing or weak one is a config error that
    names the file or variable (never the value).
    """

    file: Path | None = None
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> TokenSource:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        self.tokens((info.context or {}).get("env"))
        return self

    def tokens(self, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Every token of the source (the first is the one a client sends); ``env``: the
        variables to read (default: the process's)."""
        if self.file is not None:
            return read_token_file(self.file)
        assert self.env is not None
        return read_token_env(self.env, env)


class APIAuthConfig(_Model):
    """Bearer tokens per role (docs/supervisor.md, "The node API and its threat model")."""

    operator_token: TokenSource = Field(description="everything: status, drain, resume, handoff")
    peer_token: TokenSource | None = Field(
        default=None, description="other nodes: failback handoffs that the placement allows"
    )
    registrar_token: TokenSource | None = Field(
        default=None, description="the registrar: inventory operations only"
    )

    @model_validator(mode="after")
    def _one_role_per_token(self, info: ValidationInfo) -> APIAuthConfig:
        env = (info.context or {}).get("env")
        owner: dict[str, str] = {}
        for role in ("operator", "peer", "registrar"):
            source: TokenSource | None = getattr(self, f"{role}_token")
            for token in source.tokens(env) if source is not None else ():
                if owner.setdefault(token, role) != role:
                    raise ValueError(
                        f"the {owner[token]} and {role} tokens are the same: a token shared by "
                        "two roles gives the weaker one the stronger one's rights"
                    )
        return self


DEFAULT_PUBLIC_LISTEN = "127.0.0.1:8082"
"""The read-only listener (/healthz, /readyz, /metrics) when the API needs credentials."""


class HTTPConfig(_Model):
    """The node API (``listen``) and its read-only twin (``public_listen``)."""

    listen: str = "127.0.0.1:8081"
    tls: TLSFiles | None = Field(
        default=None,
        description="cert+key: serve HTTPS; ca: verify the node APIs this node and its CLI call",
    )
    auth: APIAuthConfig | None = None
    public_listen: str | None = Field(
        default=None,
        description="plain HTTP, no credentials: /healthz, /readyz, /metrics (default "
        f"{DEFAULT_PUBLIC_LISTEN} when auth is set; without auth the API serves them)",
    )
    allow_unauthenticated: bool = Field(
        default=False, description="serve drain/handoff without credentials beyond loopback"
    )

    @field_validator("listen", "public_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            _split_host_port(value)
        return value

    @model_validator(mode="after")
    def _safe_beyond_loopback(self) -> HTTPConfig:
        local = is_loopback(self.host)
        if not local and self.auth is None and not self.allow_unauthenticated:
            raise ValueError(
                f"listen {self.listen} is reachable beyond this host but auth is not set: anyone "
                "who reaches it could drain the node (set auth and tls, or listen on loopback)"
            )
        if not local and self.auth is not None and (self.tls is None or self.tls.cert is None):
            raise ValueError(
                f"auth is set but tls.cert is not: tokens would cross the network to "
                f"{self.listen} in clear text"
            )
        if self.public is not None and _split_host_port(self.public) == (self.host, self.port):
            raise ValueError(f"public_listen {self.public} is the same address as listen")
        return self

    @property
    def host(self) -> str:
        return _split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_host_port(self.listen)[1]

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None and self.tls.cert is not None else "http"

    @property
    def public(self) -> str | None:
        """The read-only listener's address, if one is served."""
        if self.public_listen is not None:
            return self.public_listen
        return DEFAULT_PUBLIC_LISTEN if self.auth is not None else None


class PlacementConfig(_Model):
    capacity: int = Field(default=1000, ge=0)
    failback: Literal["manual", "auto"] = "manual"
    prefer_other_cloud: bool = True
    rank_delay: float = Field(default=0.5, ge=0, description="seconds of standby delay per rank")
    failback_check_interval: float = Field(default=10.0, gt=0)
    start_concurrency: int = Field(
        default=16, ge=1, le=256, description="actions (starts, handoffs) run at the same time"
    )
    drain_concurrency: int = Field(
        default=8, ge=1, le=256, description="atSigns a drain hands off at the same time"
    )


class InventoryNode(_Model):
    name: str = Field(min_length=1)
    cloud: str = Field(min_length=1)
    api: str | None = None


class InventoryAtSign(_Model):
    atsign: str
    prefer_nodes: list[str] = Field(default_factory=list)
    prefer_clouds: list[str] = Field(default_factory=list)

    @field_validator("atsign")
    @classmethod
    def _atsign(cls, value: str) -> str:
        return normalize_atsign(value)


class Inventory(_Model):
    source: Literal["static", "dcs"] = Field(
        default="static",
        description="static: the atSigns and nodes listed here; dcs: the atSign records in "
        "the DCS (supervisor atsigns ...) and the live nodes",
    )
    nodes: list[InventoryNode] = Field(default_factory=list)
    atsigns: list[InventoryAtSign] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
        if self.source == "dcs" and (self.atsigns or self.nodes):
            listed = "atsigns" if self.atsigns else "nodes"
            raise ValueError(
                f"source is dcs, so the atSigns are the DCS records and the nodes the live "
                f"ones: remove inventory.{listed} (import a list once with "
                f"'supervisor atsigns import FILE')"
            )
        seen: set[str] = set()
        for entry in self.atsigns:
            if entry.atsign in seen:
                raise ValueError(f"atSign {entry.atsign} is listed twice")
            seen.add(entry.atsign)
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError("a node name is listed twice")
        return self


class SupervisorConfig(_Model):
    node: NodeConfig
    dcs: DCSConfig
    timing: TimingConfig
    consul: ConsulRegistration
    runner: RunnerConfig
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inventory: Inventory
    log_json: bool = False

    @property
    def heartbeat_path(self) -> Path:
        return self.runner.state_dir / "heartbeat.json"

    @property
    def fence_log_path(self) -> Path:
        return self.runner.state_dir / "fence.log"

    @property
    def session_record_path(self) -> Path:
        """Where the session keeper records its session id (supervisor.resume)."""
        return self.runner.state_dir / "session.json"

    @property
    def dcs_consul_url(self) -> str:
        if self.dcs.consul is not None and self.dcs.consul.url:
            return self.dcs.consul.url
        return self.consul.url


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Apply ``SUPERVISOR__A__B=value`` overrides in place; return the dotted fields changed."""
    changed: list[str] = []
    for key in sorted(env):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        raw = env[key]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, path, value)
        changed.append(".".join(path))
    return changed


def _load_yaml(path: Path, field: str = "") -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), field, "file does not exist") from None
    except OSError as exc:
        raise ConfigError(str(path), field, f"cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), field, f"not valid YAML{where}: {problem}") from None


def _problems(file: str, exc: ValidationError, prefix: str = "") -> list[Problem]:
    """Every error pydantic found, each as a Problem with a dotted field."""
    out: list[Problem] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append(Problem(file, field, msg))
    return out


def _section(model: type[_M], data: dict[str, Any], key: str) -> _M | None:
    """One section validated on its own (None if missing or invalid): the cross-section
    checks then still run when another section of the file has mistakes."""
    value = data.get(key)
    if not isinstance(value, dict):
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


_PATH_FIELDS = (
    ("runner", "data_root"),
    ("runner", "state_dir"),
    ("runner", "tls", "ca"),
    ("runner", "tls", "cert"),
    ("runner", "tls", "key"),
    ("dcs", "etcd", "tls", "ca"),
    ("dcs", "etcd", "tls", "cert"),
    ("dcs", "etcd", "tls", "key"),
    ("storage", "cephfs", "conf"),
    ("storage", "cephfs", "keyring"),
    ("storage", "cephfs", "fencer_keyring"),
    ("storage", "cephfs", "admin_socket"),
    ("http", "tls", "ca"),
    ("http", "tls", "cert"),
    ("http", "tls", "key"),
    ("http", "auth", "operator_token", "file"),
    ("http", "auth", "peer_token", "file"),
    ("http", "auth", "registrar_token", "file"),
)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's directory."""
    for fields in _PATH_FIELDS:
        node: Any = data
        for key in fields[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            value = node.get(fields[-1])
            if isinstance(value, str) and value and not Path(value).is_absolute():
                node[fields[-1]] = str(base / value)


def _inventory_problems(
    node: NodeConfig | None, inventory: Inventory | None, inv_file: str
) -> list[Problem]:
    if inventory is None:
        return []
    out: list[Problem] = []
    names = {n.name for n in inventory.nodes}
    if node is not None and inventory.nodes and node.name not in names:
        out.append(
            Problem(inv_file, "inventory.nodes", f"this node ({node.name}) is not in the node list")
        )
    for i, entry in enumerate(inventory.atsigns):
        unknown = [n for n in entry.prefer_nodes if names and n not in names]
        if unknown:
            out.append(
                Problem(
                    inv_file,
                    f"inventory.atsigns.{i}.prefer_nodes",
                    f"unknown node(s) {unknown} for {entry.atsign}",
                )
            )
    return out


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> SupervisorConfig:
    """Read, override from the environment, and validate a node file (and its inventory file).

    Raises :class:`ConfigError` listing every problem found, each naming the file, the
    field and the problem (a file that cannot be read or parsed stops at that one).
    """
    from supervisor.timing import consul_check_problems, timing_problems

    path = Path(path)
    file = str(path)
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the top level must be a mapping of sections")
    apply_env(data, os.environ if env is None else env)

    problems: list[Problem] = []
    inv = data.get("inventory")
    inv_file = file
    if isinstance(inv, dict) and "path" in inv:
        extra = set(inv) - {"path"}
        if extra:
            raise ConfigError(file, "inventory", f"give either path or nodes/atsigns, not {extra}")
        inv_path = Path(str(inv["path"]))
        if not inv_path.is_absolute():
            inv_path = path.parent / inv_path
        inv_file = str(inv_path)
        loaded = _load_yaml(inv_path, "inventory.path")
        if not isinstance(loaded, dict):
            raise ConfigError(
                inv_file, "", "the inventory must be a mapping with nodes and atsigns"
            )
        try:
            data["inventory"] = Inventory.model_validate(loaded).model_dump()
        except ValidationError as exc:
            problems += _problems(inv_file, exc)
            data.pop("inventory")
    _resolve_paths(data, path.parent)
    cfg: SupervisorConfig | None = None
    try:
        cfg = SupervisorConfig.model_validate(data, context={"env": env})
    except ValidationError as exc:
        problems += [
            p for p in _problems(file, exc) if not (inv_file != file and p.field == "inventory")
        ]
    problems += _inventory_problems(
        _section(NodeConfig, data, "node"), _section(Inventory, data, "inventory"), inv_file
    )
    # Lenient reads of the backend and its member count: a mistake elsewhere in dcs:
    # must not hide a timing rule that the backend breaks.
    dcs: dict[str, Any] = data["dcs"] if isinstance(data.get("dcs"), dict) else {}
    backend = dcs.get("backend")
    etcd: dict[str, Any] = dcs["etcd"] if isinstance(dcs.get("etcd"), dict) else {}
    endpoints = etcd.get("endpoints")
    timing = _section(TimingConfig, data, "timing")
    if backend in ("etcd", "consul") and timing is not None:
        members = len(endpoints) if isinstance(endpoints, list) else 0
        problems += [
            Problem(file, f, msg) for f, msg in timing_problems(str(backend), members, timing)
        ]
    consul_dcs = _section(ConsulDCSConfig, dcs, "consul")
    if backend == "consul" and timing is not None and consul_dcs is not None:
        problems += [
            Problem(file, "dcs.consul.session_check_ttl", msg)
            for msg in consul_check_problems(timing, consul_dcs)
        ]
    if problems or cfg is None:
        raise ConfigError.of(problems)
    return cfg
