"""The real rollout: site.yml against the local test inventory, a second run, a rolling upgrade.

Two clouds of two nodes each plus the witness, every host a directory with its own loopback
address on this machine (see ansible/README.md, "The local rollout test"). Real etcd, Consul,
atDirectory replicas, supervisors and dev atServers run; the test reaches them only from the
outside: the directory protocol over TLS, atsdk's root connection, the atServers' protocol
and Consul's health API.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chaos.atclient import client_ssl_context
from chaos.cluster import AtSignKeys, make_atsign_keys
from chaos.readback import read_all, write_all
from tests.integration.ansible.local_cluster import (
    Inventory,
    PlaybookRun,
    atsdk_resolve,
    build_wheel,
    ceph_json,
    consul_passing,
    data_root_mount,
    keep_resolving,
    make_tls,
    port_in_use,
    read_inventory,
    resolve_and_read,
    run_playbook,
    stop_everything,
    tls_context,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

FIRST_VERSION = "0.1.0"
UPGRADE_VERSION = "0.1.1"
# The test's site runs start the four supervisors together (an operator's default is one
# at a time); everything else is what an operator runs.
SITE_ARGS = ("-e", "supervisor_rollout_batch=4")
SERVE_WAIT = 90.0
WRITES_PER_ATSIGN = 10


@dataclass
class Cluster:
    root: Path
    inv: Inventory
    ca: Path
    first_run: PlaybookRun
    keys: list[AtSignKeys]
    results: dict[str, object]
    written: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """The acknowledged writes per atSign (key, value), for the later read-backs."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """site.yml rolled out on the local inventory: Ceph in stretch mode over the loopback
    hosts (the ceph role), every swarm node's data root a mount of its CephFS (the data
    follows the claim, so atSigns can move between nodes); every process stopped by pid at
    the end."""
    began = time.monotonic()
    root = tmp_path_factory.mktemp("rollout")
    inv = read_inventory()
    busy = [
        f"{a}:{port}"
        for a in inv.addresses.values()
        for port in (2379, 3300)
        if port_in_use(a, port)
    ]
    assert not busy, f"etcd/Ceph ports of the local inventory are in use (a leftover run?): {busy}"
    wheelhouse = root / "wheelhouse"
    build_wheel(root / "build", wheelhouse, FIRST_VERSION)
    build_wheel(root / "build", wheelhouse, UPGRADE_VERSION)
    ca = make_tls(root, inv).cert_path
    # The atSigns' PKAM keys: the inventory's atServer command installs the public halves.
    keys = make_atsign_keys(root / "keys", inv.atsigns)
    results: dict[str, object] = {}
    try:
        first = run_playbook(root, "site.yml", *SITE_ARGS)
        results["rollout_s"] = round(first.seconds, 1)
        yield Cluster(root, inv, ca, first, keys, results)
    finally:
        stopping = time.monotonic()
        leftovers = stop_everything(root)
        results["killed_in_teardown"] = leftovers
        results["teardown_s"] = round(time.monotonic() - stopping, 1)
        results["module_s"] = round(time.monotonic() - began, 1)
        (root / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nrollout test results: {json.dumps(results)}")


async def _wait_until_served(cluster: Cluster) -> dict[str, str]:
    """Every atSign resolves through every replica to a passing atServer that answers."""
    inv, ctx = cluster.inv, tls_context(cluster.ca)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SERVE_WAIT
    problems: list[str] = []
    while True:
        answers: dict[str, str] = {}
        problems = []
        for replica in inv.directories:
            for atsign in inv.atsigns:
                address, detail = await resolve_and_read([replica], atsign, ctx)
                if address is None:
                    problems.append(f"via {replica[0]}: {detail}")
                else:
                    answers[atsign] = address
        if not problems:
            return answers
        if loop.time() > deadline:
            raise AssertionError(f"not served after {SERVE_WAIT:g}s: {problems}")
        await asyncio.sleep(1.0)


async def test_site_rollout_serves_every_atsign(cluster: Cluster) -> None:
    run = cluster.first_run
    assert run.rc == 0, f"site.yml failed (rc {run.rc}):\n{run.tail()}"
    assert set(run.recap) == set(cluster.inv.addresses), run.recap
    answers = await _wait_until_served(cluster)
    assert set(answers) == set(cluster.inv.atsigns)

    # The directory answered only with instances Consul reports passing.
    consul_url = f"http://{cluster.inv.addresses[cluster.inv.groups['swarm_nodes'][0]]}:8500"
    passing = await consul_passing(consul_url, cluster.inv.consul_token)
    for atsign, address in answers.items():
        assert address in passing.get(atsign, set()), (atsign, address, passing)
        assert len(passing[atsign]) == 1, f"{atsign} has several passing instances: {passing}"

    # The real client: atsdk's root connection, over TLS checked against the test CA.
    host, port = cluster.inv.directories[0]
    sdk = await asyncio.to_thread(
        atsdk_resolve, cluster.root, cluster.ca, host, port, cluster.inv.atsigns
    )
    assert sdk == answers, f"atsdk resolved {sdk}, the raw protocol {answers}"
    cluster.results["atsigns_served"] = answers


def test_ceph_runs_in_stretch_mode_across_both_clouds_and_the_witness(cluster: Cluster) -> None:
    """The ceph role's cluster: 5 monitors (2 per cloud, the tiebreaker on the witness), the
    connectivity election, a CRUSH tree with one datacenter per cloud and two hosts in each,
    the stretch rule on both CephFS pools at size 4 / min_size 2, HEALTH_OK; every swarm
    node's data root is a ceph-fuse mount of it."""
    run = cluster.first_run
    assert run.rc == 0, f"site.yml failed (rc {run.rc}):\n{run.tail()}"
    first_mon = "aws-1"
    mons = ceph_json(cluster.root, first_mon, "mon", "dump")
    locations = {m["name"]: str(m.get("crush_location", "")) for m in mons["mons"]}
    assert mons["tiebreaker_mon"] == "witness-1", mons
    assert int(mons["election_strategy"]) == 3, mons  # connectivity
    assert len(locations) == 5 and "datacenter=witness" in locations["witness-1"], locations
    for cloud in ("aws", "gcp"):
        assert sum(f"datacenter={cloud}" in loc for loc in locations.values()) == 2, locations
    osd = ceph_json(cluster.root, first_mon, "osd", "dump")
    stretch = osd["stretch_mode"]
    assert stretch["stretch_mode_enabled"] and not stretch["degraded_stretch_mode"], stretch
    rules = {
        r["rule_id"]: r["rule_name"]
        for r in ceph_json(cluster.root, first_mon, "osd", "crush", "rule", "dump")
    }
    pools = {p["pool_name"]: p for p in osd["pools"]}
    for name in ("cephfs.atfs.meta", "cephfs.atfs.data"):
        pool = pools[name]
        assert (pool["size"], pool["min_size"]) == (4, 2), pool
        assert rules[pool["crush_rule"]] == "stretch_rule", (pool, rules)
    tree = ceph_json(cluster.root, first_mon, "osd", "tree")
    nodes = {n["id"]: n for n in tree["nodes"]}
    sites = {
        n["name"]: sorted(nodes[c]["name"] for c in n.get("children", []))
        for n in tree["nodes"]
        if n["type"] == "datacenter"
    }
    assert sites == {"aws": ["aws-1", "aws-2"], "gcp": ["gcp-1", "gcp-2"]}, sites
    assert all(n["status"] == "up" for n in tree["nodes"] if n["type"] == "osd"), tree
    health = ceph_json(cluster.root, first_mon, "health")
    assert health["status"] == "HEALTH_OK", health
    mounts = {h: data_root_mount(cluster.root, h) for h in cluster.inv.groups["swarm_nodes"]}
    assert set(mounts.values()) == {"fuse.ceph-fuse"}, mounts
    cluster.results["ceph"] = {"sites": sites, "tiebreaker": mons["tiebreaker_mon"]}


