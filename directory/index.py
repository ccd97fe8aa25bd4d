"""The directory's answers, kept up to date one Consul service list at a time.

Every followed service (the legacy ``atserver``, or a shard ``atserver-3f``) delivers its own
list of passing instances; a failing-checks mask removes answers at once. Applying a new list
compares it with that service's previous list and re-ranks only the atSigns whose instances
were added, changed or removed, so the cost of a change is one shard's list (which Consul
re-sends whole), not the whole directory. Applying the mask re-ranks only the atSigns of the
checks that started or stopped failing.

For each atSign the answer is the passing, unmasked instance with the highest fencing token
(numeric); equal tokens: the lower service ID (so replicas agree), then the newer registration
(Consul ``ModifyIndex``). The mask only ever removes answers: what is answered is always a
subset of what the lists alone would answer.
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from directory.protocol import AtSignError, answer_for, atsign_key

InstanceRef = tuple[str, str]
"""(Consul node, service ID): what a Consul check belongs to; unique in the catalog."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One passing atServer registration, as the directory answers it."""

    key: str  # atSign without "@", lower case
    host: str
    port: int
    fencing_token: int
    service_id: str
    node: str = ""
    cloud: str = ""
    consul_node: str = ""  # the Consul node the instance is registered on
    service: str = ""  # the Consul service (legacy name or shard) it was listed in
    modify_index: int = 0  # Consul's ModifyIndex of the registration

    @property
    def ref(self) -> InstanceRef:
        return (self.consul_node, self.service_id)


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """A passing registration that the directory ignores, and why."""

    service_id: str
    reason: str


