"""The node configuration: one YAML file per node, validated at load.

Every mistake is reported as ``FILE: FIELD: PROBLEM`` (:class:`ConfigError`),
and the CLI exits with code 2 on it. Environment variables override fields
(12-factor): ``SUPERVISOR__DCS__BACKEND=consul`` sets ``dcs.backend``; values
are parsed as YAML, so ``SUPERVISOR__DCS__ETCD__ENDPOINTS='[a:1, b:2]'`` works.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leases.base import normalize_atsign

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


class ConfigError(Exception):
    """A configuration problem: which file, which field, what is wrong."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {problem}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    probe_interval: float = Field(default=1.0, gt=0)


class ConsulRegistration(_Model):
    url: str = Field(min_length=1, description="the Consul agent of this node")
    token: str | None = None
    service_name: str = Field(default="atserver", pattern=r"^[a-z0-9][a-z0-9-]*$")
    deregister_critical_after: str = "1m"
    request_timeout: float = Field(default=2.0, gt=0)

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


class HTTPConfig(_Model):
    listen: str = "127.0.0.1:8081"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class PlacementConfig(_Model):
    capacity: int = Field(default=1000, ge=0)
    failback: Literal["manual", "auto"] = "manual"
    prefer_other_cloud: bool = True
    rank_delay: float = Field(default=0.5, ge=0, description="seconds of standby delay per rank")
    failback_check_interval: float = Field(default=10.0, gt=0)


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
    nodes: list[InventoryNode] = Field(default_factory=list)
    atsigns: list[InventoryAtSign] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
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
    inventory: Inventory
    log_json: bool = False

    @property
    def heartbeat_path(self) -> Path:
        return self.runner.state_dir / "heartbeat.json"

    @property
    def fence_log_path(self) -> Path:
        return self.runner.state_dir / "fence.log"

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


def _first_error(file: str, exc: ValidationError, prefix: str = "") -> ConfigError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field = ".".join(p for p in (prefix, loc) if p)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(file, field, msg)


_PATH_FIELDS = (
    ("runner", "data_root"),
    ("runner", "state_dir"),
    ("runner", "tls", "ca"),
    ("runner", "tls", "cert"),
    ("runner", "tls", "key"),
    ("dcs", "etcd", "tls", "ca"),
    ("dcs", "etcd", "tls", "cert"),
    ("dcs", "etcd", "tls", "key"),
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


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> SupervisorConfig:
    """Read, override from the environment, and validate a node file (and its inventory file).

    Raises :class:`ConfigError` naming the file, the field and the problem.
    """
    from supervisor.timing import validate_timing

    path = Path(path)
    file = str(path)
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the top level must be a mapping of sections")
    apply_env(data, os.environ if env is None else env)

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
            inventory = Inventory.model_validate(loaded)
        except ValidationError as exc:
            raise _first_error(inv_file, exc) from None
        data["inventory"] = inventory.model_dump()
    _resolve_paths(data, path.parent)
    try:
        cfg = SupervisorConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(file, exc) from None
    names = {n.name for n in cfg.inventory.nodes}
    if cfg.inventory.nodes and cfg.node.name not in names:
        raise ConfigError(
            inv_file, "inventory.nodes", f"this node ({cfg.node.name}) is not in the node list"
        )
    for i, entry in enumerate(cfg.inventory.atsigns):
        unknown = [n for n in entry.prefer_nodes if names and n not in names]
        if unknown:
            raise ConfigError(
                inv_file,
                f"inventory.atsigns.{i}.prefer_nodes",
                f"unknown node(s) {unknown} for {entry.atsign}",
            )
    validate_timing(cfg, file)
    return cfg
