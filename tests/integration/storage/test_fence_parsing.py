"""The parts of storage.ceph_fence that need no cluster: addresses, Ceph's outputs, results."""

from __future__ import annotations

import pytest

from storage import ClientIdentity, ClientSession, EvictionResult, normalize_addr
from storage.ceph_fence import _parse_json_seq


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1:0/1302774613", "v1:127.0.0.1:0/1302774613", "any:127.0.0.1:0/1302774613"],
)
def test_addresses_normalize_to_the_blocklist_form(addr: str) -> None:
    assert normalize_addr(addr) == "127.0.0.1:0/1302774613"


@pytest.mark.parametrize("addr", ["127.0.0.1:0/0", "10.1.2.3:6800/0", "127.0.0.1", "a:b/c", ""])
def test_host_wide_and_malformed_addresses_are_refused(addr: str) -> None:
    with pytest.raises(ValueError):
        normalize_addr(addr)


def test_blocklist_ls_output_is_two_json_arrays() -> None:
    raw = b'[{"addr":"127.0.0.1:0/673845435","until":"2026-12-01T22:11:46.644593+0000"}][]'
    assert _parse_json_seq(raw) == [
        [{"addr": "127.0.0.1:0/673845435", "until": "2026-12-01T22:11:46.644593+0000"}],
        [],
    ]


def test_identity_from_the_admin_socket_status() -> None:
    status = {
        "metadata": {"entity_id": "a1", "mount_point": "/mnt/a1", "root": "/atservers"},
        "id": 4160,
        "addr_str": "127.0.0.1:0/1302774613",
        "blocklisted": False,
        "fs_name": "atfs",
    }
    ident = ClientIdentity.from_status(status)
    assert ident == ClientIdentity(
        "client.a1", 4160, "127.0.0.1:0/1302774613", "atfs", "/mnt/a1", "/atservers", False
    )
    assert ClientIdentity.from_dict({**ident.to_dict(), "extra": 1}) == ident


def test_session_from_session_ls_and_the_result_sentence() -> None:
    entry = {
        "id": 4160,
        "entity": {"name": {"type": "client", "num": 4160}, "addr": {"nonce": 5}},
        "state": "open",
        "inst": "client.4160 v1:127.0.0.1:0/1302774613",
        "client_metadata": {"entity_id": "a1", "hostname": "vm", "root": "/atservers"},
    }
    s = ClientSession.from_session_ls(entry, mds="a", rank=0)
    assert (s.global_id, s.entity, s.addr, s.hostname) == (
        4160,
        "client.a1",
        "127.0.0.1:0/1302774613",
        "vm",
    )
    ok = EvictionResult("client.a1", (s,), (s.addr,), (), (), 0.4)
    assert ok.fenced
    assert str(ok) == (
        "fenced client.a1 in 0.40s: evicted client.4160 at 127.0.0.1:0/1302774613 on mds.a "
        "(open); blocklisted 127.0.0.1:0/1302774613"
    )
    bad = EvictionResult("client.a1", (), ("127.0.0.1:0/9",), (), ("session ls: no MDS",), 1.0)
    assert not bad.fenced and str(bad).startswith("NOT fenced") and "no MDS" in str(bad)
