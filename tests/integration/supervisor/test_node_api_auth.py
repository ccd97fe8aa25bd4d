"""The node API with TLS and bearer tokens, against real `supervisor run` nodes (etcd, CephFS).

Who may do what: no credential or a wrong one gets 401, a peer node's or the registrar's
credential gets 403 for a drain, the operator's passes; plain HTTP to the TLS port fails;
a failback between two real nodes still works with the peer credential; no token appears
in any log line or in /status.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.supervisor.cluster import Cluster, Node, cli
from tests.integration.supervisor.conftest import MakeCluster


def call(
    node: Node,
    method: str,
    path: str,
    token: str | None,
    body: Any = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTPS request to the node's API with ``token`` (or none): (status, JSON body)."""
    assert node.secure is not None
    req = urllib.request.Request(
        node.api + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method=method,
    )
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=str(node.secure.ca))
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def refusals(node: Node) -> dict[tuple[str, str], float]:
    """``atfailover_api_refusals_total`` by (path, status), from the public listener."""
    with urllib.request.urlopen(node.public_api + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("atfailover_api_refusals_total{"):
            labels, _, value = line.partition("} ")
            fields = dict(
                part.split("=", 1) for part in labels.split("{", 1)[1].replace('"', "").split(",")
            )
            out[(fields["path"], fields["status"])] = float(value)
    return out


def every_log(base: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace")
        for pattern in ("*.log", "*.out")
        for p in base.rglob(pattern)
        if p.is_file()
    )


@pytest.mark.timeout(420)
def test_credentials_roles_tls_and_failback_with_the_peer_token(make_cluster: MakeCluster) -> None:
    c: Cluster = make_cluster(
        "etcd",
        nodes=(("a1", "A"), ("b1", "B")),
        atsigns=("@alice", "@bob"),
        atsign_options={"@alice": {"prefer_nodes": ["a1"]}, "@bob": {"prefer_nodes": ["b1"]}},
        start=False,
        overrides={"placement.failback": "auto", "placement.failback_check_interval": 2},
        secure=True,
    )
    assert c.secure is not None
    tokens = c.secure.tokens
    a1, b1 = c.nodes["a1"], c.nodes["b1"]

    # Failback between two real nodes, over TLS, with the peer credential.
    took = c.fail_back("@alice", "a1", "b1", "@alice handed back to a1 with the peer credential")
    print(f"\nMEASURE failback over TLS with the peer token: {took:.1f}s after a1 started")
    asked = [s for s in a1.sentences() if "hand back @alice" in s]
    assert any(": 200 " in s for s in asked), asked

    # A drain: refused without a credential, with a wrong one, a peer's and the registrar's.
    status, body = call(a1, "POST", "/drain", None, {})
    assert status == 401 and "no credential" in body["error"], body
    status, body = call(a1, "POST", "/drain", "x" * 48, {})
    assert status == 401 and "not valid" in body["error"], body
    status, body = call(a1, "POST", "/drain", tokens["peer"], {})
    assert status == 403 and body["error"] == "the peer credential may not POST /drain", body
    status, body = call(a1, "POST", "/drain", tokens["registrar"], {})
    assert status == 403, body
    status, body = call(a1, "GET", "/status", None)
    assert status == 401, body
    status, body = call(a1, "GET", "/status", tokens["peer"])
    assert status == 403, body
    # A peer may only ask for a failback the placement allows: @bob prefers b1, not a1.
    status, body = call(
        b1, "POST", "/handoff", tokens["peer"], {"atsign": "@bob", "for_node": "a1"}
    )
    assert status == 403 and "does not prefer a1 over b1" in body["error"], body
    status, body = call(b1, "POST", "/handoff", tokens["peer"], {"atsign": "@bob"})
    assert status == 403 and "for_node" in body["error"], body
    assert not a1.status()["drained"]  # type: ignore[index]
    assert c.all_once()

    # Plain HTTP to the TLS port does not work.
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{a1.http_port}/healthz", timeout=5)
    # The read-only listener needs no credential and serves nothing that changes state.
    with urllib.request.urlopen(a1.public_api + "/readyz", timeout=5) as resp:
        assert json.loads(resp.read())["ready"] is True
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(a1.public_api + "/drain", data=b"{}", method="POST"), timeout=5
        )
    assert refused.value.code in (404, 405)

    counted = refusals(a1)
    assert counted.get(("/drain", "401"), 0) >= 2, counted
    assert counted.get(("/drain", "403"), 0) >= 2, counted
    assert counted.get(("/status", "401"), 0) >= 1, counted
    assert refusals(b1).get(("/handoff", "403"), 0) >= 2

    # The operator's credential: the CLI drains a1 (its config names the token file).
    res = cli("drain", "--config", str(a1.config_path), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "a1 drained: holding nothing" in res.stdout, res.stdout
    res = cli("resume", "--config", str(a1.config_path))
    assert res.returncode == 0 and "resumed" in res.stdout, res.stdout + res.stderr

    # No token in /status, in any log line of any process of the cluster, or in the CLI's output.
    shown = json.dumps(a1.status()) + json.dumps(b1.status()) + res.stdout + res.stderr
    logs = every_log(c.base)
    assert "event=api-refused status=401 method=POST path=/drain" in logs
    assert "event=api-call role=operator method=POST path=/drain" in logs
    for role, token in tokens.items():
        assert token not in shown, f"the {role} token is in /status or the CLI's output"
        assert token not in logs, f"the {role} token is in a log"


def test_cli_names_a_refused_credential(make_cluster: MakeCluster, tmp_path: Path) -> None:
    """A CLI whose config points at the peer token is refused with the reason, exit 1."""
    c = make_cluster(
        "etcd", nodes=(("a1", "A"),), atsigns=("@alice",), storage="local", secure=True
    )
    assert c.secure is not None
    c.wait(c.all_once, 60, "@alice running")
    a1 = c.nodes["a1"]
    res = cli(
        "drain",
        "--config",
        str(a1.config_path),
        env={"SUPERVISOR__HTTP__AUTH__OPERATOR_TOKEN__FILE": str(c.secure.files["peer"])},
    )
    # The same token for two roles is a config error before any request is made.
    assert res.returncode == 2, res.stdout + res.stderr
    assert "the operator and peer tokens are the same" in res.stderr, res.stderr
    wrong = tmp_path / "wrong.token"
    wrong.write_text("y" * 40 + "\n")
    wrong.chmod(0o600)
    res = cli(
        "drain",
        "--config",
        str(a1.config_path),
        env={"SUPERVISOR__HTTP__AUTH__OPERATOR_TOKEN__FILE": str(wrong)},
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "refused (401): the token is not valid for this node" in res.stderr, res.stderr
    assert not a1.status()["draining"]  # type: ignore[index]
