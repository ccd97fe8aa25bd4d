"""Helpers for tests that drive a :class:`chaos.cluster.Cluster` from outside: its nodes' APIs,
the ``supervisor`` CLI, the directory and an authenticated at-protocol client."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from chaos.atclient import client_ssl_context, lookup
from chaos.cluster import Cluster, Node
from chaos.readback import ReadBack, read_back, write_keys
from tests.integration.supervisor.cluster import cli as cli  # the one CLI runner, re-exported


def status_row(node: Node, atsign: str) -> dict[str, Any]:
    """``supervisor status --json``'s row of ``atsign``, read with ``node``'s config."""
    res = cli("status", "--config", str(node.config_path), "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["atsign"]: r for r in json.loads(res.stdout)}
    return rows[atsign]


def readyz(node: Node) -> dict[str, Any]:
    """The node's ``/readyz`` body (also when it answers 503); ``{}`` when it does not answer."""
    try:
        with urllib.request.urlopen(node.api + "/readyz", timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return body


def owner(c: Cluster, atsign: str) -> Node:
    """The node whose /status says it holds the claim of ``atsign``."""
    for n in c.nodes:
        st = n.status(timeout=2.0) or {}
        if atsign in st.get("claims_held", []):
            return n
    raise AssertionError(f"nobody holds {atsign}")


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 0.2 s; the seconds it took, or AssertionError naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def directory_answer(c: Cluster, atsign: str) -> tuple[str, int] | None:
    ctx = client_ssl_context(c.ca.cert_path)
    return asyncio.run(lookup(*c.directory_address, atsign, ctx, 3.0))


def served_port(node: Node, atsign: str) -> int | None:
    """The port of ``node``'s running atServer of ``atsign`` (its /status), if any."""
    for w in (node.status(timeout=2.0) or {}).get("workloads", []):
        if w["atsign"] == atsign and w["state"] == "running":
            return int(w["port"])
    return None


def served_by(c: Cluster, node: Node, atsign: str) -> bool:
    """The directory names ``node``'s running atServer of ``atsign``."""
    answer = directory_answer(c, atsign)
    return answer is not None and answer[1] == served_port(node, atsign)


def write(c: Cluster, count: int, index: int = 0) -> list[tuple[str, str]]:
    """Write ``count`` keys to the cluster's ``index``-th atSign; the acknowledged ones."""
    ctx = client_ssl_context(c.ca.cert_path)
    return asyncio.run(write_keys(c.atsigns[index], c.directory_address, ctx, count))


def read(c: Cluster, written: list[tuple[str, str]], index: int = 0) -> ReadBack:
    """Read ``written`` back from whichever atServer the directory names now."""
    ctx = client_ssl_context(c.ca.cert_path)
    return asyncio.run(read_back(c.atsigns[index], c.directory_address, ctx, written))
