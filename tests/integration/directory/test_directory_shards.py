"""The sharded layout against a real Consul agent and real ``atdirectory serve`` processes:
answers from shards, the failing-checks mask per shard and per node, cost per change, the
migration from the legacy service with an old and a new directory side by side, bad layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directory.shards import shard_service
from testbed.consul import ConsulAgent
from testbed.tls import CertPair, TestCA
from tests.integration.directory.conftest import (
    ATDIRECTORY,
    Registrar,
    TlsLineClient,
    atsign_base,
    client_context,
)
from tests.integration.directory.test_directory_lookup import FRESHNESS, wait_for_answer

REPO = Path(__file__).resolve().parents[3]
OLD_VERSION = "4b8c512"
"""The last commit of the single-service directory (one list, state/any mask)."""


def wait_until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(0.05)


def wait_consul_passing(registrar: Registrar, service: str, sid: str) -> None:
    """Wait until Consul lists ``sid`` as passing. A dev agent started a moment ago can take
    a second or more to sync a new instance to the server (measured 0.1-1.8 s in its first
    seconds, ~10 ms later); the directory's own freshness is timed from then on."""
    url = f"{registrar.agent.url}/v1/health/service/{service}?passing=1"

    def passing() -> bool:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return sid in {e["Service"]["ID"] for e in json.loads(resp.read())}

    wait_until(passing, 10, f"Consul lists {sid} as passing")


def answers_all(port: int, ctx: Any, expected: dict[str, str]) -> bool:
    client = TlsLineClient(port, ctx)
    try:
        return all(
            client.ask(a.encode()) == f"{want}\r\n@".encode() for a, want in expected.items()
        )
    finally:
        client.close()


