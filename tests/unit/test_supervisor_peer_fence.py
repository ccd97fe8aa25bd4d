"""Which departed nodes' CephFS clients a node fences (pure bookkeeping)."""

from __future__ import annotations

from typing import Any

from supervisor.peer_fence import DepartedNodes, Departure, published_client

TTL = 6.0
GONE = Departure("a2", "client.a2/4160/h:0/7")


def rec(gid: int | None = None, node: str = "a2") -> dict[str, Any]:
    storage: dict[str, Any] = {"kind": "cephfs", "ready": True}
    if gid is not None:
        storage["client"] = {"entity": f"client.{node}", "global_id": gid, "addr": "h:0/7"}
    return {"cloud": "A", "storage": storage}


ALL = {"a1": rec(1, "a1"), "a2": rec(4160), "b1": rec(3, "b1")}
LEFT = {"a1": rec(1, "a1"), "b1": rec(3, "b1")}


def test_the_published_client_instance_or_nothing() -> None:
    assert published_client(rec(4160)) == "client.a2/4160/h:0/7"
    assert published_client(rec()) == ""  # no instance known yet: never fence by entity
    assert published_client({"cloud": "A"}) == ""


def test_the_first_live_node_fences_a_node_missing_for_a_ttl_until_done() -> None:
    a1, b1 = DepartedNodes("a1", TTL), DepartedNodes("b1", TTL)
    assert a1.observe(ALL, 0.0, set()) == [] and b1.observe(ALL, 0.0, set()) == []
    assert a1.observe(LEFT, 1.0, set()) == []  # missing, not for long enough
    assert a1.observe(LEFT, 6.5, set()) == []
    assert a1.observe(LEFT, 7.0, set()) == [GONE]
    assert b1.observe(LEFT, 1.0, set()) == [] and b1.observe(LEFT, 7.0, set()) == []  # a1 does
    # Not fenced yet (an error): asked again; once done, not again.
    assert a1.observe(LEFT, 8.0, set()) == [GONE]
    a1.done(GONE)
    assert a1.observe(LEFT, 9.0, set()) == []


def test_a_node_that_holds_a_claim_is_alive_whatever_its_record_says() -> None:
    """Found in a chaos run: a2 re-opened its session, claimed and started @chaos00, and a
    peer that had read the records in between evicted it mid-write (a fence file of zeros)."""
    a1 = DepartedNodes("a1", TTL)
    a1.observe(ALL, 0.0, set())
    assert a1.observe(LEFT, 1.0, {"a2"}) == []
    assert a1.observe(LEFT, 7.0, {"a2"}) == []  # its record could not be written: still alive
    assert a1.observe(LEFT, 10.0, set()) == []  # its claims just went: a ttl from now
    assert a1.observe(LEFT, 16.0, set()) == [GONE]


def test_nothing_while_this_node_s_own_record_is_missing() -> None:
    """A Consul restart ends every session at once: nobody fences everybody."""
    a1 = DepartedNodes("a1", TTL)
    a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)}, 0.0, set())
    assert a1.observe({}, 10.0, set()) == []
    assert a1.observe({"b1": rec(3, "b1")}, 20.0, set()) == []
    # Back with the others: nobody left for good.
    assert a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)}, 30.0, set()) == []


def test_a_node_back_before_its_fence_is_left_alone() -> None:
    a1 = DepartedNodes("a1", TTL)
    a1.observe(ALL, 0.0, set())
    a1.observe(LEFT, 1.0, set())
    # Its supervisor restarted and adopted the same mount, or it mounted anew and evicted
    # its old instance itself: either way, not this node's business any more.
    assert a1.observe(ALL, 2.0, set()) == []
    assert a1.observe(LEFT | {"a2": rec(4161)}, 9.0, set()) == []
    assert a1.observe(LEFT, 10.0, set()) == []
    assert a1.observe(LEFT, 16.0, set()) == [Departure("a2", "client.a2/4161/h:0/7")]


def test_a_departed_node_without_a_known_instance_is_not_fenced() -> None:
    a1 = DepartedNodes("a1", TTL)
    a1.observe({"a1": rec(1, "a1"), "a2": rec()}, 0.0, set())
    assert a1.observe({"a1": rec(1, "a1")}, 60.0, set()) == []
