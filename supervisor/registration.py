"""Consul registration of this node's running atServers (always the node's own agent).

Naming contract (the directory and operators' tools rely on it; ``directory.shards``):
- one instance per atSign in every configured layout (``consul.shards``; ``[256]`` by
  default, ``[1, 256]`` while migrating): service ``atserver-3f`` (the atSign's shard,
  blake2b of its name) or, in the legacy layout ``1``, ``atserver``; service ID
  ``<service>-alice``; Address/Port where clients reach it;
- Meta ``atsign`` (``@alice``), ``node``, ``cloud``, ``fencing_token``
  (decimal string); tag ``alice`` so Consul DNS answers
  ``alice.atserver-3f.service.consul``;
- one check per instance, ``at-protocol`` (TTL), passed by the supervisor after its own
  at-protocol round trip: Consul cannot speak the at protocol, script checks need
  ``enable_script_checks`` (a remote-execution risk) and a TCP check passes as soon as
  docker-proxy accepts, before the atServer listens;
- one **node** check, ``atfailover-supervisor`` (TTL = the renew deadline, no service), that
  the session keeper passes after every renewal: Consul counts a Consul node's checks for
  every service on it, so a frozen or dead supervisor's atServers all turn critical by the
  time they are fenced, with one update per node, not per atSign. It needs the node's own
  agent (as in production: each node runs one); supervisors must not share an agent.
  (An alias check per instance did the same on a shared agent, but Consul 1.8 re-reads
  every check of the agent for each alias on every change: O(atSigns²), one core busy at
  a thousand.)
- ``DeregisterCriticalServiceAfter`` removes what a dead node left behind.

Cost: the probe check is updated only when its result changes, or when half its TTL has
passed; deregistration reads only the one service it removes; the full list of services
is read only by :meth:`Registrar.refresh` (anti-entropy, every ~30 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import consul
import consul.aio

from directory.shards import (
    DEFAULT_SHARDS,
    Registration,
    followed_services,
    is_layout_service,
    normalize_layouts,
    registrations,
    services_of,
)
from supervisor.deadline import within

log = logging.getLogger(__name__)

NODE_CHECK = "atfailover-supervisor"
"""ID of the node check the session keeper passes (a Consul node check: no service)."""

DEREGISTER_CONCURRENCY = 32
"""Deregistrations a shutdown starts at the same time."""

AGENT_CONCURRENCY = 8
"""Agent calls the registrar makes at the same time."""

AGENT_QUEUE_TIMEOUT = 60.0
"""Seconds an agent call may wait for its turn (a thousand registrations at start-up)."""


class RegistrationError(Exception):
    """The Consul agent refused or did not answer in time."""


@dataclass(frozen=True)
class Instance:
    """One atServer as registered."""

    atsign: str
    node: str
    cloud: str
    address: str
    port: int
    fencing_token: int


def bare(atsign: str) -> str:
    return atsign.lstrip("@")


def entry_health(entry: dict[str, Any]) -> str:
    """``passing``, ``critical`` or ``unknown`` (no check of its own) for one entry of
    ``/v1/health/service``: every check counts, the node's (``serfHealth``, the node check)
    as much as the instance's."""
    checks = entry.get("Checks") or []
    if not any(c.get("ServiceID") for c in checks):
        return "unknown"
    return "passing" if all(c.get("Status") == "passing" for c in checks) else "critical"


def health_entries(
    url: str,
    base: str,
    atsigns: Iterable[str],
    shards: Sequence[int] = (DEFAULT_SHARDS,),
    *,
    passing: bool = False,
    timeout: float = 2.0,
) -> list[dict[str, Any]]:
    """``/v1/health/service`` entries of the services holding ``atsigns`` in the layouts
    ``shards`` (one blocking-free GET per service; for tools and tests, not the daemon)."""
    entries: list[dict[str, Any]] = []
    for service in services_of(base, atsigns, shards):
        query = f"{url}/v1/health/service/{service}" + ("?passing=1" if passing else "")
        with urllib.request.urlopen(query, timeout=timeout) as resp:
            entries += json.loads(resp.read())
    return entries


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _client(url: str, token: str | None) -> Any:
    parts = urlsplit(url)
    return consul.aio.Consul(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (443 if parts.scheme == "https" else 8500),
        scheme=parts.scheme or "http",
        token=token,
    )


async def _agent_call(what: str, coro: Any, timeout: float) -> Any:
    try:
        return await within(coro, timeout)
    except consul.NotFound:
        raise
    except Exception as exc:  # TimeoutError, OSError, aiohttp and Consul errors
        raise RegistrationError(f"Consul agent: {what} failed: {exc!r}") from exc