def test_node_apis_serve_https_and_refuse_a_drain_without_the_operator_token(
    cluster: Cluster,
) -> None:
    """The roles gave every node API a certificate and tokens: a drain with no credential or
    a made-up one is refused, plain HTTP fails, and /readyz answers on the read-only port."""
    ctx = tls_context(cluster.ca)
    for host in cluster.inv.groups["swarm_nodes"]:
        address = cluster.inv.addresses[host]
        for headers in ({}, {"Authorization": "Bearer " + "z" * 40}):
            req = urllib.request.Request(
                f"https://{address}:8470/drain", data=b"{}", method="POST", headers=headers
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=5, context=ctx)
            assert refused.value.code == 401, (host, headers)
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{address}:8470/status", timeout=5)
        with urllib.request.urlopen(f"http://{address}:8471/readyz", timeout=5) as resp:
            assert json.loads(resp.read())["ready"] is True, host
        token_files = sorted((cluster.root / "hosts" / host / "etc/atfailover").glob("*.token"))
        assert [p.name for p in token_files] == ["operator.token", "peer.token", "registrar.token"]
        assert all(p.stat().st_mode & 0o077 == 0 for p in token_files), host


def test_second_site_run_changes_nothing(cluster: Cluster) -> None:
    run = run_playbook(cluster.root, "site.yml", *SITE_ARGS)
    cluster.results["second_run_s"] = round(run.seconds, 1)
    assert run.rc == 0, f"second site.yml run failed (rc {run.rc}):\n{run.tail()}"
    assert run.changed == 0, f"second run changed: {run.changed_tasks()}"
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values())


