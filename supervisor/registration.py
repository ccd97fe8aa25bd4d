"""Consul registration of this node's running atServers (always the node's own agent).

Naming contract (the directory and operators' tools rely on it):
- service name ``atserver`` (configurable for tests), service ID
  ``atserver-alice`` (one per atSign), Address/Port where clients reach it;
- Meta ``atsign`` (``@alice``), ``node``, ``cloud``, ``fencing_token``
  (decimal string); tag ``alice`` so Consul DNS answers
  ``alice.atserver.service.consul``;
- two TTL checks: ``at-protocol`` is passed by the supervisor after its own
  at-protocol round trip (:meth:`Runner.probe`): Consul cannot speak the at
  protocol, script checks need ``enable_script_checks`` (a remote-execution
  risk) and a TCP check passes as soon as docker-proxy accepts, before the
  atServer listens. ``supervisor`` is passed while the node's session is
  alive, with a TTL equal to the renew deadline, so a frozen or dead
  supervisor's atServers turn critical by the time they are fenced;
- ``DeregisterCriticalServiceAfter`` removes what a dead node left behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import consul.aio

from supervisor.deadline import within

log = logging.getLogger(__name__)


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


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class Registrar:
    """Registers, checks and deregisters atServers on one Consul agent."""

    def __init__(
        self,
        url: str,
        *,
        node: str,
        token: str | None = None,
        service_name: str = "atserver",
        probe_ttl: float = 5.0,
        alive_ttl: float = 5.0,
        deregister_critical_after: str = "1m",
        request_timeout: float = 2.0,
    ) -> None:
        parts = urlsplit(url)
        self._client = consul.aio.Consul(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (443 if parts.scheme == "https" else 8500),
            scheme=parts.scheme or "http",
            token=token,
        )
        self.node = node
        self.service_name = service_name
        self.probe_ttl = probe_ttl
        self.alive_ttl = alive_ttl
        self.deregister_critical_after = deregister_critical_after
        self.request_timeout = request_timeout
        self.registered: dict[str, Instance] = {}
        """What this node registered (its belief; :meth:`refresh` re-reads the agent)."""

    def service_id(self, atsign: str) -> str:
        return f"{self.service_name}-{bare(atsign)}"

    def probe_check_id(self, atsign: str) -> str:
        return f"{self.service_id(atsign)}:at-protocol"

    def alive_check_id(self, atsign: str) -> str:
        return f"{self.service_id(atsign)}:supervisor"

    async def _call(self, what: str, coro: Any, timeout: float | None = None) -> Any:
        try:
            return await within(coro, timeout or self.request_timeout)
        except (TimeoutError, OSError, consul.ConsulException) as exc:
            raise RegistrationError(f"Consul agent: {what} failed: {exc!r}") from exc
        except Exception as exc:  # aiohttp errors and the like
            raise RegistrationError(f"Consul agent: {what} failed: {exc!r}") from exc

    async def register(self, inst: Instance, timeout: float | None = None) -> None:
        """Register (or update) the atSign's service; both checks start critical."""
        sid = self.service_id(inst.atsign)
        name = bare(inst.atsign)
        checks = [
            {
                "CheckID": self.probe_check_id(inst.atsign),
                "Name": f"{inst.atsign} at-protocol round trip",
                "Notes": "TLS connect, prompt, from:/info round trip; passed by the supervisor",
                "TTL": _duration(self.probe_ttl),
                "Status": "critical",
                "DeregisterCriticalServiceAfter": self.deregister_critical_after,
            },
            {
                "CheckID": self.alive_check_id(inst.atsign),
                "Name": f"supervisor on {inst.node} holds the claim of {inst.atsign}",
                "Notes": f"passed while node {inst.node}'s DCS session is alive "
                f"(token {inst.fencing_token})",
                "TTL": _duration(self.alive_ttl),
                "Status": "passing",
                "DeregisterCriticalServiceAfter": self.deregister_critical_after,
            },
        ]
        await self._call(
            f"register {sid}",
            self._client.agent.service.register(
                self.service_name,
                service_id=sid,
                address=inst.address,
                port=inst.port,
                tags=[name, f"node-{inst.node}", f"cloud-{inst.cloud}"],
                meta={
                    "atsign": inst.atsign,
                    "node": inst.node,
                    "cloud": inst.cloud,
                    "fencing_token": str(inst.fencing_token),
                },
                check=checks[0],
                extra_checks=checks[1:],
                replace_existing_checks=True,
            ),
            timeout,
        )
        self.registered[inst.atsign] = inst

    async def deregister(self, atsign: str, timeout: float | None = None) -> bool:
        """Remove the atSign's service if *this node* registered it; True if removed.

        Several nodes may share one agent (tests, small sites), so a registration
        that now names another node is left alone.
        """
        sid = self.service_id(atsign)
        self.registered.pop(atsign, None)
        services = await self._call("list services", self._client.agent.services(), timeout)
        svc = (services or {}).get(sid)
        if svc is None:
            return False
        if (svc.get("Meta") or {}).get("node") != self.node:
            return False
        await self._call(f"deregister {sid}", self._client.agent.service.deregister(sid), timeout)
        return True

    async def pass_probe(self, atsign: str, detail: str) -> None:
        await self._call(
            "pass at-protocol check",
            self._client.agent.check.ttl_pass(self.probe_check_id(atsign), notes=detail[:200]),
        )

    async def fail_probe(self, atsign: str, detail: str) -> None:
        await self._call(
            "fail at-protocol check",
            self._client.agent.check.ttl_fail(self.probe_check_id(atsign), notes=detail[:200]),
        )

    async def pass_alive(self, atsign: str) -> None:
        await self._call(
            "pass supervisor check",
            self._client.agent.check.ttl_pass(self.alive_check_id(atsign)),
        )

    async def refresh(self) -> dict[str, Instance]:
        """Re-read which atServers this node has registered on the agent."""
        services = await self._call("list services", self._client.agent.services())
        found: dict[str, Instance] = {}
        for svc in (services or {}).values():
            meta = svc.get("Meta") or {}
            if svc.get("Service") != self.service_name or meta.get("node") != self.node:
                continue
            atsign = meta.get("atsign", "")
            if not atsign:
                continue
            found[atsign] = Instance(
                atsign=atsign,
                node=self.node,
                cloud=meta.get("cloud", ""),
                address=svc.get("Address", ""),
                port=int(svc.get("Port", 0)),
                fencing_token=int(meta.get("fencing_token", "0") or 0),
            )
        self.registered = found
        return found

    async def health(self, passing_only: bool = False) -> list[dict[str, Any]]:
        """Every instance of the service in the catalog, with its checks."""
        _index, entries = await self._call(
            "health of service",
            self._client.health.service(self.service_name, passing=passing_only),
        )
        return list(entries or [])

    async def close(self) -> None:
        await self._client.close()