class NodeHealth:
    """The node check on the node's own agent, passed by the session keeper.

    Created and used on the keeper's event loop (its own HTTP client), so it never waits
    behind the supervisor's other agent calls.
    """

    def __init__(
        self,
        url: str,
        *,
        node: str,
        token: str | None,
        ttl: float,
        request_timeout: float,
    ) -> None:
        self.url = url
        self.node = node
        self.token = token
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.check_id = NODE_CHECK
        self._consul: Any = None
        self.registered = False

    def _c(self) -> Any:
        if self._consul is None:
            self._consul = _client(self.url, self.token)
        return self._consul

    async def register(self, status: str = "critical") -> None:
        check = {"TTL": _duration(self.ttl), "Status": status}
        await _agent_call(
            f"register the node check {self.check_id}",
            self._c().agent.check.register(
                f"supervisor on {self.node} holds its DCS session",
                check=check,
                check_id=self.check_id,
                notes="passed by the node's session keeper after every renewal; every "
                "atServer on this Consul node turns critical with it",
            ),
            self.request_timeout,
        )
        self.registered = True

    async def passing(self, note: str) -> None:
        """The session is alive: pass the check (registering it if needed)."""
        if not self.registered:
            await self.register("passing")
        try:
            await _agent_call(
                "pass the node check",
                self._c().agent.check.ttl_pass(self.check_id, notes=note[:200]),
                self.request_timeout,
            )
        except (RegistrationError, consul.NotFound):
            self.registered = False  # the agent lost it (restart): register again next time
            raise

    async def failing(self, note: str) -> None:
        """Fail the check, registering it if needed (a registration keeps the status of a
        check the agent has already, e.g. restored passing after a restart: so it is failed
        explicitly)."""
        if not self.registered:
            await self.register("critical")
        await _agent_call(
            "fail the node check",
            self._c().agent.check.ttl_fail(self.check_id, notes=note[:200]),
            self.request_timeout,
        )

    async def close(self, deregister: bool = False) -> None:
        if self._consul is None:
            return
        if deregister:
            try:
                await _agent_call(
                    f"deregister the node check {self.check_id}",
                    self._c().agent.check.deregister(self.check_id),
                    self.request_timeout,
                )
            except (RegistrationError, consul.NotFound) as exc:
                log.info("event=node-check-deregister-failed error=%r", exc)
        await self._consul.close()
        self._consul = None


