"""``inventory.source: dcs`` on real etcd and Consul: atSigns added and removed at runtime
with ``supervisor atsigns``, and live membership (a dead node leaves every rank, a new node
joins by starting)."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.supervisor.cluster import Cluster, cli
from tests.integration.supervisor.conftest import MakeCluster

DCS_INVENTORY = {"inventory": {"source": "dcs"}}


def _cli_ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _records(cluster: Cluster) -> dict[str, dict[str, object]]:
    node = next(iter(cluster.nodes.values()))
    doc = json.loads(_cli_ok("atsigns", "list", "--json", "-c", str(node.config_path)))
    return {e["atsign"]: e for e in doc["atsigns"]}


def _members(cluster: Cluster, name: str) -> list[str]:
    st = cluster.nodes[name].status() or {}
    return [m["name"] for m in st.get("members", [])]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["etcd", "consul"])
def test_an_added_atsign_is_served_and_a_removed_one_stopped_with_its_data_kept(
    make_cluster: MakeCluster, backend: str
) -> None:
    c = make_cluster(backend, nodes=[("a1", "A"), ("b1", "B")], atsigns=[], overrides=DCS_INVENTORY)
    a1 = c.nodes["a1"]
    cfg = str(a1.config_path)
    c.wait(lambda: all(n.ready() for n in c.nodes.values()), 60, "both nodes ready")
    c.wait(lambda: sorted(_members(c, "a1")) == ["a1", "b1"], 30, "a1 sees both members")

    # Add: served once, within the start path's cost (watch, claim, start, first probe).
    c.atsigns = ["@alice"]
    began = time.monotonic()
    out = _cli_ok("atsigns", "add", "@alice", "--prefer-clouds", "B", "-c", cfg)
    assert out.strip() == "added @alice"
    took = c.wait(c.all_once, 30, "@alice served once")
    served = time.monotonic() - began
    print(f"MEASURE {backend}: atsigns add -> passing in Consul {served:.2f}s (wait {took:.2f}s)")
    assert c.running()["@alice"][0][0] == "b1"  # its policy: cloud B
    assert served < c.ttl + 10  # generous; measured ~1-2 s
    assert _cli_ok("atsigns", "add", "@alice", "--prefer-clouds", "B", "-c", cfg).strip() == (
        "unchanged @alice"
    )

    # A policy change moves nothing by itself (failback is manual) but is recorded.
    _cli_ok("atsigns", "add", "@alice", "--prefer-clouds", "A", "-c", cfg)
    assert _records(c)["@alice"]["prefer_clouds"] == ["A"]

    # Remove: deregistered, stopped, released everywhere; the data stays.
    data_dir = next(
        n.config_path.parent / n.name / "data" / "alice"
        for n in c.nodes.values()
        if n.name == c.running()["@alice"][0][0]
    )
    assert (data_dir / ".atfailover-generation").is_file()
    assert _cli_ok("atsigns", "remove", "@alice", "-c", cfg).strip() == "removed @alice"
    c.wait(lambda: "@alice" not in c.running(), 30, "@alice stopped")
    c.wait(lambda: not c.consul_instances(passing_only=False), 30, "@alice deregistered")
    assert (data_dir / ".atfailover-generation").is_file()
    assert any("stopped and released @alice" in s for n in c.nodes.values() for s in n.sentences())
    r = cli("atsigns", "remove", "@alice", "-c", cfg)
    assert r.returncode == 1 and "no such record" in r.stderr


@pytest.mark.parametrize("backend", ["etcd", "consul"])
def test_an_import_with_one_bad_entry_writes_nothing_and_a_good_one_is_idempotent(
    make_cluster: MakeCluster, backend: str
) -> None:
    c = make_cluster(backend, nodes=[("a1", "A")], atsigns=[], overrides=DCS_INVENTORY, start=False)
    cfg = str(c.nodes["a1"].config_path)
    bad = c.base / "bad.yaml"
    bad.write_text(
        "atsigns:\n  - atsign: '@alice'\n  - {atsign: '@bob', prefer_nodes: [zz9]}\n"
        "  - atsign: '@ca/rol'\n"
    )
    r = cli("atsigns", "import", str(bad), "-c", cfg)
    assert r.returncode == 2, r
    assert "atsigns.2: atsign: not a valid atSign" in r.stderr
    assert "nothing was written" in r.stderr
    bad.write_text("atsigns:\n  - atsign: '@alice'\n  - {atsign: '@bob', prefer_nodes: [zz9]}\n")
    r = cli("atsigns", "import", str(bad), "-c", cfg)
    assert r.returncode == 2 and "@bob: prefer_nodes: unknown node(s) ['zz9']" in r.stderr, r
    assert _records(c) == {}

    good = c.base / "inventory.yaml"
    good.write_text(
        "nodes: [{name: a1, cloud: A}, {name: b1, cloud: B}]\n"
        "atsigns:\n  - atsign: '@alice'\n  - {atsign: Bob, prefer_nodes: [b1]}\n"
    )
    out = _cli_ok("atsigns", "import", str(good), "--dry-run", "-c", cfg)
    assert "would: 2 added, 0 updated, 0 removed, 0 unchanged" in out
    assert _records(c) == {}
    assert "did: 2 added" in _cli_ok("atsigns", "import", str(good), "-c", cfg)
    assert "did: 0 added, 0 updated, 0 removed, 2 unchanged" in _cli_ok(
        "atsigns", "import", str(good), "-c", cfg
    )
    exported = _cli_ok("atsigns", "export", "-c", cfg)
    assert "atsign: '@bob'" in exported and "- b1" in exported
    (c.base / "exported.yaml").write_text(exported)
    assert "2 unchanged" in _cli_ok("atsigns", "import", str(c.base / "exported.yaml"), "-c", cfg)


@pytest.mark.slow
def test_a_dead_node_leaves_every_rank_and_a_new_node_joins_by_starting(
    make_cluster: MakeCluster,
) -> None:
    c = make_cluster("etcd", nodes=[("a1", "A"), ("b1", "B")], atsigns=[], overrides=DCS_INVENTORY)
    cfg = str(c.nodes["a1"].config_path)
    c.wait(lambda: sorted(_members(c, "a1")) == ["a1", "b1"], 60, "a1 sees both members")

    # b1 dies: its session ends, and it drops out of a1's members.
    c.nodes["b1"].proc.kill()
    took = c.wait(lambda: _members(c, "a1") == ["a1"], c.ttl + 15, "b1 gone from a1's members")
    print(f"MEASURE membership: SIGKILLed node left the members after {took:.2f}s")

    # c1 starts with no config change on a1; new atSigns are shared between them.
    c.add_node("c1", "C")
    c.start("c1")
    c.wait(lambda: sorted(_members(c, "a1")) == ["a1", "c1"], 60, "c1 joined a1's members")
    new = [f"@join{i:02d}" for i in range(10)]
    doc = c.base / "new.yaml"
    doc.write_text("atsigns:\n" + "".join(f"  - atsign: '{a}'\n" for a in new))
    c.atsigns = new
    _cli_ok("atsigns", "import", str(doc), "-c", cfg)
    c.wait(lambda: c.all_once(exclude=["b1"]), 90, "the new atSigns served once")
    on_c1 = [a for a, where in c.running().items() if where[0][0] == "c1"]
    print(f"MEASURE membership: c1 took {len(on_c1)} of {len(new)} new atSigns")
    assert 2 <= len(on_c1) <= 8, c.running()


def test_the_registrar_adds_and_removes_atsigns_through_the_node_api_with_its_token(
    make_cluster: MakeCluster,
) -> None:
    from tests.integration.supervisor.test_node_api_auth import call

    c = make_cluster("etcd", nodes=[("a1", "A")], atsigns=[], overrides=DCS_INVENTORY, secure=True)
    a1 = c.nodes["a1"]
    assert c.secure is not None
    tokens = c.secure.tokens
    c.wait(a1.ready, 60, "a1 ready")
    body = {"atsign": "@reg01", "prefer_clouds": ["A"]}
    assert call(a1, "POST", "/atsigns", None, body)[0] == 401
    status, answer = call(a1, "POST", "/atsigns", tokens["peer"], body)
    assert status == 403, answer
    status, answer = call(a1, "POST", "/atsigns", tokens["registrar"], {"atsign": "@a/b"})
    assert status == 400 and "body: atsign: not a valid atSign" in answer["error"], answer
    status, answer = call(
        a1, "POST", "/atsigns", tokens["registrar"], {"atsign": "@x", "prefer_nodes": ["zz"]}
    )
    assert status == 400 and "unknown node(s) ['zz']" in answer["error"], answer
    c.atsigns = ["@reg01"]
    status, answer = call(a1, "POST", "/atsigns", tokens["registrar"], body)
    assert (status, answer["message"]) == (200, "added @reg01"), answer
    c.wait(c.all_once, 30, "@reg01 served")
    status, listed = call(a1, "GET", "/atsigns", tokens["registrar"])
    assert status == 200 and listed["atsigns"] == [{"atsign": "@reg01", "prefer_clouds": ["A"]}]
    # The registrar may not drain or read the node's status.
    assert call(a1, "POST", "/drain", tokens["registrar"], {})[0] == 403
    assert call(a1, "GET", "/status", tokens["registrar"])[0] == 403
    status, answer = call(a1, "POST", "/atsigns/remove", tokens["registrar"], {"atsign": "@reg01"})
    assert status == 200, answer
    c.wait(lambda: "@reg01" not in c.running(), 30, "@reg01 stopped")
    assert call(a1, "POST", "/atsigns/remove", tokens["registrar"], {"atsign": "@reg01"})[0] == 404