async def test_rolling_upgrade_keeps_every_atsign_resolvable_and_its_data(
    cluster: Cluster,
) -> None:
    """upgrade.yml while a client keeps resolving every atSign: each moves at least twice,
    none is unresolvable for longer than one handoff, and every write acknowledged before the
    upgrade (through the directory's answer) is read back afterwards from whichever node
    serves the atSign then: its data followed it on CephFS."""
    inv = cluster.inv
    at_write = await _wait_until_served(cluster)
    ctx = client_ssl_context(cluster.ca)
    written = await write_all(cluster.keys, inv.directories[0], ctx, WRITES_PER_ATSIGN)
    cluster.written.update(written)
    cluster.results["writes_acknowledged"] = sum(len(w) for w in written.values())
    stop = asyncio.Event()
    client = asyncio.create_task(
        keep_resolving(inv.directories, inv.atsigns, cluster.ca, stop, max_seconds=600)
    )
    await asyncio.sleep(2.0)  # a few clean rounds before the first drain
    run = await asyncio.to_thread(
        run_playbook,
        cluster.root,
        "upgrade.yml",
        "-e",
        f"atfailover_package_version={UPGRADE_VERSION}",
    )
    await asyncio.sleep(2.0)
    stop.set()
    avail = await client
    worst = max(avail.max_gap.values())
    cluster.results["upgrade_s"] = round(run.seconds, 1)
    cluster.results["upgrade_client_rounds"] = avail.rounds
    cluster.results["upgrade_max_unresolvable_s"] = round(worst, 2)
    cluster.results["upgrade_max_unresolvable_per_atsign_s"] = {
        a: round(g, 2) for a, g in sorted(avail.max_gap.items())
    }
    cluster.results["upgrade_moves"] = avail.seen
    assert run.rc == 0, f"upgrade.yml failed (rc {run.rc}):\n{run.tail()}"
    # Every node was drained once, so every atSign moved at least once, and the client saw it.
    unmoved = {a: avail.seen.get(a, []) for a in inv.atsigns if len(avail.seen.get(a, [])) < 2}
    assert not unmoved, f"atSigns that never moved during the upgrade: {unmoved}"

    # Every acknowledged write, read back through the other replica's answer, now that every
    # atSign has moved at least once.
    now = await _wait_until_served(cluster)
    back = await read_all(cluster.keys, inv.directories[-1], ctx, written)
    cluster.results["writes_read_back"] = {r.atsign: f"{r.found}/{r.written}" for r in back}
    cluster.results["served_at_write_and_at_read"] = {a: [at_write[a], now[a]] for a in sorted(now)}
    incomplete = [
        r.summary() + (f" missing {r.missing[:5]}" if r.missing else "")
        for r in back
        if not r.complete
    ]
    assert not incomplete, f"acknowledged writes not read back after the moves: {incomplete}"

    # Every node and replica now runs the new version.
    hosts = set(inv.groups["swarm_nodes"]) | set(inv.groups["directory"])
    for host in sorted(hosts):
        venv_lib = cluster.root / "hosts" / host / "opt/atfailover/venv/lib"
        meta = next(venv_lib.glob("python3*/site-packages"))
        assert (meta / f"atsign_failover-{UPGRADE_VERSION}.dist-info").is_dir(), host
        assert not (meta / f"atsign_failover-{FIRST_VERSION}.dist-info").exists(), host

    # One handoff: the old owner stops (runner stop timeout 5 s), the standby claims and
    # starts it and its check passes (probe interval 1 s), the directory follows (blocking
    # query); the claim's TTL bounds the wait if a release is missed. Generous for 2 cores.
    handoff_bound = inv.ttl + 5.0 + 2.0 + 4.0
    assert avail.rounds > 10, f"the client made only {avail.rounds} rounds"
    assert worst <= handoff_bound, (
        f"an atSign was unresolvable for {worst:.1f}s (> one handoff, {handoff_bound:g}s): "
        f"{avail.max_gap}; failures: {avail.failures[:20]}"
    )
    await _wait_until_served(cluster)


