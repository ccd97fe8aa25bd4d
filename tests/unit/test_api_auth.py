"""The node API's credentials: token sources, config rules, roles, and the middleware."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from supervisor.api_auth import ROLE_KEY, Credentials, Role, auth_middleware
from supervisor.config import ConfigError, load_config
from supervisor.metrics import SupervisorMetrics
from supervisor.tokens import TokenError, parse_tokens, read_token_env, read_token_file
from testbed.tls import TestCA
from tests.unit.test_supervisor_config import BASE

OPERATOR = "o" * 32
PEER = "p" * 32


def token_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_files_rotation_comments_and_errors_never_show_the_value(tmp_path: Path) -> None:
    path = token_file(tmp_path, "t", f"# rotated 2026-12\n{OPERATOR}\n\n{PEER}\n")
    assert read_token_file(path) == (OPERATOR, PEER)
    with pytest.raises(TokenError, match=r"line 1 is 5 characters, a token needs at least 16"):
        parse_tokens("short\n", "x")
    with pytest.raises(TokenError, match="holds no token"):
        parse_tokens("# nothing\n\n", "x")
    with pytest.raises(TokenError, match="whitespace inside") as exc:
        parse_tokens("abcdefgh ijklmnopqrst\n", "x")
    assert "ijklmnop" not in str(exc.value)
    world = token_file(tmp_path, "w", OPERATOR + "\n", 0o644)
    with pytest.raises(TokenError, match=r"readable by every user \(mode 0644\)") as exc:
        read_token_file(world)
    assert OPERATOR not in str(exc.value)
    with pytest.raises(TokenError, match="does not exist"):
        read_token_file(tmp_path / "missing")
    assert read_token_env("T", {"T": OPERATOR}) == (OPERATOR,)
    with pytest.raises(TokenError, match="environment variable T is not set"):
        read_token_env("T", {})


def node_file(tmp_path: Path, http: dict[str, Any]) -> Path:
    data = copy.deepcopy(BASE)
    data["http"] = http
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems(tmp_path: Path, http: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(node_file(tmp_path, http), env=env or {})
    return str(exc.value)


def test_an_api_beyond_loopback_needs_auth_and_tls(tmp_path: Path) -> None:
    out = problems(tmp_path, {"listen": "10.1.2.3:8470"})
    assert "http: Value" not in out
    assert "listen 10.1.2.3:8470 is reachable beyond this host but auth is not set" in out
    op = token_file(tmp_path, "op", OPERATOR)
    out = problems(
        tmp_path, {"listen": "0.0.0.0:8470", "auth": {"operator_token": {"file": str(op)}}}
    )
    assert "auth is set but tls.cert is not" in out
    # An explicit opt-out, and loopback without auth, both load.
    load_config(node_file(tmp_path, {"listen": "10.1.2.3:8470", "allow_unauthenticated": True}), {})
    cfg = load_config(node_file(tmp_path, {"listen": "127.0.0.5:8470"}), env={})
    assert cfg.http.public is None and cfg.http.scheme == "http"


def test_token_config_errors_name_the_field_and_source(tmp_path: Path) -> None:
    op = token_file(tmp_path, "op", OPERATOR)
    out = problems(
        tmp_path,
        {"listen": "127.0.0.1:1", "auth": {"operator_token": {"file": str(op), "env": "X"}}},
    )
    assert "http.auth.operator_token: give exactly one of file or env" in out
    out = problems(tmp_path, {"listen": "127.0.0.1:1", "auth": {"operator_token": {"env": "X"}}})
    assert "http.auth.operator_token: environment variable X is not set or empty" in out
    out = problems(
        tmp_path,
        {
            "listen": "127.0.0.1:1",
            "auth": {"operator_token": {"file": str(op)}, "peer_token": {"env": "PEER"}},
        },
        env={},
    )
    assert "http.auth.peer_token: environment variable PEER" in out
    same = token_file(tmp_path, "same", f"{PEER}\n{OPERATOR}\n")
    out = problems(
        tmp_path,
        {
            "listen": "127.0.0.1:1",
            "auth": {"operator_token": {"file": str(op)}, "peer_token": {"file": str(same)}},
        },
    )
    assert "the operator and peer tokens are the same" in out
    assert OPERATOR not in out and PEER not in out
    out = problems(tmp_path, {"listen": "127.0.0.1:1", "public_listen": "127.0.0.1:1"})
    assert "public_listen 127.0.0.1:1 is the same address as listen" in out


def test_a_full_secure_section_loads(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    pair = ca.issue("node")
    op = token_file(tmp_path, "op", OPERATOR)
    cfg = load_config(
        node_file(
            tmp_path,
            {
                "listen": "10.1.2.3:8470",
                "tls": {"ca": str(ca.cert_path), "cert": str(pair.cert), "key": str(pair.key)},
                "auth": {"operator_token": {"file": "op"}, "peer_token": {"env": "PEER_T"}},
            },
        ),
        env={"PEER_T": PEER},
    )
    assert cfg.http.scheme == "https"
    assert cfg.http.public == "127.0.0.1:8082"
    assert cfg.http.auth is not None and cfg.http.auth.operator_token.file == op
    assert OPERATOR not in repr(cfg) and PEER not in repr(cfg)


def test_credentials_map_tokens_to_roles() -> None:
    creds = Credentials({Role.OPERATOR: [OPERATOR, "n" * 20], Role.PEER: [PEER]})
    assert creds.role_of(OPERATOR) is Role.OPERATOR
    assert creds.role_of("n" * 20) is Role.OPERATOR
    assert creds.role_of(PEER) is Role.PEER
    assert creds.role_of(PEER[:-1]) is None
    assert creds.role_of("") is None


async def test_the_middleware_refuses_counts_and_passes_the_role() -> None:
    registry = CollectorRegistry()
    metrics = SupervisorMetrics(
        registry,
        claims_held=lambda: 0.0,
        workloads_running=lambda: 0.0,
        session_alive=lambda: 1.0,
        draining=lambda: 0.0,
    )
    creds = Credentials({Role.OPERATOR: [OPERATOR], Role.PEER: [PEER]})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"role": request[ROLE_KEY].value})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[auth_middleware(creds, metrics)])
    app.router.add_post("/drain", echo)
    app.router.add_post("/handoff", echo)
    app.router.add_get("/healthz", health)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/drain")
        assert resp.status == 401 and "WWW-Authenticate" in resp.headers
        resp = await client.post("/drain", headers={"Authorization": f"Basic {OPERATOR}"})
        assert resp.status == 401
        assert (await resp.json())["error"] == "the Authorization header must be 'Bearer <token>'"
        resp = await client.post("/drain", headers={"Authorization": f"Bearer {PEER}"})
        assert resp.status == 403
        resp = await client.post("/handoff", headers={"Authorization": f"Bearer {PEER}"})
        assert resp.status == 200 and (await resp.json())["role"] == "peer"
        resp = await client.post("/drain", headers={"Authorization": f"Bearer {OPERATOR}"})
        assert resp.status == 200 and (await resp.json())["role"] == "operator"
        resp = await client.get("/healthz")
        assert resp.status == 200
        resp = await client.get("/nothing-here")
        assert resp.status == 401
    value = registry.get_sample_value
    assert value("atfailover_api_refusals_total", {"path": "/drain", "status": "401"}) == 2
    assert value("atfailover_api_refusals_total", {"path": "/drain", "status": "403"}) == 1
    assert value("atfailover_api_refusals_total", {"path": "other", "status": "401"}) == 1
