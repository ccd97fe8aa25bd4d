"""Following Consul's health data: one blocking query per service, two for failing checks.

The supervisor registers one Consul service instance per running atServer, in the service
its layout names (``directory.shards``): the legacy ``atserver``, or a shard ``atserver-3f``.
Each instance: ``Address``/``Port`` where clients reach it, ``Meta.atsign`` (``"@alice"``),
``Meta.fencing_token`` (decimal), ``Meta.node``, ``Meta.cloud``, tag ``alice``.

Queries, each its own loop with its own index, backoff and deadline:

- ``/v1/health/service/<service>?passing`` for every followed service (the source of every
  answer). Consul re-sends a service's whole list on every change in it, so the cost of a
  change is the size of its shard. Lists are long polls of ``list_wait`` (300 s) because an
  idle re-send costs as much as a change; a list that comes back unchanged (same index and
  same bytes) is not parsed.
- ``/v1/health/state/critical`` and ``/v1/health/state/warning``, filtered on the server to
  the followed services and node-level checks: small, and they wake only when a check enters
  or leaves that state, so a failing check masks its instance within milliseconds.

Lookups read :attr:`CatalogWatcher.index`'s dict; they never wait on Consul. When Consul is
unreachable the last answers stay in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from directory.index import (
    AnswerIndex,
    ApplyResult,
    FailingChecks,
    ListFormatError,
    ServiceList,
    failing_from_checks,
    parse_service_body,
)
from directory.logs import log_event
from directory.metrics import DirectoryMetrics

log = logging.getLogger("atdirectory.catalog")

SERVICE_NAME = "atserver"
CHECK_STATES = ("critical", "warning")
"""Non-passing check states; ``?passing`` leaves out instances with either."""
INITIAL_CONCURRENCY = 8
"""Full (non-blocking) list queries in flight at once, e.g. at start or after an outage."""
PARSE_IN_THREAD_BYTES = 64 * 1024
"""Lists larger than this are parsed in a worker thread."""
LARGE_MASK_BYTES = 1 << 20
"""A failing-checks answer this large (thousands of failing checks, a site down) is
re-sent whole on every further change: after one, wait ``LARGE_MASK_PAUSE`` first."""
LARGE_MASK_PAUSE = 1.0


class ConsulError(Exception):
    """A Consul query failed (unreachable, timed out, bad status or body)."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One Consul answer before parsing: its ``X-Consul-Index`` and body."""

    index: int
    body: bytes

    @property
    def digest(self) -> tuple[int, int]:
        """Length and CRC-32 of the body: enough to tell a re-sent list from a new one."""
        return (len(self.body), zlib.crc32(self.body))

    def json(self) -> list[Any]:
        """The body as a JSON list; raises :class:`ConsulError`."""
        try:
            data = json.loads(self.body)
        except ValueError as exc:
            raise ConsulError(f"response is not JSON: {exc}") from exc
        if not isinstance(data, list):
            raise ConsulError("response is not a JSON list")
        return data


def layout_filter(base: str, widths: Sequence[int]) -> str:
    """The server-side filter of the failing-checks queries: node-level checks, and checks
    of the services of ``base``'s layouts with these hex widths (0: the legacy name)."""
    alts = sorted({base if w == 0 else f"{base}-[0-9a-f]{{{w}}}" for w in widths})
    return f'ServiceID == "" or ServiceName matches {json.dumps("^(" + "|".join(alts) + ")$")}'


