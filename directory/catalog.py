"""The directory's map, fed from Consul's health data by blocking queries.

The supervisor registers one Consul service instance per running atServer:
service ``atserver``, ``Address``/``Port`` where clients reach it, ``Meta.atsign``
(``"@alice"``), ``Meta.fencing_token`` (decimal), ``Meta.node``, ``Meta.cloud`` and tag
``alice``. Only instances whose checks all pass count; among several for one atSign
the highest fencing token wins. Instances with invalid meta are skipped and counted.

Lookups read an immutable :class:`DirectoryMap` that the watcher swaps in whole, so they
never wait on Consul; when Consul is unreachable the last map stays in use.

Two blocking queries run side by side. ``/v1/health/service/atserver?passing`` is the
source of every answer, but Consul re-sends the whole list (about 1.6 KB per instance,
16 MB for 10,000) on every change, which takes a second or more to render and parse.
``/v1/health/state/any`` filtered to non-passing checks is small and returns within
milliseconds, so a check turning critical masks its instance at once. The mask only ever
removes answers: what is answered is always a subset of what the passing query alone
would answer, so it never makes the directory answer a failing instance.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from directory.logs import log_event
from directory.metrics import DirectoryMetrics
from directory.protocol import AtSignError, answer_for, atsign_key

log = logging.getLogger("atdirectory.catalog")

SERVICE_NAME = "atserver"


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


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """A passing registration that the directory ignores, and why."""

    service_id: str
    reason: str


@dataclass(frozen=True)
class DirectoryMap:
    """An immutable snapshot: atSign key -> the instance to answer (highest token).

    ``candidates`` holds every passing instance of an atSign, best first, so that an
    instance masked by a failing check can give way to the next one.
    """

    instances: Mapping[str, Instance] = field(default_factory=dict)
    answers: Mapping[str, bytes] = field(default_factory=dict)
    rejected: Sequence[RejectedInstance] = ()
    shadowed: int = 0
    index: int = 0
    candidates: Mapping[str, tuple[Instance, ...]] = field(default_factory=dict)

    def answer(self, key: str) -> bytes | None:
        """The complete protocol reply for ``key``, or None if no healthy atServer."""
        return self.answers.get(key)

    def __len__(self) -> int:
        return len(self.instances)


@dataclass(frozen=True, slots=True)
class FailingChecks:
    """Non-passing checks: (Consul node, service ID) pairs, and nodes with a node check."""

    services: frozenset[tuple[str, str]] = frozenset()
    nodes: frozenset[str] = frozenset()
    index: int = 0

    def masks(self, inst: Instance) -> bool:
        """True if a failing check rules ``inst`` out."""
        return (
            inst.consul_node in self.nodes or (inst.consul_node, inst.service_id) in self.services
        )


def failing_from_checks(entries: Sequence[Any], index: int = 0) -> FailingChecks:
    """The mask for one ``/v1/health/state/any`` response (non-passing checks only)."""
    services: set[tuple[str, str]] = set()
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


def masked_answers(current: DirectoryMap, failing: FailingChecks) -> Mapping[str, bytes]:
    """``current.answers`` without instances that ``failing`` rules out (a subset, always)."""
    if not failing.services and not failing.nodes:
        return current.answers
    affected = [key for key, best in current.instances.items() if failing.masks(best)]
    if not affected:
        return current.answers
    answers = dict(current.answers)
    for key in affected:
        for inst in current.candidates.get(key, ()):
            if not failing.masks(inst):
                answers[key] = answer_for(inst.host, inst.port)
                break
        else:
            del answers[key]
    return answers


def _meta_str(meta: Mapping[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return value if isinstance(value, str) else None


def instance_from_entry(entry: Mapping[str, Any]) -> Instance | RejectedInstance:
    """One ``/v1/health/service`` entry as an :class:`Instance`, or why it is unusable."""
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    service_id = str(service.get("ID") or "?")
    checks = entry.get("Checks") or []
    # The query asks for passing instances only; checking again costs nothing and keeps
    # a stale or misconfigured agent from sending clients to a failing atServer.
    if any(c.get("Status") != "passing" for c in checks if isinstance(c, Mapping)):
        return RejectedInstance(service_id, "check_not_passing")
    meta = service.get("Meta") or {}
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
    host = service.get("Address") or node.get("Address") or ""
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        return RejectedInstance(service_id, "missing_address")
    port = service.get("Port")
    if not isinstance(port, int) or not 0 < port < 65536:
        return RejectedInstance(service_id, "invalid_port")
    return Instance(
        key=key,
        host=host,
        port=port,
        fencing_token=int(token_text),
        service_id=service_id,
        node=_meta_str(meta, "node") or str(node.get("Node") or ""),
        cloud=_meta_str(meta, "cloud") or "",
        consul_node=str(node.get("Node") or ""),
    )


def build_map(entries: Sequence[Mapping[str, Any]], index: int = 0) -> DirectoryMap:
    """The map for one health query response: highest fencing token per atSign."""
    candidates: dict[str, list[Instance]] = {}
    rejected: list[RejectedInstance] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            rejected.append(RejectedInstance("?", "entry_not_an_object"))
            continue
        inst = instance_from_entry(entry)
        if isinstance(inst, RejectedInstance):
            rejected.append(inst)
        else:
            candidates.setdefault(inst.key, []).append(inst)
    # Highest token first; equal tokens should not happen, the lower service ID wins then
    # so that replicas agree.
    ordered = {
        key: tuple(sorted(insts, key=lambda i: (-i.fencing_token, i.service_id)))
        for key, insts in candidates.items()
    }
    best = {key: insts[0] for key, insts in ordered.items()}
    answers = {key: answer_for(i.host, i.port) for key, i in best.items()}
    shadowed = sum(len(insts) - 1 for insts in ordered.values())
    return DirectoryMap(best, answers, tuple(rejected), shadowed, index, ordered)


class ConsulError(Exception):
    """A Consul health query failed (unreachable, timed out, bad status or body)."""


@dataclass(frozen=True, slots=True)
class HealthResponse:
    """One answer of ``/v1/health/service/<name>?passing``."""

    index: int
    entries: list[Any]


class ConsulHealthClient:
    """Blocking queries on ``/v1/health/service/<service>?passing`` with explicit deadlines."""

    def __init__(
        self,
        url: str,
        *,
        service: str = SERVICE_NAME,
        token: str | None = None,
        connect_timeout: float = 3.0,
        stale: bool = False,
    ) -> None:
        self._base = url.rstrip("/")
        self._service = service
        self._headers = {"X-Consul-Token": token} if token else {}
        self._connect_timeout = connect_timeout
        self._stale = stale
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def query(self, index: int, wait: float) -> HealthResponse:
        """Passing instances of the service: ``/v1/health/service/<service>?passing``.

        Waits up to ``wait`` s for a change after ``index`` (0: answer at once). The whole
        request has a deadline of ``wait`` plus Consul's jitter (wait/16) plus the connect
        timeout; raises :class:`ConsulError` on any failure.
        """
        return await self._get(f"/v1/health/service/{self._service}", {"passing": "1"}, index, wait)

    async def query_failing(self, index: int, wait: float) -> HealthResponse:
        """Non-passing checks of the service's instances and of nodes (small: usually none),
        from ``/v1/health/state/any`` with a server-side filter; same deadlines."""
        selector = (
            f'Status != "passing" and (ServiceName == {json.dumps(self._service)} '
            'or ServiceID == "")'
        )
        return await self._get("/v1/health/state/any", {"filter": selector}, index, wait)

    async def _get(
        self, path: str, params: dict[str, str], index: int, wait: float
    ) -> HealthResponse:
        params = dict(params)
        if self._stale:
            params["stale"] = "1"
        deadline = self._connect_timeout + 1.0
        if index > 0:
            params["index"] = str(index)
            params["wait"] = f"{max(1, round(wait * 1000))}ms"
            deadline += wait * (1 + 1 / 16)
        timeout = aiohttp.ClientTimeout(total=deadline, sock_connect=self._connect_timeout)
        url = self._base + path
        session = await self._get_session()
        try:
            async with session.get(url, params=params, timeout=timeout) as resp:
                body = await resp.read()
                if resp.status != 200:
                    text = body[:200].decode(errors="replace").strip()
                    raise ConsulError(f"{url}: HTTP {resp.status}: {text}")
                raw_index = resp.headers.get("X-Consul-Index", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConsulError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            new_index = int(raw_index)
        except ValueError as exc:
            raise ConsulError(f"{url}: bad X-Consul-Index header {raw_index!r}") from exc
        # Parsing ~16 MB for 10,000 instances takes a while: keep the event loop serving.
        try:
            entries = (
                await asyncio.to_thread(json.loads, body)
                if len(body) > 65536
                else (json.loads(body))
            )
        except ValueError as exc:
            raise ConsulError(f"{url}: response is not JSON: {exc}") from exc
        if not isinstance(entries, list):
            raise ConsulError(f"{url}: response is not a JSON list")
        return HealthResponse(new_index, entries)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


QueryFn = Callable[[int, float], Awaitable[HealthResponse]]


@dataclass
class _Follow:
    """The state of one blocking-query loop."""

    name: str
    query: QueryFn
    apply: Callable[[HealthResponse], Awaitable[None]]
    index: int = 0
    failures: int = 0
    up: bool = False


class CatalogWatcher:
    """Keeps the answers in step with Consul; serves lookups without waiting on it.

    Follows the passing instances (the map) and, side by side, the failing checks (a mask
    that removes answers at once). On a Consul error the last map and mask stay,
    ``consul_up`` drops to 0, the error is counted and logged, and the next attempt
    follows a bounded exponential backoff with jitter. The first success afterwards is a
    full, non-blocking resync.
    """

    def __init__(
        self,
        client: ConsulHealthClient,
        metrics: DirectoryMetrics,
        *,
        wait: float = 30.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._wait = wait
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._sleep = sleep
        self.current = DirectoryMap()
        self.failing = FailingChecks()
        self._answers: Mapping[str, bytes] = {}
        self._synced_at: float | None = None
        self._synced = asyncio.Event()
        self._passing = _Follow("passing", client.query, self._apply)
        self._failing = _Follow("failing", client.query_failing, self._apply_failing)
        self._seen_rejections: set[RejectedInstance] = set()
        self._rejection_reasons: set[str] = set()
        metrics.bind_map(self.map_age, lambda: len(self._answers))

    def lookup(self, key: str) -> bytes | None:
        """The reply for atSign ``key`` (None: answer null)."""
        return self._answers.get(key)

    def map_age(self) -> float:
        """Seconds since Consul last confirmed the map, -1 if it never did."""
        if self._synced_at is None:
            return -1.0
        return self._clock() - self._synced_at

    @property
    def synced(self) -> bool:
        """True once a first map came from Consul."""
        return self._synced_at is not None

    async def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the first map; True if it came."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _apply(self, response: HealthResponse) -> None:
        if len(response.entries) > 500:
            # ~0.25 s for 10,000 instances: build it off the event loop so lookups go on.
            new_map = await asyncio.to_thread(build_map, response.entries, response.index)
        else:
            new_map = build_map(response.entries, response.index)
        old = self.current
        self.current = new_map
        self._answers = masked_answers(new_map, self.failing)
        self._metrics.instances_masked.set(len(new_map.answers) - len(self._answers))
        self._synced_at = self._clock()
        self._synced.set()
        self._metrics.consul_syncs.inc()
        self._metrics.instances_shadowed.set(new_map.shadowed)
        reasons: dict[str, int] = {}
        for r in new_map.rejected:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        for reason in self._rejection_reasons - reasons.keys():
            self._metrics.instances_rejected.labels(reason).set(0)
        for reason, count in reasons.items():
            self._metrics.instances_rejected.labels(reason).set(count)
        self._rejection_reasons |= reasons.keys()
        # Log each bad registration once while it stays bad, not on every sync.
        rejected_now = set(new_map.rejected)
        for r in rejected_now - self._seen_rejections:
            log_event(
                log, logging.WARNING, "instance_ignored", service_id=r.service_id, reason=r.reason
            )
        self._seen_rejections = rejected_now
        if len(old) != len(new_map) or old.index == 0:
            log_event(log, logging.DEBUG, "map_updated", atsigns=len(new_map), index=response.index)

    async def _apply_failing(self, response: HealthResponse) -> None:
        self.failing = failing_from_checks(response.entries, response.index)
        self._answers = masked_answers(self.current, self.failing)
        self._metrics.instances_masked.set(len(self.current.answers) - len(self._answers))

    async def _sync(self, follow: _Follow) -> None:
        response = await follow.query(follow.index, self._wait)
        # Consul: an index that goes backwards (e.g. a restarted agent) means start over.
        if response.index < follow.index:
            log_event(
                log, logging.INFO, "consul_index_reset", query=follow.name, old=follow.index,
                new=response.index,
            )  # fmt: skip
            follow.index = 0
            return
        if response.index != follow.index or (follow is self._passing and not self.synced):
            await follow.apply(response)
        elif follow is self._passing:
            self._synced_at = self._clock()
        follow.index = max(response.index, 1)

    async def sync_once(self) -> None:
        """One query of the passing instances (blocking if a map is already held);
        raises :class:`ConsulError`."""
        await self._sync(self._passing)

    async def sync_failing_once(self) -> None:
        """One query of the failing checks; raises :class:`ConsulError`."""
        await self._sync(self._failing)

    def _set_up(self) -> None:
        self._metrics.consul_up.set(1 if self._passing.up and self._failing.up else 0)

    async def _follow(self, follow: _Follow) -> None:
        while True:
            try:
                await self._sync(follow)
            except ConsulError as exc:
                follow.failures += 1
                follow.index = 0  # resync in full when Consul is back
                follow.up = False
                self._metrics.consul_errors.inc()
                self._set_up()
                delay = min(
                    self._backoff_max, self._backoff_initial * 2 ** min(follow.failures - 1, 16)
                )
                delay *= random.uniform(0.5, 1.0)
                log_event(
                    log,
                    logging.WARNING,
                    "consul_error",
                    query=follow.name,
                    error=str(exc),
                    failures=follow.failures,
                    retry_in=round(delay, 3),
                    map_age=round(self.map_age(), 3),
                    atsigns=len(self._answers),
                )
                await self._sleep(delay)
                continue
            if follow.failures:
                log_event(
                    log, logging.INFO, "consul_recovered", query=follow.name,
                    after_failures=follow.failures, atsigns=len(self._answers),
                )  # fmt: skip
            follow.failures = 0
            follow.up = True
            self._set_up()

    async def run(self) -> None:
        """Follow Consul until cancelled (both queries; neither waits for the other)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow(self._passing), name="consul-passing")
            group.create_task(self._follow(self._failing), name="consul-failing")
