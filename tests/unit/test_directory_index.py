"""The incremental answer index: any sequence of list and mask updates gives the answers a
rebuild from scratch would, and a list is split into entries without parsing it whole."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from directory.index import (
    AnswerIndex,
    FailingChecks,
    ServiceList,
    answers_from_scratch,
    failing_from_checks,
    parse_service_body,
    parse_service_list,
    split_entries,
)

SERVICES = ["atserver", "atserver-0", "atserver-1"]
NODES = ["n1", "n2"]


def entry(
    who: int, token: int, port: int, sid: str, node: str = "n1", modify: int = 1
) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": "10.9.9.9", "Meta": {"k": '}, {"Node": {'}},
        "Service": {
            "ID": sid,
            "Service": "x",
            "Address": f"10.0.0.{who}",
            "Port": port,
            "Meta": {"atsign": f"@u{who}", "fencing_token": str(token), "note": '"},{"Node":{'},
            "ModifyIndex": modify,
        },
        "Checks": [{"Node": node, "Status": "passing", "Output": 'a}, {"Node": {b'}],
    }


instance_spec = st.tuples(
    st.integers(0, 3),  # atSign
    st.integers(0, 4),  # token
    st.sampled_from(NODES),
    st.integers(0, 5),  # service ID number
    st.integers(1, 3),  # ModifyIndex
)


def make_list(service: str, index: int, specs: list[tuple[int, int, str, int, int]]) -> ServiceList:
    entries = [
        entry(who, token, 1000 + n, f"sid{sid}", node, modify)
        for n, (who, token, node, sid, modify) in enumerate(specs)
    ]
    return parse_service_list(service, index, entries)


update = st.one_of(
    st.tuples(st.just("list"), st.sampled_from(SERVICES), st.lists(instance_spec, max_size=6)),
    st.tuples(
        st.just("mask"),
        st.sampled_from(["critical", "warning"]),
        st.tuples(
            st.lists(st.tuples(st.sampled_from(NODES), st.integers(0, 5)), max_size=4),
            st.lists(st.sampled_from(NODES), max_size=1),
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(update, max_size=12))
def test_incremental_updates_match_a_rebuild_from_scratch(updates: list[Any]) -> None:
    index = AnswerIndex()
    lists: dict[str, ServiceList] = {}
    masks: dict[str, FailingChecks] = {}
    for n, (kind, name, payload) in enumerate(updates):
        if kind == "list":
            lst = make_list(name, n + 1, payload)
            lists[name] = lst
            index.apply_list(lst)
        else:
            refs, nodes = payload
            checks = [{"Node": nd, "ServiceID": f"sid{sid}", "Status": name} for nd, sid in refs]
            checks += [{"Node": nd, "ServiceID": "", "Status": name} for nd in nodes]
            masks[name] = failing_from_checks(checks, n + 1)
            index.apply_mask(name, masks[name])
        union = FailingChecks()
        for m in masks.values():
            union = union | m
        assert index.answers == answers_from_scratch(lists.values(), union)
        # The mask only ever removes answers.
        assert index.answers.keys() <= answers_from_scratch(lists.values()).keys()
        unmasked = answers_from_scratch(lists.values())
        assert index.masked == sum(1 for k in unmasked if index.answers.get(k) != unmasked[k])
    # Dropping every list empties the index and its bookkeeping.
    for name in list(lists):
        index.forget(name)
    assert index.answers == {} and index.instances == 0
    assert (index.shadowed, index.duplicate, index.masked) == (0, 0, 0)
    assert not index._candidates and not index._by_ref and not index._by_node


def test_stats_count_shadowed_and_duplicate_instances() -> None:
    index = AnswerIndex()
    index.apply_list(make_list("atserver", 1, [(1, 5, "n1", 1, 1), (1, 4, "n2", 2, 1)]))
    index.apply_list(make_list("atserver-0", 2, [(1, 5, "n1", 3, 1)]))
    assert (index.shadowed, index.duplicate) == (1, 1)
    # Equal tokens: the lower service ID is answered (sid1 < sid3).
    assert index.answers["u1"] == b"10.0.0.1:1000\r\n@"
    index.apply_mask("critical", failing_from_checks([{"Node": "n1", "ServiceID": "sid1"}]))
    # The duplicate on n1 (sid3) is answered now: the same address, so nothing is masked.
    assert index.answers["u1"] == b"10.0.0.1:1000\r\n@"
    assert index.masked == 0
    index.apply_mask("critical", failing_from_checks([{"Node": "n1", "ServiceID": ""}]))
    assert index.answers["u1"] == b"10.0.0.1:1001\r\n@"  # only n2's lower token is left
    assert index.masked == 1
    res = index.apply_list(make_list("atserver", 3, [(1, 5, "n1", 1, 1)]))
    assert (res.instances, res.atsigns) == (1, 1)  # only the removed one counts
    assert index.answers == {}


def test_a_renamed_copy_loses_to_the_newer_registration_of_the_same_instance() -> None:
    """The same (node, service ID) in two lists only happens when Consul kept a stale list;
    the newer ModifyIndex wins."""
    index = AnswerIndex()
    old = [entry(1, 5, 1000, "sid1", modify=3)]
    new = [entry(1, 5, 2000, "sid1", modify=9)]
    index.apply_list(parse_service_list("atserver", 3, old))
    index.apply_list(parse_service_list("atserver-0", 9, new))
    assert index.answers["u1"] == b"10.0.0.1:2000\r\n@"


bodies = st.lists(instance_spec, max_size=8).map(
    lambda specs: [
        entry(who, token, 1000 + n, f"sid{sid}-{n}", node, modify)
        for n, (who, token, node, sid, modify) in enumerate(specs)
    ]
)


@settings(max_examples=200, deadline=None)
@given(bodies, st.sampled_from([None, 4]), bodies)
def test_split_entries_matches_json_and_reuse_gives_the_same_list(
    docs: list[Any], indent: int | None, before: list[Any]
) -> None:
    seps = (",", ":") if indent is None else (",", ": ")
    body = json.dumps(docs, indent=indent, separators=seps).encode()
    pieces = split_entries(body)
    assert pieces is not None
    assert [json.loads(p) for p in pieces] == docs
    previous = parse_service_body(
        "s", 1, json.dumps(before + docs[:2], indent=indent, separators=seps).encode()
    )
    reference = parse_service_list("s", 2, docs)
    again = parse_service_body("s", 2, body, previous)
    assert again.instances == reference.instances and again.rejected == reference.rejected


def test_bodies_not_shaped_like_a_health_list_are_parsed_whole() -> None:
    assert split_entries(b"[]") == [] and split_entries(b" [ ]\n") == []
    assert split_entries(b'[{"a": 1}]') is None
    assert split_entries(b'{"Node": {}}') is None
    lst = parse_service_body("s", 1, b'[{"a": 1}, 3]')
    assert sorted(lst.rejected.values()) == ["entry_not_an_object", "missing_atsign"]
