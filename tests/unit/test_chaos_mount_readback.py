"""The lost-write check through another node's mount: reads the data files, not the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atserver_runner.devserver.store import KeyStore
from atserver_runner.paths import atsign_dir
from chaos.readback import read_through_other_mounts
from chaos.workload import OpRecord


@dataclass
class FakeNode:
    name: str
    up: bool = True
    frozen: bool = False

    def running(self) -> bool:
        return self.up

    def fuse_pid(self) -> tuple[int, float] | None:
        return (1, 0.0) if self.up else None


@dataclass
class FakeKeys:
    atsign: str


@dataclass
class FakeCluster:
    root: Path
    owners: dict[str, str]
    nodes: list[FakeNode] = field(default_factory=list)
    atsigns: list[FakeKeys] = field(default_factory=list)

    def owners_by_status(self) -> dict[str, str]:
        return self.owners

    def node_data_root(self, node: str) -> Path:
        return self.root / node  # each node's mount point of one shared directory


def ack(atsign: str, key: str, value: str, end: float) -> OpRecord:
    return OpRecord(atsign, "write", key, value, end - 0.1, end, True, "s", 1, "")


def test_every_acknowledged_write_is_looked_up_through_a_non_owner_s_mount(tmp_path: Path) -> None:
    shared = tmp_path / "fs"
    for n in ("a1", "b1"):  # two "mounts" of the same directory
        (tmp_path / n).symlink_to(shared, target_is_directory=True)
    data = atsign_dir(shared, "@alice")
    data.mkdir(parents=True)
    store = KeyStore(data)
    store.open()
    store.put("public:k1.chaos@alice", "v1-new", {})
    store.put("public:k2.chaos@alice", "v2", {})
    store.close()
    cluster: Any = FakeCluster(
        tmp_path, {"@alice": "a1"}, [FakeNode("a1"), FakeNode("b1")], [FakeKeys("@alice")]
    )
    acked = [
        ack("@alice", "public:k1.chaos@alice", "v1-old", 1.0),
        ack("@alice", "public:K1.chaos@alice", "v1-new", 2.0),  # stored lower case; latest wins
        ack("@alice", "public:k2.chaos@alice", "v2", 3.0),
    ]
    [ok] = read_through_other_mounts(cluster, acked)
    assert (ok.node, ok.checked, ok.missing, ok.complete) == ("b1", 2, [], True)

    lost = [*acked, ack("@alice", "public:k3.chaos@alice", "v3", 4.0)]
    [bad] = read_through_other_mounts(cluster, lost)
    assert bad.missing == ["public:k3.chaos@alice"] and not bad.complete

    cluster.nodes[1].up = False  # only the owner's mount is up: said, not guessed
    [none] = read_through_other_mounts(cluster, acked)
    assert none.node is None and "no other node's mount" in none.error
