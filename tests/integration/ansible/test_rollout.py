"""The real rollout: site.yml against the local test inventory, a second run, a rolling upgrade.

Two clouds of two nodes each plus the witness, every host a directory with its own loopback
address on this machine (see ansible/README.md, "The local rollout test"). Real etcd, Consul,
atDirectory replicas, supervisors and dev atServers run; the test reaches them only from the
outside: the directory protocol over TLS, atsdk's root connection, the atServers' protocol
and Consul's health API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.ansible.local_cluster import (
    Inventory,
    PlaybookRun,
    atsdk_resolve,
    build_wheel,
    consul_passing,
    keep_resolving,
    make_tls,
    port_in_use,
    read_inventory,
    resolve_and_read,
    run_playbook,
    stop_everything,
    tls_context,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FIRST_VERSION = "0.1.0"
UPGRADE_VERSION = "0.1.1"
# The test's site runs start the four supervisors together (an operator's default is one
# at a time); everything else is what an operator runs.
SITE_ARGS = ("-e", "supervisor_rollout_batch=4")
SERVE_WAIT = 90.0


@dataclass
class Cluster:
    root: Path
    inv: Inventory
    ca: Path
    first_run: PlaybookRun
    results: dict[str, object]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """site.yml rolled out on the local inventory; every process stopped by pid at the end."""
    root = tmp_path_factory.mktemp("rollout")
    inv = read_inventory()
    busy = [f"{a}:2379" for a in inv.addresses.values() if port_in_use(a, 2379)]
    assert not busy, f"etcd ports of the local inventory are in use (a leftover run?): {busy}"
    wheelhouse = root / "wheelhouse"
    build_wheel(root / "build", wheelhouse, FIRST_VERSION)
    build_wheel(root / "build", wheelhouse, UPGRADE_VERSION)
    ca = make_tls(root, inv).cert_path
    results: dict[str, object] = {}
    try:
        first = run_playbook(root, "site.yml", *SITE_ARGS)
        results["rollout_s"] = round(first.seconds, 1)
        yield Cluster(root, inv, ca, first, results)
    finally:
        leftovers = stop_everything(root)
        results["killed_in_teardown"] = leftovers
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


def test_second_site_run_changes_nothing(cluster: Cluster) -> None:
    run = run_playbook(cluster.root, "site.yml", *SITE_ARGS)
    cluster.results["second_run_s"] = round(run.seconds, 1)
    assert run.rc == 0, f"second site.yml run failed (rc {run.rc}):\n{run.tail()}"
    assert run.changed == 0, f"second run changed: {run.changed_tasks()}"
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values())


async def test_rolling_upgrade_keeps_every_atsign_resolvable(cluster: Cluster) -> None:
    inv = cluster.inv
    await _wait_until_served(cluster)
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
