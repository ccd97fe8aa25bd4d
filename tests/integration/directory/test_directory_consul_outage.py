"""The directory keeps answering from its last map while Consul is down, and resyncs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from testbed.consul import ConsulAgent
from tests.integration.directory.conftest import Registrar, atsign_base
from tests.integration.directory.test_directory_lookup import wait_for_answer


def test_consul_stopped_then_restarted(
    consul_agent: ConsulAgent,
    registrar: Registrar,
    start_directory: Any,
    atsdk_root: Any,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    base = atsign_base(key_prefix)
    registrar.register(f"@{base}", 7601, 10)
    registrar.register(f"@{base}gone", 7602, 11)
    settings = tmp_path / "directory.yaml"
    settings.write_text("consul_backoff_initial: 0.1\nconsul_backoff_max: 0.5\n")
    directory = start_directory("--config", str(settings))
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7601", 5)
    assert directory.metrics()["atdirectory_consul_up"] == 1

    consul_agent.stop()
    deadline = time.monotonic() + 10
    while directory.metrics().get("atdirectory_consul_errors_total", 0) < 2:
        assert time.monotonic() < deadline, directory.log_tail()
        time.sleep(0.1)
    # Answers continue from the last map, on the open connection and on new ones.
    assert root.find(f"@{base}") == "127.0.0.1:7601"
    assert root.find(f"@{base}gone") == "127.0.0.1:7602"
    assert atsdk_root(directory.port).find(f"@{base}") == "127.0.0.1:7601"
    m = directory.metrics()
    assert m["atdirectory_consul_up"] == 0
    assert m["atdirectory_map_atsigns"] >= 2
    time.sleep(1.0)
    assert directory.metrics()["atdirectory_map_age_seconds"] >= 1.0
    assert "consul_error" in directory.log_tail()

    # Dev mode loses all state on restart: register again (as supervisors would).
    consul_agent.start()
    registrar.register(f"@{base}", 7603, 12, node="n2")
    wait_for_answer(root, f"@{base}", "127.0.0.1:7603", 5)
    wait_for_answer(root, f"@{base}gone", None, 5)
    # Both queries (passing instances, failing checks) must be back; each backs off alone.
    deadline = time.monotonic() + 5
    while (m := directory.metrics())["atdirectory_consul_up"] != 1:
        assert time.monotonic() < deadline, directory.log_tail()
        time.sleep(0.1)
    assert m["atdirectory_map_age_seconds"] < 15
    assert "consul_recovered" in directory.log_tail()
    # Changes flow again through blocking queries.
    registrar.register(f"@{base}later", 7604, 13)
    wait_for_answer(root, f"@{base}later", "127.0.0.1:7604", 1.0)


def test_frozen_consul_is_detected_by_the_request_deadline(
    consul_agent: ConsulAgent,
    registrar: Registrar,
    start_directory: Any,
    atsdk_root: Any,
    key_prefix: str,
) -> None:
    base = atsign_base(key_prefix)
    registrar.register(f"@{base}", 7701, 1)
    directory = start_directory(
        "--consul-wait", "1", "--consul-connect-timeout", "1", "--consul-backoff-max", "0.5"
    )
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7701", 5)
    consul_agent.freeze()  # SIGSTOP: connections hang instead of failing
    try:
        # Deadline = wait (1 s) + jitter (1/16 s) + connect timeout (1 s) + 1 s.
        deadline = time.monotonic() + 8
        while directory.metrics().get("atdirectory_consul_errors_total", 0) < 1:
            assert time.monotonic() < deadline, directory.log_tail()
            time.sleep(0.1)
        assert root.find(f"@{base}") == "127.0.0.1:7701"
    finally:
        consul_agent.thaw()
    deadline = time.monotonic() + 10
    while directory.metrics()["atdirectory_consul_up"] != 1:
        assert time.monotonic() < deadline, directory.log_tail()
        time.sleep(0.1)
    registrar.register(f"@{base}", 7702, 2, node="n2")
    wait_for_answer(root, f"@{base}", "127.0.0.1:7702", 1.0)
