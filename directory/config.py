"""The directory's settings: command line > ``ATDIRECTORY_*`` environment > YAML file > defaults.

Every error names the setting and where its bad value came from, e.g.
``--port (command line): Input should be less than or equal to 65535``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from directory.shards import DEFAULT_SHARDS, followed_services, normalize_layouts

ENV_PREFIX = "ATDIRECTORY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class DirectoryConfig(BaseModel):
    """All settings of ``atdirectory serve`` (times in seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consul: str = Field("http://127.0.0.1:8500", description="Consul HTTP API URL")
    consul_token: str | None = Field(None, description="Consul ACL token (X-Consul-Token)")
    service: str = Field(
        "atserver",
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        max_length=60,
        description="Consul service name of the legacy layout; shards add -<hex>",
    )
    shards: tuple[int, ...] = Field(
        (DEFAULT_SHARDS,),
        description="layouts followed: shard counts, 1 = legacy single service; the same "
        "list as the supervisors' consul.shards, or a superset while migrating",
    )
    consul_wait: float = Field(30.0, ge=1.0, le=600.0, description="failing-checks query wait")
    consul_list_wait: float = Field(300.0, ge=1.0, le=600.0, description="service list query wait")
    consul_connect_timeout: float = Field(3.0, gt=0, le=60.0)
    consul_backoff_initial: float = Field(0.2, gt=0, le=60.0)
    consul_backoff_max: float = Field(5.0, gt=0, le=300.0)
    consul_stale: bool = Field(False, description="allow any Consul server to answer")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(64, ge=0, le=65535)
    cert: Path = Field(description="TLS certificate chain (PEM)")
    key: Path = Field(description="TLS private key (PEM)")
    metrics_host: str = Field("127.0.0.1", min_length=1)
    metrics_port: int = Field(9640, ge=0, le=65535, description="0: any free port")
    max_line_bytes: int = Field(512, ge=64, le=65536)
    idle_timeout: float = Field(300.0, gt=0, le=86400.0)
    max_connections: int = Field(10_000, ge=1, le=1_000_000)
    handshake_timeout: float = Field(10.0, gt=0, le=300.0)
    write_timeout: float = Field(10.0, gt=0, le=300.0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("consul")
    @classmethod
    def _consul_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL like http://127.0.0.1:8500, got {value!r}")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}: {exc}") from exc
        return value.rstrip("/")

    @field_validator("shards", mode="before")
    @classmethod
    def _shards_text(cls, value: Any) -> Any:
        # "1,256" (command line, environment), 256 or [1, 256] (file).
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ValueError(
                    f"must be shard counts separated by commas, like 1,256; got {value!r}"
                ) from None
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        return value

    @field_validator("shards")
    @classmethod
    def _shards_layouts(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return normalize_layouts(value)

    @property
    def services(self) -> list[str]:
        """Every Consul service the directory follows (legacy name and shards)."""
        return followed_services(self.service, self.shards)

    @field_validator("cert", "key")
    @classmethod
    def _readable_file(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> DirectoryConfig:
        if self.consul_backoff_initial > self.consul_backoff_max:
            raise ValueError("consul_backoff_initial must not exceed consul_backoff_max")
        return self


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each bad setting and its source."""


FIELDS = tuple(DirectoryConfig.model_fields)


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) file; raises :class:`ConfigError` naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of settings")
    return data


def env_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``ATDIRECTORY_<FIELD>`` variables; an unknown one is an error (likely a typo)."""
    out: dict[str, str] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name not in DirectoryConfig.model_fields:
            raise ConfigError(f"environment variable {var}: unknown setting {name!r}")
        out[name] = value
    return out


def load_config(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: Path | None = None,
) -> DirectoryConfig:
    """Merge the sources (command line wins) and validate; raises :class:`ConfigError`."""
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is not None:
        for key, value in read_config_file(config_file).items():
            merged[key] = value
            source[str(key)] = f"{config_file}: {key}"
    for key, value in env_settings(env).items():
        merged[key] = value
        source[key] = f"{env_name(key)} (environment)"
    for key, value in cli.items():
        if value is not None:
            merged[key] = value
            source[key] = f"{cli_flag(key)} (command line)"
    try:
        return DirectoryConfig(**merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            name = str(loc[0]) if loc else ""
            where = source.get(name) or (
                f"{cli_flag(name)} / {env_name(name)} / config file {name}"
                if name in DirectoryConfig.model_fields
                else f"setting {name}"
            )
            if not name:
                where = "settings"
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "required but not given"
            elif err["type"] == "extra_forbidden":
                msg = "unknown setting"
            lines.append(f"{where}: {msg}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