def _ceph_pids(root: Path) -> dict[str, int]:
    """Every Ceph daemon's pid, from the pid files of the ceph role's services."""
    out = {}
    for pidfile in sorted(root.glob("hosts/*/var/lib/atfailover/services/atfailover-ceph-*.pid")):
        out[f"{pidfile.parts[-6]}/{pidfile.stem}"] = int(json.loads(pidfile.read_text())["pid"])
    return out


async def test_ceph_rolling_restart_keeps_the_data(cluster: Cluster) -> None:
    """ceph-upgrade.yml restarting one daemon of each kind and both MDSs (the active one is
    failed over first), one at a time with HEALTH_OK between them: the atSigns stay served,
    every write acknowledged before is still read back afterwards, and new writes work.
    (All 13 daemons, ``ceph_restart_all``, take the same path but do not fit the budget.)"""
    mdss = sorted(f"mds.{h}" for h in ("aws-2", "gcp-2"))
    restart = ["mon.aws-2", "mgr.aws-1", "osd.0", *mdss]
    services = {
        "mon.aws-2": "aws-2/atfailover-ceph-mon",
        "mgr.aws-1": "aws-1/atfailover-ceph-mgr",
        "mds.aws-2": "aws-2/atfailover-ceph-mds",
        "mds.gcp-2": "gcp-2/atfailover-ceph-mds",
    }
    before = _ceph_pids(cluster.root)
    assert len(before) == 13, before  # 5 mons, 2 mgrs, 4 OSDs, 2 MDSs
    osd0 = [d for d in before if d.endswith("/atfailover-ceph-osd-0")]
    assert len(osd0) == 1, before
    run = await asyncio.to_thread(
        run_playbook,
        cluster.root,
        "ceph-upgrade.yml",
        "-e",
        json.dumps({"ceph_restart_only": restart}),
    )
    cluster.results["ceph_restart_s"] = round(run.seconds, 1)
    assert run.rc == 0, f"ceph-upgrade.yml failed (rc {run.rc}):\n{run.tail()}"
    after = _ceph_pids(cluster.root)
    wanted = [*services.values(), *osd0]
    assert all(after[d] != before[d] for d in wanted), (wanted, before, after)
    untouched = [d for d in before if d not in wanted]
    assert all(after[d] == before[d] for d in untouched), (untouched, before, after)
    assert ceph_json(cluster.root, "aws-1", "health")["status"] == "HEALTH_OK"
    await _wait_until_served(cluster)
    ctx = client_ssl_context(cluster.ca)
    more = await write_all(cluster.keys, cluster.inv.directories[0], ctx, 2)
    written = {a: cluster.written.get(a, []) + w for a, w in more.items()}
    back = await read_all(cluster.keys, cluster.inv.directories[-1], ctx, written)
    assert all(r.complete for r in back), [r.summary() for r in back]