class Registrar:
    """Registers, checks and deregisters atServers on one Consul agent.

    ``probe_ttl``: TTL of each instance's at-protocol check; the check is refreshed when
    half of it has passed (or at once when the probe result changes).
    """

    def __init__(
        self,
        url: str,
        *,
        node: str,
        token: str | None = None,
        service_name: str = "atserver",
        shards: Sequence[int] = (DEFAULT_SHARDS,),
        probe_ttl: float = 15.0,
        deregister_critical_after: str = "1m",
        request_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = _client(url, token)
        self.url = url
        self.token = token
        self.node = node
        self.service_name = service_name
        self.shards = normalize_layouts(shards)
        self.services = set(followed_services(service_name, self.shards))
        """Every service of the configured layouts."""
        self.probe_ttl = probe_ttl
        self.deregister_critical_after = deregister_critical_after
        self.request_timeout = request_timeout
        self.clock = clock
        self.registered: dict[str, Instance] = {}
        """What this node registered (its belief; :meth:`refresh` re-reads the agent)."""
        self._probe_state: dict[str, tuple[bool, float]] = {}
        """atSign -> (last result sent to the agent, when)."""
        self.calls = 0
        """Agent calls made (exported as ``atfailover_consul_agent_requests``)."""
        self._turns = asyncio.Semaphore(AGENT_CONCURRENCY)

    def registrations(self, atsign: str) -> list[Registration]:
        """The atSign's instances, one per configured layout (``directory.shards``)."""
        return registrations(atsign, self.service_name, self.shards)

    def service_ids(self, atsign: str) -> list[str]:
        return [reg.service_id for reg in self.registrations(atsign)]

    @staticmethod
    def probe_check_id(service_id: str) -> str:
        return f"{service_id}:at-protocol"

    def _is_ours(self, service: str) -> bool:
        """True if ``service`` is of any layout of ``service_name`` (configured or not)."""
        return is_layout_service(self.service_name, service)

    async def _agent(self, what: str, coro: Any, timeout: float | None) -> Any:
        """One agent call, at most AGENT_CONCURRENCY at a time: a Consul 1.8 agent took about
        350 registrations a second here and reset connections beyond a few dozen concurrent
        ones, so a thousand starts queue here rather than there. The wait for a turn is
        bounded by AGENT_QUEUE_TIMEOUT, the call itself by its own deadline."""
        self.calls += 1
        budget = timeout or self.request_timeout
        try:
            async with asyncio.timeout(AGENT_QUEUE_TIMEOUT):
                await self._turns.acquire()
        except TimeoutError as exc:
            coro.close()
            raise RegistrationError(
                f"Consul agent: {what} failed: no turn within {AGENT_QUEUE_TIMEOUT:g}s "
                f"({AGENT_CONCURRENCY} calls at a time)"
            ) from exc
        try:
            async with asyncio.timeout(budget):
                return await coro
        except consul.NotFound:
            raise
        except Exception as exc:  # TimeoutError, OSError, aiohttp and Consul errors
            raise RegistrationError(f"Consul agent: {what} failed: {exc!r}") from exc
        finally:
            self._turns.release()

    async def _call(self, what: str, coro: Any, timeout: float | None = None) -> Any:
        try:
            return await self._agent(what, coro, timeout)
        except consul.NotFound as exc:
            raise RegistrationError(f"Consul agent: {what} failed: 404 {exc}") from exc

    async def register(self, inst: Instance, timeout: float | None = None) -> None:
        """Register (or update) the atSign's instance in every configured layout, at the
        same time; each probe check starts critical."""
        await asyncio.gather(
            *(self._register_one(reg, inst, timeout) for reg in self.registrations(inst.atsign))
        )
        self.registered[inst.atsign] = inst
        self._probe_state.pop(inst.atsign, None)

    async def _register_one(self, reg: Registration, inst: Instance, timeout: float | None) -> None:
        check = {
            "CheckID": self.probe_check_id(reg.service_id),
            "Name": f"{inst.atsign} at-protocol round trip",
            "Notes": "TLS connect, prompt, info:brief round trip; passed by the supervisor",
            "TTL": _duration(self.probe_ttl),
            "Status": "critical",
            "DeregisterCriticalServiceAfter": self.deregister_critical_after,
        }
        await self._call(
            f"register {reg.service_id}",
            self._client.agent.service.register(
                reg.service,
                service_id=reg.service_id,
                address=inst.address,
                port=inst.port,
                tags=[reg.tag, f"node-{inst.node}", f"cloud-{inst.cloud}"],
                meta={
                    "atsign": inst.atsign,
                    "node": inst.node,
                    "cloud": inst.cloud,
                    "fencing_token": str(inst.fencing_token),
                },
                check=check,
                replace_existing_checks=True,
            ),
            timeout,
        )

    async def deregister(self, atsign: str, timeout: float | None = None) -> bool:
        """Remove the atSign's instances (every configured layout) if *this node* registered
        them; True if any was removed.

        Reads only those services, in one filtered list (a read of one service that is not
        there answers 403, not 404, when Consul's ACLs are on: it cannot tell "absent" from
        "not allowed"): several nodes may share one agent (tests, small sites), so a
        registration that now names another node is left alone.
        """
        self.registered.pop(atsign, None)
        self._probe_state.pop(atsign, None)
        ids = self.service_ids(atsign)
        wanted = " or ".join(f"ID == {json.dumps(sid)}" for sid in ids)
        selector = f"({wanted}) and Meta.node == {json.dumps(self.node)}"
        found = await self._call(
            f"list {', '.join(ids)}",
            self._client.agent.services(filter_expr=selector),
            timeout or 2.0,
        )
        mine = sorted(found or {})
        await asyncio.gather(
            *(
                self._call(f"deregister {sid}", self._client.agent.service.deregister(sid), timeout)
                for sid in mine
            )
        )
        return bool(mine)

    async def deregister_all(self, atsigns: list[str], timeout: float | None = None) -> int:
        """Deregister many at once (shutdown), in parallel; returns how many were removed.

        Failures are logged, not raised: a shutdown goes on whatever the agent says.
        """
        sem = asyncio.Semaphore(DEREGISTER_CONCURRENCY)

        async def one(a: str) -> bool:
            async with sem:
                try:
                    return await self.deregister(a, timeout)
                except RegistrationError as exc:
                    log.warning("event=deregister-failed atsign=%s error=%s", a, exc)
                    return False

        return sum(await asyncio.gather(*(one(a) for a in atsigns)))

    def probe_update_due(self, atsign: str, healthy: bool) -> bool:
        """Whether the agent must hear this result: it changed, or half the TTL passed."""
        last = self._probe_state.get(atsign)
        return last is None or last[0] != healthy or self.clock() - last[1] >= self.probe_ttl / 2

    async def report_probe(self, atsign: str, healthy: bool, detail: str) -> bool:
        """Pass or fail the atSign's at-protocol check if due; True if the agent was told."""
        if not self.probe_update_due(atsign, healthy):
            return False
        await asyncio.gather(
            *(self._report_one(sid, healthy, detail) for sid in self.service_ids(atsign))
        )
        self._probe_state[atsign] = (healthy, self.clock())
        return True

    async def _report_one(self, sid: str, healthy: bool, detail: str) -> None:
        check = self.probe_check_id(sid)
        if healthy:
            coro = self._client.agent.check.ttl_pass(check, notes=detail[:200])
        else:
            coro = self._client.agent.check.ttl_fail(check, notes=detail[:200])
        await self._call(f"{'pass' if healthy else 'fail'} {check}", coro)

    async def refresh(self) -> dict[str, Instance]:
        """Re-read which atServers this node has registered on the agent (anti-entropy).

        An atSign counts as registered only if it is in every configured layout (a missing
        one is registered again by the caller); instances of this node in a layout no longer
        configured (after ``consul.shards`` changed) are deregistered here.
        """
        selector = f"Meta.node == {json.dumps(self.node)}"
        services = await self._call(
            "list services", self._client.agent.services(filter_expr=selector)
        )
        seen: dict[str, set[str]] = {}
        found: dict[str, Instance] = {}
        stale: list[str] = []
        for sid, svc in (services or {}).items():
            meta = svc.get("Meta") or {}
            name = str(svc.get("Service") or "")
            atsign = meta.get("atsign", "")
            if meta.get("node") != self.node or not atsign or not self._is_ours(name):
                continue
            if name not in self.services:
                stale.append(str(svc.get("ID") or sid))
                continue
            seen.setdefault(atsign, set()).add(name)
            found[atsign] = Instance(
                atsign=atsign,
                node=self.node,
                cloud=meta.get("cloud", ""),
                address=svc.get("Address", ""),
                port=int(svc.get("Port", 0)),
                fencing_token=int(meta.get("fencing_token", "0") or 0),
            )
        for atsign, names in seen.items():
            if names != {reg.service for reg in self.registrations(atsign)}:
                found.pop(atsign, None)  # a layout is missing: not registered (yet)
        await self._deregister_stale(stale)
        for gone in set(self._probe_state) - set(found):
            self._probe_state.pop(gone, None)
        self.registered = found
        return found

    async def _deregister_stale(self, sids: list[str]) -> None:
        for sid in sids:
            try:
                await self._call(f"deregister {sid}", self._client.agent.service.deregister(sid))
                log.info("event=deregistered-old-layout service_id=%s", sid)
            except RegistrationError as exc:
                log.warning("event=deregister-failed service_id=%s error=%s", sid, exc)

    def services_of(self, atsigns: Iterable[str] | None = None) -> list[str]:
        """The services holding ``atsigns`` in the configured layouts (all of them if None)."""
        if atsigns is None:
            return sorted(self.services)
        return services_of(self.service_name, atsigns, self.shards)

    async def health(
        self, passing_only: bool = False, atsigns: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """Every instance of the services of ``atsigns`` (every service of the configured
        layouts if None), with their checks: one query per service."""

        async def one(service: str) -> list[dict[str, Any]]:
            _index, entries = await self._call(
                f"health of service {service}",
                self._client.health.service(service, passing=passing_only),
            )
            return list(entries or [])

        lists = await asyncio.gather(*(one(s) for s in self.services_of(atsigns)))
        return [e for entries in lists for e in entries]

    async def passing_elsewhere(self, atsign: str) -> str | None:
        """The node of a passing instance of ``atsign`` on another node, or None.

        One atSign only (its tag, in its service of each layout), so its cost does not grow
        with the fleet.
        """
        for reg in self.registrations(atsign):
            _index, entries = await self._call(
                f"health of {atsign}",
                self._client.health.service(reg.service, tag=reg.tag, passing=True),
            )
            for e in entries or []:
                meta = (e.get("Service") or {}).get("Meta") or {}
                if meta.get("atsign") == atsign and meta.get("node") not in (None, "", self.node):
                    return str(meta["node"])
        return None

    async def close(self) -> None:
        await self._client.close()