def test_sharded_layout_answers_follows_changes_and_masks_by_node(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    slug = atsign_base(key_prefix)
    base = f"s{slug}"
    names = [f"@{slug}{i}" for i in range(30)]
    for i, name in enumerate(names):
        registrar.register_like_supervisor(
            name, 7000 + i, 10 + i, base=base, shards=(16,), node="n1" if i % 2 else "n2"
        )
    shards_used = {shard_service(base, n, 16) for n in names}
    assert len(shards_used) >= 8  # the atSigns really are spread over the shards
    directory = start_directory("--service", base, "--shards", "16")
    root = atsdk_root(directory.port)
    for i, name in enumerate(names):
        wait_for_answer(root, name, f"127.0.0.1:{7000 + i}", 5)
    m = directory.metrics()
    assert m["atdirectory_services_followed"] == 16
    assert m["atdirectory_services_unsynced"] == 0
    assert m["atdirectory_map_atsigns"] == 30

    # The at-protocol check fails -> null; passes again -> answered.
    sid = f"{shard_service(base, names[1], 16)}-{names[1][1:]}"
    registrar.set_probe(sid, False)
    wait_for_answer(root, names[1], None, FRESHNESS)
    registrar.set_probe(sid, True)
    wait_for_answer(root, names[1], "127.0.0.1:7001", FRESHNESS)

    # Failover: a new owner on n2 with a higher token; the old one's checks fail, it goes.
    registrar.register_like_supervisor(
        names[1], 7501, 500, base=base, shards=(16,), node="n2", id_suffix="-n2"
    )
    wait_consul_passing(registrar, shard_service(base, names[1], 16), f"{sid}-n2")
    wait_for_answer(root, names[1], "127.0.0.1:7501", FRESHNESS)
    registrar.deregister(sid)
    assert root.find(names[1]) == "127.0.0.1:7501"

    # A brand-new atSign in some shard.
    (new,) = registrar.register_like_supervisor(f"@{slug}new", 7600, 1, base=base, shards=(16,))
    wait_consul_passing(registrar, shard_service(base, f"@{slug}new", 16), new)
    wait_for_answer(root, f"@{slug}new", "127.0.0.1:7600", FRESHNESS)

    # The node's supervisor stops renewing: n1's node check turns critical, and with it every
    # n1 instance, in every shard at once (Consul counts a node's checks for its services).
    n1 = [(i, n) for i, n in enumerate(names) if i % 2 and i != 1]
    registrar.set_node_alive("n1", False)
    try:
        start = time.monotonic()
        for _, name in n1:
            wait_for_answer(root, name, None, FRESHNESS)
        assert time.monotonic() - start < FRESHNESS * 2
        assert root.find(names[0]) == "127.0.0.1:7000"  # n2 is unaffected
    finally:
        registrar.set_node_alive("n1", True)
    for i, name in n1:
        wait_for_answer(root, name, f"127.0.0.1:{7000 + i}", FRESHNESS)
    assert directory.metrics()["atdirectory_consul_up"] == 1


def test_a_failing_node_check_masks_that_node_in_every_shard(
    registrar: Registrar,
    start_directory: Any,
    test_ca: TestCA,
    key_prefix: str,
) -> None:
    slug = atsign_base(key_prefix)
    base = f"s{slug}"
    expected = registrar.register_bulk(slug, 40, nodes=2, service=base, shards=16)
    directory = start_directory("--service", base, "--shards", "1,16")
    ctx = client_context(test_ca)
    wait_until(lambda: answers_all(directory.port, ctx, expected), 5, "all 40 answered")
    node = f"{slug}-sim0"
    on_node = {a: w for i, (a, w) in enumerate(expected.items()) if i % 2 == 0}
    others = {a: w for a, w in expected.items() if a not in on_node}

    registrar.set_catalog_node_alive(node, False)
    start = time.monotonic()
    wait_until(
        lambda: answers_all(directory.port, ctx, dict.fromkeys(on_node, "null")),
        FRESHNESS * 2,
        "every atSign on the failed node answered null",
    )
    print(f"node check critical -> 20 atSigns in 16 shards null: {time.monotonic() - start:.3f}s")
    assert answers_all(directory.port, ctx, others)
    registrar.set_catalog_node_alive(node, True)
    wait_until(lambda: answers_all(directory.port, ctx, expected), FRESHNESS * 2, "back")


@pytest.fixture(scope="module")
def roomy_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """A dev agent of its own: 10,000 registrations stay out of the shared one."""
    agent = ConsulAgent(tmp_path_factory.mktemp("consul-roomy"), name="consul-roomy")
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


def test_10000_atsigns_in_256_shards_one_change_costs_one_shard(
    roomy_consul: ConsulAgent, start_directory: Any, atsdk_root: Any, tmp_path: Path
) -> None:
    """A change re-sends and re-applies only its shard (~40 of 10,000 instances): one list
    applied per change, one instance changed, answered within a second."""
    registrar = Registrar(roomy_consul, tmp_path)
    try:
        expected = registrar.register_bulk("big", 10_000, nodes=20, service="atserver", shards=256)
        sids = [registrar.register_like_supervisor(f"@big{i}", 7100 + i, 1, base="atserver",
                                                   shards=(256,))[0] for i in range(3)]  # fmt: skip
        directory = start_directory("--shards", "256", consul_url=roomy_consul.url)
        root = atsdk_root(directory.port)
        wait_for_answer(root, "@big0", "127.0.0.1:7100", 10)
        assert root.find("@bigb9999") == expected["@bigb9999"]
        wait_until(lambda: directory.metrics()["atdirectory_map_atsigns"] >= 10_003, 10, "map")
        m0 = directory.metrics()
        assert m0["atdirectory_services_followed"] == 256
        for n, sid in enumerate(sids):
            registrar.set_probe(sid, False)
            wait_for_answer(root, f"@big{n}", None, FRESHNESS)
            registrar.set_probe(sid, True)
            wait_for_answer(root, f"@big{n}", f"127.0.0.1:{7100 + n}", FRESHNESS)
        (new,) = registrar.register_like_supervisor(
            "@bignew", 7200, 1, base="atserver", shards=(256,)
        )
        wait_consul_passing(registrar, shard_service("atserver", "@bignew", 256), new)
        wait_for_answer(root, "@bignew", "127.0.0.1:7200", FRESHNESS)
        time.sleep(0.3)  # let the last lists land
        m1 = directory.metrics()
        syncs = m1["atdirectory_consul_syncs_total"] - m0["atdirectory_consul_syncs_total"]
        changes = (
            m1["atdirectory_instance_changes_total"] - m0["atdirectory_instance_changes_total"]
        )
        # 7 changes (3 fails, 3 passes, 1 registration): one shard list each, give or take
        # Consul coalescing or splitting a change (a new instance shows up critical first).
        assert 7 <= syncs <= 10, syncs
        assert 7 <= changes <= 10, changes
    finally:
        registrar.cleanup()


def _old_directory(tmp_path: Path) -> Path:
    """The directory package as it was before shards, from git; skip if unavailable."""
    target = tmp_path / "old-directory"
    target.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_VERSION, "directory"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        subprocess.run(
            ["tar", "-x", "-C", str(target)], input=archive.stdout, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the old directory version ({OLD_VERSION}) is not available from git: {exc}")
    return target


class Checker(threading.Thread):
    """Asks every replica in ``targets`` for every atSign, round after round, and records
    each answer that is not the expected one (null included)."""

    def __init__(self, ctx: Any, expected: dict[str, str]) -> None:
        super().__init__(daemon=True, name="directory-checker")
        self.ctx, self.expected = ctx, expected
        self.targets: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.bad: list[tuple[float, str, str, bytes]] = []
        self.rounds: dict[str, int] = {}
        self.errors: list[str] = []

    def set_target(self, name: str, port: int | None) -> None:
        with self.lock:
            if port is None:
                self.targets.pop(name, None)
            else:
                self.targets[name] = port
        time.sleep(0.1)  # a round in flight against a removed target finishes

    def run(self) -> None:
        clients: dict[str, TlsLineClient] = {}
        deadline = time.monotonic() + 170
        while not self.stop_flag.is_set() and time.monotonic() < deadline:
            with self.lock:
                targets = dict(self.targets)
            for name in set(clients) - set(targets):
                clients.pop(name).close()
            for name, port in targets.items():
                try:
                    client = clients.get(name) or TlsLineClient(port, self.ctx)
                    clients[name] = client
                    for atsign, want in self.expected.items():
                        got = client.ask(atsign.encode())
                        if got != f"{want}\r\n@".encode():
                            self.bad.append((time.monotonic(), name, atsign, got))
                    self.rounds[name] = self.rounds.get(name, 0) + 1
                except OSError as exc:
                    with self.lock:
                        still = name in self.targets
                    if still:
                        self.errors.append(f"{name}: {exc!r}")
                    clients.pop(name, None)
            time.sleep(0.01)
        for client in clients.values():
            client.close()


def test_migration_old_and_new_replicas_side_by_side_none_unanswered(
    registrar: Registrar,
    start_directory: Any,
    test_ca: TestCA,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    """The rolling upgrade: today's directory (from git) and the new one run side by side
    while every atSign gains a shard registration, the old replicas are replaced, the legacy
    registrations go, and the new replicas drop the legacy service. Every answer of every
    replica, asked continuously, is the atSign's atServer: none is null or wrong."""
    old_code = _old_directory(tmp_path)
    slug = atsign_base(key_prefix)
    base = f"s{slug}"
    names = [f"@{slug}{i}" for i in range(24)]
    expected = {n: f"127.0.0.1:{7000 + i}" for i, n in enumerate(names)}

    def node_of(i: int) -> str:
        return "m1" if i % 2 else "m2"

    # Step 0: today. Supervisors register in the legacy service only.
    for i, n in enumerate(names):
        registrar.register_like_supervisor(n, 7000 + i, 100 + i, base=base, node=node_of(i))
    ctx = client_context(test_ca)
    old = start_directory(
        "--service", base, program=[sys.executable, "-m", "directory.cli"], pythonpath=old_code
    )
    assert "atdirectory_services_followed" not in old.metrics()  # really the old code
    # Step 1: new directory replicas follow both layouts.
    new_a = start_directory("--service", base, "--shards", "1,16")
    for d in (old, new_a):
        wait_until(lambda d=d: answers_all(d.port, ctx, expected), 5, f"{d.process.name} ready")
    checker = Checker(ctx, expected)
    checker.set_target("old", old.port)
    checker.set_target("new_a", new_a.port)
    checker.start()
    try:
        # Step 2: supervisors register each atSign in both layouts (make before break): the
        # legacy registration stays, the shard one is added.
        for i, n in enumerate(names):
            registrar.register_like_supervisor(
                n, 7000 + i, 100 + i, base=base, shards=(16,), node=node_of(i)
            )
            time.sleep(0.02)
        wait_until(
            lambda: new_a.metrics()["atdirectory_instances_duplicate"] == len(names),
            5,
            "every atSign registered twice",
        )
        # Step 3: the old replica is replaced by a new one (rolling upgrade done).
        new_b = start_directory("--service", base, "--shards", "1,16")
        checker.set_target("new_b", new_b.port)
        checker.set_target("old", None)
        old_rounds = checker.rounds.get("old", 0)
        old.stop()
        # Step 4: supervisors stop registering the legacy layout.
        for n in names:
            registrar.deregister(f"{base}-{n[1:]}")
            time.sleep(0.02)
        wait_until(
            lambda: new_a.metrics()["atdirectory_instances_duplicate"] == 0, 5, "legacy gone"
        )
        # Step 5: the new replicas stop following the legacy service (one at a time).
        new_c = start_directory("--service", base, "--shards", "16")
        checker.set_target("new_c", new_c.port)
        checker.set_target("new_a", None)
        new_a.stop()
        assert new_c.metrics()["atdirectory_services_followed"] == 16
        time.sleep(1.0)
    finally:
        checker.stop_flag.set()
        checker.join(10)
    assert not checker.errors, checker.errors[:5]
    assert not checker.bad, checker.bad[:10]
    assert old_rounds >= 5 and checker.rounds["new_a"] >= 10, checker.rounds
    assert checker.rounds["new_b"] >= 5 and checker.rounds["new_c"] >= 5, checker.rounds


def run_serve(
    args: list[str], cert: CertPair, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ATDIRECTORY_")}
    return subprocess.run(
        [str(ATDIRECTORY), "serve", "--cert", str(cert.cert), "--key", str(cert.key),
         "--port", "0", "--metrics-port", "0", *args],
        capture_output=True, text=True, timeout=60, env={**base_env, **(env or {})},
    )  # fmt: skip


def test_bad_layouts_are_refused_naming_the_setting(
    consul_agent: ConsulAgent, server_cert: CertPair, tmp_path: Path
) -> None:
    consul = ["--consul", consul_agent.url]
    r = run_serve([*consul, "--shards", "100"], server_cert)
    assert r.returncode == 2 and "--shards (command line): Value error, shards must be" in r.stderr
    r = run_serve(consul, server_cert, {"ATDIRECTORY_SHARDS": "8,16"})
    assert r.returncode == 2
    assert "ATDIRECTORY_SHARDS (environment): Value error, shard counts 8 and 16" in r.stderr
    f = tmp_path / "d.yaml"
    f.write_text("shards: [1, many]\n")
    r = run_serve([*consul, "--config", str(f)], server_cert)
    assert r.returncode == 2 and f"{f}: shards" in r.stderr, r.stderr
    r = run_serve([*consul, "--service", "At_Server"], server_cert)
    assert r.returncode == 2 and "--service (command line): String should match" in r.stderr
    # 4,096 shards need more connections than the agent allows one address (1,000 here).
    r = run_serve([*consul, "--shards", "1,4096"], server_cert)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "limits.http_max_conns_per_client" in r.stderr and "4101" in r.stderr, r.stderr
    assert "allows 1000" in r.stderr
