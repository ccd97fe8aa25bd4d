"""Which departed nodes' CephFS clients a node fences (pure bookkeeping)."""

from __future__ import annotations

from typing import Any

from supervisor.peer_fence import DepartedNodes, Departure, published_client


def rec(gid: int | None = None, node: str = "a2") -> dict[str, Any]:
    storage: dict[str, Any] = {"kind": "cephfs", "ready": True}
    if gid is not None:
        storage["client"] = {"entity": f"client.{node}", "global_id": gid, "addr": "h:0/7"}
    return {"cloud": "A", "storage": storage}


def test_the_published_client_instance_or_nothing() -> None:
    assert published_client(rec(4160)) == "client.a2/4160/h:0/7"
    assert published_client(rec()) == ""  # no instance known yet: never fence by entity
    assert published_client({"cloud": "A"}) == ""


def test_the_first_live_node_fences_a_departed_node_until_done() -> None:
    a1, b1 = DepartedNodes("a1"), DepartedNodes("b1")
    both = {"a1": rec(1, "a1"), "a2": rec(4160), "b1": rec(3, "b1")}
    assert a1.observe(both) == [] and b1.observe(both) == []
    left = {"a1": rec(1, "a1"), "b1": rec(3, "b1")}
    assert a1.observe(left) == [Departure("a2", "client.a2/4160/h:0/7")]
    assert b1.observe(left) == []  # a1 comes first by name: one eviction for everyone
    # Not fenced yet (an error): asked again; once done, not again.
    assert a1.observe(left) == [Departure("a2", "client.a2/4160/h:0/7")]
    a1.done(Departure("a2", "client.a2/4160/h:0/7"))
    assert a1.observe(left) == []


def test_nothing_while_this_node_s_own_record_is_missing() -> None:
    """A Consul restart ends every session at once: nobody fences everybody."""
    a1 = DepartedNodes("a1")
    a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)})
    assert a1.observe({}) == []
    assert a1.observe({"b1": rec(3, "b1")}) == []
    # Back with the others: nobody left for good.
    assert a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)}) == []


def test_a_node_back_before_its_fence_is_left_alone() -> None:
    a1 = DepartedNodes("a1")
    a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)})
    assert a1.observe({"a1": rec(1, "a1")})  # departed
    # Its supervisor restarted and adopted the same mount, or it mounted anew and evicted
    # its old instance itself: either way, not this node's business any more.
    assert a1.observe({"a1": rec(1, "a1"), "a2": rec(4160)}) == []
    assert a1.observe({"a1": rec(1, "a1"), "a2": rec(4161)}) == []


def test_a_departed_node_without_a_known_instance_is_not_fenced() -> None:
    a1 = DepartedNodes("a1")
    a1.observe({"a1": rec(1, "a1"), "a2": rec()})
    assert a1.observe({"a1": rec(1, "a1")}) == []