def _meta_str(meta: Mapping[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return value if isinstance(value, str) else None


def _intern(text: str) -> str:
    # Hosts, nodes, clouds and service names repeat across thousands of instances.
    return sys.intern(text)


def instance_from_entry(entry: Mapping[str, Any], service: str = "") -> Instance | RejectedInstance:
    """One ``/v1/health/service`` entry as an :class:`Instance`, or why it is unusable."""
    svc = entry.get("Service") or {}
    node = entry.get("Node") or {}
    if not isinstance(svc, Mapping) or not isinstance(node, Mapping):
        return RejectedInstance("?", "entry_not_an_object")
    service_id = str(svc.get("ID") or "?")
    checks = entry.get("Checks") or []
    # The query asks for passing instances only; checking again costs little and keeps
    # a stale or misconfigured agent from sending clients to a failing atServer.
    if not isinstance(checks, list) or any(
        not isinstance(c, Mapping) or c.get("Status") != "passing" for c in checks
    ):
        return RejectedInstance(service_id, "check_not_passing")
    meta = svc.get("Meta") or {}
    if not isinstance(meta, Mapping):
        return RejectedInstance(service_id, "meta_not_a_map")
    atsign = _meta_str(meta, "atsign")
    if atsign is None:
        return RejectedInstance(service_id, "missing_atsign")
    if not atsign.startswith("@"):
        return RejectedInstance(service_id, "atsign_without_at")
    try:
        key = atsign_key(atsign)
    except AtSignError:
        return RejectedInstance(service_id, "invalid_atsign")
    token_text = _meta_str(meta, "fencing_token")
    if token_text is None:
        return RejectedInstance(service_id, "missing_fencing_token")
    if not (token_text.isascii() and token_text.isdigit()):
        return RejectedInstance(service_id, "invalid_fencing_token")
    host = svc.get("Address") or node.get("Address") or ""
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        return RejectedInstance(service_id, "missing_address")
    port = svc.get("Port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return RejectedInstance(service_id, "invalid_port")
    modify_index = svc.get("ModifyIndex")
    consul_node = str(node.get("Node") or "")
    return Instance(
        key=key,
        host=_intern(host),
        port=port,
        fencing_token=int(token_text),
        service_id=service_id,
        node=_intern(_meta_str(meta, "node") or consul_node),
        cloud=_intern(_meta_str(meta, "cloud") or ""),
        consul_node=_intern(consul_node),
        service=_intern(service or str(svc.get("Service") or "")),
        modify_index=modify_index if isinstance(modify_index, int) else 0,
    )


PieceKey = tuple[int, int, int]
"""hash, CRC-32 and length of one entry's JSON text: tells an unchanged entry cheaply."""


@dataclass(frozen=True)
class ServiceList:
    """One Consul answer for one service: its usable passing instances and the rejects.

    ``pieces`` remembers what each entry's JSON text became, so that the next list of the
    same service only parses the entries whose text changed.
    """

    service: str
    index: int = 0
    instances: Mapping[InstanceRef, Instance] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)  # service ID -> reason
    pieces: Mapping[PieceKey, Instance | RejectedInstance] = field(default_factory=dict)


class ListFormatError(ValueError):
    """A service list that is not a JSON list of objects."""


# Between two entries of a health list: the end of one object, a comma, and the next entry
# opening with "Node": {. Inside a JSON string a quote is always escaped, so this cannot
# match within a value; a split in a wrong place would leave a piece that is not JSON, and
# the list is then parsed whole.
_ENTRY_BOUNDARY = re.compile(rb'\}\s*,\s*(?=\{\s*"Node"\s*:\s*\{)')
_LIST_START = re.compile(rb'\s*\[\s*(?=\{\s*"Node"\s*:\s*\{)')
_EMPTY = re.compile(rb"\s*\[\s*\]\s*$")


def split_entries(body: bytes) -> list[bytes] | None:
    """The entries of a ``/v1/health/service`` body as separate JSON texts, without parsing
    them; None if the body is not shaped like one (then it must be parsed whole)."""
    if _EMPTY.match(body):
        return []
    start = _LIST_START.match(body)
    tail = body.rstrip()
    if start is None or not tail.endswith(b"]"):
        return None
    inner_end = len(tail[:-1].rstrip())
    if inner_end <= start.end() or body[inner_end - 1 : inner_end] != b"}":
        return None
    pieces: list[bytes] = []
    pos = start.end()
    for m in _ENTRY_BOUNDARY.finditer(body, pos, inner_end):
        pieces.append(body[pos : m.start() + 1])
        pos = m.end()
    pieces.append(body[pos:inner_end])
    return pieces


def _piece_key(piece: bytes) -> PieceKey:
    return (hash(piece), zlib.crc32(piece), len(piece))


def _add_instance(instances: dict[InstanceRef, Instance], inst: Instance) -> None:
    previous = instances.get(inst.ref)
    if previous is None or rank(inst) < rank(previous):
        instances[inst.ref] = inst


def parse_service_body(
    service: str, index: int, body: bytes, previous: ServiceList | None = None
) -> ServiceList:
    """The :class:`ServiceList` for one raw ``/v1/health/service/<service>?passing`` body.

    Entries whose JSON text is the same as in ``previous`` are not parsed again: a list with
    one change costs a split and a hash per entry plus one small parse. Raises
    :class:`ListFormatError` if the body is not a JSON list.
    """
    pieces = split_entries(body)
    if pieces is not None:
        known = previous.pieces if previous is not None else {}
        instances: dict[InstanceRef, Instance] = {}
        rejected: dict[str, str] = {}
        by_piece: dict[PieceKey, Instance | RejectedInstance] = {}
        for piece in pieces:
            key = _piece_key(piece)
            hit = known.get(key)
            if hit is None:
                try:
                    entry = json.loads(piece)
                except ValueError:
                    break  # not split where expected: parse the whole body below
                if not isinstance(entry, dict):
                    break
                hit = instance_from_entry(entry, service)
            by_piece[key] = hit
            if isinstance(hit, RejectedInstance):
                rejected[hit.service_id] = hit.reason
            else:
                _add_instance(instances, hit)
        else:
            return ServiceList(service, index, instances, rejected, by_piece)
    try:
        entries = json.loads(body)
    except ValueError as exc:
        raise ListFormatError(f"response is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ListFormatError("response is not a JSON list")
    return parse_service_list(service, index, entries, previous)


def _unchanged(entry: Mapping[str, Any], prev: Instance) -> bool:
    """True if ``entry`` is the registration ``prev`` was made from, still passing: same
    ``ModifyIndex`` (Consul bumps it on every change of the service) and address."""
    svc = entry.get("Service")
    node = entry.get("Node")
    if not isinstance(svc, dict) or not isinstance(node, dict):
        return False
    if not prev.modify_index or svc.get("ModifyIndex") != prev.modify_index:
        return False
    if (svc.get("Address") or node.get("Address")) != prev.host:
        return False
    checks = entry.get("Checks")
    return isinstance(checks, list) and all(
        isinstance(c, dict) and c.get("Status") == "passing" for c in checks
    )


def parse_service_list(
    service: str, index: int, entries: Sequence[Any], previous: ServiceList | None = None
) -> ServiceList:
    """The :class:`ServiceList` for one ``/v1/health/service/<service>?passing`` answer.

    Instances unchanged since ``previous`` (same node, ID, ``ModifyIndex``) are reused
    without being validated again, which makes a list with one change cheap to apply.
    """
    instances: dict[InstanceRef, Instance] = {}
    rejected: dict[str, str] = {}
    before = previous.instances if previous is not None else {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            rejected[f"?{n}"] = "entry_not_an_object"
            continue
        if before:
            try:
                ref = (str(entry["Node"]["Node"]), str(entry["Service"]["ID"]))
            except (KeyError, TypeError):
                ref = ("", "")
            prev = before.get(ref)
            if prev is not None and ref not in instances and _unchanged(entry, prev):
                instances[ref] = prev
                continue
        inst = instance_from_entry(entry, service)
        if isinstance(inst, RejectedInstance):
            rejected[inst.service_id] = inst.reason
        else:
            _add_instance(instances, inst)
    return ServiceList(service, index, instances, rejected)


@dataclass(frozen=True, slots=True)
class FailingChecks:
    """Non-passing checks: (Consul node, service ID) pairs, and nodes with a node check."""

    services: frozenset[InstanceRef] = frozenset()
    nodes: frozenset[str] = frozenset()
    index: int = 0

    def masks(self, inst: Instance) -> bool:
        """True if a failing check rules ``inst`` out."""
        return inst.consul_node in self.nodes or inst.ref in self.services

    def __or__(self, other: FailingChecks) -> FailingChecks:
        return FailingChecks(
            self.services | other.services, self.nodes | other.nodes, max(self.index, other.index)
        )


def failing_from_checks(entries: Sequence[Any], index: int = 0) -> FailingChecks:
    """The mask for one ``/v1/health/state/<state>`` answer (passing checks are skipped)."""
    services: set[InstanceRef] = set()
    nodes: set[str] = set()
    for check in entries:
        if not isinstance(check, Mapping) or check.get("Status") == "passing":
            continue
        node = str(check.get("Node") or "")
        service_id = check.get("ServiceID") or ""
        if service_id:
            services.add((node, str(service_id)))
        else:
            nodes.add(node)  # a node-level check fails every service on the node
    return FailingChecks(frozenset(services), frozenset(nodes), index)


def rank(inst: Instance) -> tuple[int, str, int, str, str]:
    """Sort key, best first: highest token, lower service ID, newer registration."""
    return (
        -inst.fencing_token, inst.service_id, -inst.modify_index, inst.consul_node, inst.service,
    )  # fmt: skip


_Slot = tuple[str, str, str]  # (service, Consul node, service ID): one listed instance


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one update changed: instances added/changed/removed, atSigns re-ranked."""

    instances: int
    atsigns: int
    new_rejects: tuple[RejectedInstance, ...] = ()


class AnswerIndex:
    """atSign -> the reply to send, updated incrementally (every method runs on one thread).

    ``answers`` is the dict lookups read; it is changed in place, one atSign at a time.
    """

    def __init__(self) -> None:
        self.answers: dict[str, bytes] = {}
        self._lists: dict[str, ServiceList] = {}
        self._candidates: dict[str, dict[_Slot, Instance]] = {}
        self._by_ref: dict[InstanceRef, dict[str, str]] = {}  # ref -> {service: key}
        self._by_node: dict[str, dict[tuple[str, str], str]] = {}  # node -> {(svc, sid): key}
        self._masks: dict[str, FailingChecks] = {}
        self.mask = FailingChecks()
        self._stats: dict[str, tuple[int, int, int]] = {}  # key -> shadowed, duplicate, masked
        self.shadowed = 0
        self.duplicate = 0
        self.masked = 0
        self.rejected: Counter[str] = Counter()

    def __len__(self) -> int:
        """atSigns answered with host:port now."""
        return len(self.answers)

    @property
    def instances(self) -> int:
        """Usable passing instances held, over every service."""
        return sum(len(lst.instances) for lst in self._lists.values())

    def service_list(self, service: str) -> ServiceList | None:
        return self._lists.get(service)

    def candidates(self, key: str) -> list[Instance]:
        """Every passing instance of ``key``, best first (masked ones included)."""
        return sorted(self._candidates.get(key, {}).values(), key=rank)

    def apply_list(self, new: ServiceList) -> ApplyResult:
        """Replace ``new.service``'s list; re-rank only the atSigns that changed in it."""
        old = self._lists.get(new.service)
        old_instances: Mapping[InstanceRef, Instance] = old.instances if old else {}
        touched: set[str] = set()
        changed = 0
        service = new.service
        for ref, inst in new.instances.items():
            prev = old_instances.get(ref)
            if prev is inst or prev == inst:
                continue
            changed += 1
            if prev is not None:
                self._remove(service, prev)
                touched.add(prev.key)
            self._add(service, inst)
            touched.add(inst.key)
        for ref, prev in old_instances.items():
            if ref not in new.instances:
                changed += 1
                self._remove(service, prev)
                touched.add(prev.key)
        old_rejected: Mapping[str, str] = old.rejected if old else {}
        new_rejects: list[RejectedInstance] = []
        if old_rejected or new.rejected:
            self.rejected.subtract(old_rejected.values())
            self.rejected.update(new.rejected.values())
            new_rejects = [
                RejectedInstance(sid, reason)
                for sid, reason in new.rejected.items()
                if old_rejected.get(sid) != reason
            ]
        self._lists[service] = new
        for key in touched:
            self._rerank(key)
        return ApplyResult(changed, len(touched), tuple(new_rejects))

    def forget(self, service: str) -> ApplyResult:
        """Drop a service's list (as if Consul had listed nothing)."""
        return self.apply_list(ServiceList(service))

    def apply_mask(self, source: str, failing: FailingChecks) -> ApplyResult:
        """Replace one source's failing checks (e.g. ``critical``); the mask is the union."""
        self._masks[source] = failing
        new = FailingChecks()
        for part in self._masks.values():
            new = new | part
        old = self.mask
        self.mask = new
        touched: set[str] = set()
        for ref in old.services ^ new.services:
            touched.update(self._by_ref.get(ref, {}).values())
        for node in old.nodes ^ new.nodes:
            touched.update(self._by_node.get(node, {}).values())
        for key in touched:
            self._rerank(key)
        changed = len(old.services ^ new.services) + len(old.nodes ^ new.nodes)
        return ApplyResult(changed, len(touched))

    def _add(self, service: str, inst: Instance) -> None:
        slot = (service, inst.consul_node, inst.service_id)
        self._candidates.setdefault(inst.key, {})[slot] = inst
        self._by_ref.setdefault(inst.ref, {})[service] = inst.key
        self._by_node.setdefault(inst.consul_node, {})[(service, inst.service_id)] = inst.key

    def _remove(self, service: str, inst: Instance) -> None:
        slot = (service, inst.consul_node, inst.service_id)
        cands = self._candidates.get(inst.key)
        if cands is not None:
            cands.pop(slot, None)
            if not cands:
                del self._candidates[inst.key]
        refs = self._by_ref.get(inst.ref)
        if refs is not None:
            refs.pop(service, None)
            if not refs:
                del self._by_ref[inst.ref]
        on_node = self._by_node.get(inst.consul_node)
        if on_node is not None:
            on_node.pop((service, inst.service_id), None)
            if not on_node:
                del self._by_node[inst.consul_node]

    def _rerank(self, key: str) -> None:
        cands = self._candidates.get(key)
        shadowed = duplicate = masked = 0
        if not cands:
            self.answers.pop(key, None)
        else:
            ordered = sorted(cands.values(), key=rank) if len(cands) > 1 else list(cands.values())
            top = ordered[0]
            for inst in ordered[1:]:
                if inst.fencing_token < top.fencing_token:
                    shadowed += 1
                else:
                    duplicate += 1
            mask = self.mask
            chosen = next((i for i in ordered if not mask.masks(i)), None)
            if chosen is None:
                self.answers.pop(key, None)
                masked = 1
            else:
                answer = answer_for(chosen.host, chosen.port)
                self.answers[key] = answer
                # Masked: a failing check changed the answer (null or another instance).
                if chosen is not top and answer != answer_for(top.host, top.port):
                    masked = 1
        old = self._stats.pop(key, (0, 0, 0))
        if shadowed or duplicate or masked:
            self._stats[key] = (shadowed, duplicate, masked)
        self.shadowed += shadowed - old[0]
        self.duplicate += duplicate - old[1]
        self.masked += masked - old[2]


def answers_from_scratch(
    lists: Iterable[ServiceList], failing: FailingChecks = FailingChecks()
) -> dict[str, bytes]:
    """The answers recomputed from nothing (the reference the incremental index must match)."""
    best: dict[str, list[Instance]] = {}
    for lst in lists:
        for inst in lst.instances.values():
            if not failing.masks(inst):
                best.setdefault(inst.key, []).append(inst)
    out: dict[str, bytes] = {}
    for key, insts in best.items():
        chosen = min(insts, key=rank)
        out[key] = answer_for(chosen.host, chosen.port)
    return out