class ConsulHealthClient:
    """Blocking queries on Consul's health endpoints with explicit deadlines.

    ``connections``: the most HTTP connections held to the agent at once (one per query in
    flight); Consul resets connections beyond ``limits.http_max_conns_per_client`` (200 by
    default) per client address.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        connect_timeout: float = 3.0,
        stale: bool = False,
        connections: int = 16,
        checks_filter: str = 'ServiceID == "" or ServiceName == "atserver"',
    ) -> None:
        self._base = url.rstrip("/")
        # Loopback to the local agent: compressing costs Consul ~70 % more CPU per list.
        self._headers = {"Accept-Encoding": "identity"}
        if token:
            self._headers["X-Consul-Token"] = token
        self._connect_timeout = connect_timeout
        self._stale = stale
        self._connections = connections
        self._checks_filter = checks_filter
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self._base

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self._session

    async def service_health(self, service: str, index: int, wait: float) -> RawResponse:
        """Passing instances of ``service``: ``/v1/health/service/<service>?passing``.

        Waits up to ``wait`` s for a change after ``index`` (0: answer at once). The whole
        request has a deadline of ``wait`` plus Consul's jitter (wait/16) plus the connect
        timeout plus 1 s; raises :class:`ConsulError` on any failure.
        """
        return await self._get(f"/v1/health/service/{service}", {"passing": "1"}, index, wait)

    async def checks_in_state(self, state: str, index: int, wait: float) -> RawResponse:
        """Checks in ``state`` (critical, warning) of the followed services and of nodes."""
        params = {"filter": self._checks_filter}
        return await self._get(f"/v1/health/state/{state}", params, index, wait)

    async def http_connection_limit(self, timeout: float = 3.0) -> int | None:
        """The agent's ``limits.http_max_conns_per_client``, or None if it cannot be read."""
        try:
            raw = await self._get("/v1/agent/self", {}, 0, timeout)
            doc = json.loads(raw.body)
        except (ConsulError, ValueError):
            return None
        value = (doc.get("DebugConfig") or {}).get("HTTPMaxConnsPerClient")
        return value if isinstance(value, int) and value > 0 else None

    async def _get(self, path: str, params: dict[str, str], index: int, wait: float) -> RawResponse:
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
            new_index = int(raw_index) if raw_index else 0
        except ValueError as exc:
            raise ConsulError(f"{url}: bad X-Consul-Index header {raw_index!r}") from exc
        return RawResponse(new_index, body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


QueryFn = Callable[[int, float], Awaitable[RawResponse]]


@dataclass(eq=False)
class _Follow:
    """The state of one blocking-query loop."""

    name: str
    query: QueryFn
    apply: Callable[[RawResponse], Awaitable[None]]
    wait: float
    is_list: bool = False
    index: int = 0
    digest: tuple[int, int] = (0, 0)
    failures: int = 0
    up: bool = False
    synced: bool = False
    last_ok: float | None = None


def _parse_list(service: str, raw: RawResponse, previous: ServiceList | None) -> ServiceList:
    try:
        return parse_service_body(service, raw.index, raw.body, previous)
    except ListFormatError as exc:
        raise ConsulError(f"service {service}: {exc}") from exc


class CatalogWatcher:
    """Keeps the answers in step with Consul; serves lookups without waiting on it.

    Follows every service in ``services`` (each list applied incrementally) and, side by
    side, the failing checks (a mask that removes answers at once). On a Consul error a
    query's last answer stays, ``consul_up`` drops to 0, the error is counted and logged, and
    the next attempt follows a bounded exponential backoff with jitter; the first success
    afterwards is a full, non-blocking resync of that query.
    """

    def __init__(
        self,
        client: ConsulHealthClient,
        metrics: DirectoryMetrics,
        *,
        services: Sequence[str] = (SERVICE_NAME,),
        wait: float = 30.0,
        list_wait: float = 300.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        initial_concurrency: int = INITIAL_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._sleep = sleep
        self.index = AnswerIndex()
        self._answers = self.index.answers
        self._initial = asyncio.Semaphore(initial_concurrency)
        self._lists: dict[str, _Follow] = {}
        for name in dict.fromkeys(services):
            self._lists[name] = _Follow(
                f"service:{name}",
                self._list_query(name),
                self._list_apply(name),
                list_wait,
                is_list=True,
            )
        self._masks = [
            _Follow(f"checks:{state}", self._checks_query(state), self._mask_apply(state), wait)
            for state in CHECK_STATES
        ]
        self._follows = [*self._lists.values(), *self._masks]
        self._down = len(self._follows)
        self._unsynced = len(self._lists)
        self._synced = asyncio.Event()
        self._last_error_log = -1e9
        self._errors_not_logged = 0
        metrics.bind_map(self.map_age, lambda: len(self._answers))
        metrics.services_followed.set(len(self._lists))
        metrics.services_unsynced.set(self._unsynced)

    @property
    def services(self) -> list[str]:
        return list(self._lists)

    def _list_query(self, service: str) -> QueryFn:
        async def query(index: int, wait: float) -> RawResponse:
            return await self._client.service_health(service, index, wait)

        return query

    def _checks_query(self, state: str) -> QueryFn:
        async def query(index: int, wait: float) -> RawResponse:
            return await self._client.checks_in_state(state, index, wait)

        return query

    def _list_apply(self, service: str) -> Callable[[RawResponse], Awaitable[None]]:
        async def apply(raw: RawResponse) -> None:
            started = time.perf_counter()
            previous = self.index.service_list(service)
            if len(raw.body) > PARSE_IN_THREAD_BYTES:
                new = await asyncio.to_thread(_parse_list, service, raw, previous)
            else:
                new = _parse_list(service, raw, previous)
            result = self.index.apply_list(new)
            self._after_list(service, new, result, time.perf_counter() - started)

        return apply

    def _mask_apply(self, state: str) -> Callable[[RawResponse], Awaitable[None]]:
        async def apply(raw: RawResponse) -> None:
            failing: FailingChecks = failing_from_checks(raw.json(), raw.index)
            self.index.apply_mask(state, failing)
            self._metrics.instances_masked.set(self.index.masked)

        return apply

    def _after_list(
        self, service: str, new: ServiceList, result: ApplyResult, seconds: float
    ) -> None:
        m = self._metrics
        m.consul_syncs.inc()
        m.instance_changes.inc(result.instances)
        m.list_apply_seconds.observe(seconds)
        m.instances_shadowed.set(self.index.shadowed)
        m.instances_duplicate.set(self.index.duplicate)
        m.instances_masked.set(self.index.masked)
        for reason, count in self.index.rejected.items():
            m.instances_rejected.labels(reason).set(count)
        # Log each bad registration once while it stays bad, not on every sync.
        for r in result.new_rejects:
            log_event(
                log, logging.WARNING, "instance_ignored", service=service,
                service_id=r.service_id, reason=r.reason,
            )  # fmt: skip
        if result.instances:
            log_event(
                log, logging.DEBUG, "list_applied", service=service, index=new.index,
                instances=len(new.instances), changed=result.instances,
                atsigns=len(self._answers), seconds=round(seconds, 4),
            )  # fmt: skip

    def lookup(self, key: str) -> bytes | None:
        """The reply for atSign ``key`` (None: answer null)."""
        return self._answers.get(key)

    def map_age(self) -> float:
        """Seconds the answers may lag Consul: 0 while every query is answered or waiting on
        Consul, else since the last success of the oldest failing query; -1 before the
        first full map."""
        if not self.synced:
            return -1.0
        now = self._clock()
        age = 0.0
        for follow in self._follows:
            if not follow.up and follow.last_ok is not None:
                age = max(age, now - follow.last_ok)
        return age

    @property
    def synced(self) -> bool:
        """True once every followed service delivered a first list."""
        return self._unsynced == 0

    async def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the first full map; True if it came."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _sync(self, follow: _Follow) -> None:
        if follow.index == 0 and follow.is_list:
            async with self._initial:
                await self._sync_step(follow)
        else:
            await self._sync_step(follow)

    async def _sync_step(self, follow: _Follow) -> None:
        response = await follow.query(follow.index, follow.wait)
        # Consul: an index that goes backwards (e.g. a restarted agent) means start over.
        if response.index < follow.index:
            log_event(
                log, logging.INFO, "consul_index_reset", query=follow.name, old=follow.index,
                new=response.index,
            )  # fmt: skip
            follow.index = 0
            return
        digest = response.digest
        # Same index and same bytes: nothing changed. Same index but other bytes happens when
        # Consul missed bumping an index (an instance renamed in place): apply it anyway.
        if not follow.synced or response.index != follow.index or digest != follow.digest:
            await follow.apply(response)
        follow.digest = digest
        follow.index = max(response.index, 1)
        follow.last_ok = self._clock()
        if not follow.synced:
            follow.synced = True
            if follow.is_list:
                self._unsynced -= 1
                self._metrics.services_unsynced.set(self._unsynced)
                if self._unsynced == 0:
                    self._synced.set()
                    log_event(
                        log, logging.INFO, "map_complete", services=len(self._lists),
                        atsigns=len(self._answers),
                    )  # fmt: skip
        if not follow.is_list and len(response.body) > LARGE_MASK_BYTES:
            await self._sleep(LARGE_MASK_PAUSE)

    async def sync_once(self, service: str | None = None) -> None:
        """One query of a service's list (the first one if None; blocking if it has one);
        raises :class:`ConsulError`."""
        follow = self._lists[service] if service else next(iter(self._lists.values()))
        await self._sync(follow)

    async def sync_failing_once(self, state: str = "critical") -> None:
        """One query of the checks in ``state``; raises :class:`ConsulError`."""
        await self._sync(next(f for f in self._masks if f.name == f"checks:{state}"))

    def _set_up(self, follow: _Follow, up: bool) -> None:
        if follow.up != up:
            follow.up = up
            self._down += -1 if up else 1
        self._metrics.consul_up.set(1 if self._down == 0 else 0)

    async def _follow(self, follow: _Follow) -> None:
        while True:
            try:
                await self._sync(follow)
            except ConsulError as exc:
                follow.failures += 1
                follow.index = 0  # resync in full when Consul is back
                self._set_up(follow, False)
                self._metrics.consul_errors.inc()
                delay = min(
                    self._backoff_max, self._backoff_initial * 2 ** min(follow.failures - 1, 16)
                )
                delay *= random.uniform(0.5, 1.0)
                # Hundreds of queries fail together in an outage: at most one line a second.
                now = self._clock()
                if now - self._last_error_log >= 1.0:
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
                        queries_down=self._down,
                        errors_not_logged=self._errors_not_logged,
                    )
                    self._last_error_log = now
                    self._errors_not_logged = 0
                else:
                    self._errors_not_logged += 1
                await self._sleep(delay)
                continue
            failures, follow.failures = follow.failures, 0
            self._set_up(follow, True)
            if failures and self._down == 0:
                log_event(
                    log, logging.INFO, "consul_recovered", query=follow.name,
                    after_failures=failures, atsigns=len(self._answers),
                )  # fmt: skip

    async def run(self) -> None:
        """Follow Consul until cancelled (every query in its own task; none waits for another)."""
        async with asyncio.TaskGroup() as group:
            for follow in self._follows:
                group.create_task(self._follow(follow), name=f"consul-{follow.name}")
