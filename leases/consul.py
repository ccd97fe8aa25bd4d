"""Claims on Consul: one TTL session per node, one locked KV key per atSign, token = ModifyIndex.

Built on py-consul's asyncio client (``consul.aio``). Every call runs under
``asyncio.timeout``. Sessions are created with ``Behavior=delete`` and no health
checks, so a claim is exactly a key locked by a live session: when the session
is invalidated its keys are deleted.

- Session: ``PUT /v1/session/create`` with ``TTL``; renewals are
  ``/v1/session/renew``; a 404 there means the session is gone.
- Claim: one transaction ``check-not-exists(key)``, ``lock(key, session)``,
  ``get(key)``; the fencing token is the key's ``ModifyIndex`` after the lock.
- Release: one transaction ``check-index(key, token)``, ``check-session``, ``delete``
  (no lock-delay: only invalidation sets it).
- Generation (data guard): the claim transaction also checks the atSign's generation
  record (``check-index``, or ``check-not-exists``) and ``set``s the new one, so the
  record's ModifyIndex is the claim's token and no round trip is added.
- Node record: ``<prefix>/nodes/<node>`` acquired by the node's session (deleted with it).
- Watch: blocking queries on the claims prefix, diffed into PUT/DELETE; after
  an error or an index that went backwards (agent restarted) a RESYNC. It is
  level-triggered: changes that cancel out between two reads are not reported.

Consul semantics that shape the timing (see docs/leases.md): the TTL minimum
is 10 s, the servers may take up to 2*TTL to invalidate an unrenewed session,
and after an invalidation (expiry or destroy) ``lock_delay`` blocks new locks
on its keys. A node dying is therefore seen by others after at most
``2 * ttl + lock_delay``.

With ``session_check_ttl`` the session is also bound to health checks, which Consul
acts on at once: the agent's ``serfHealth`` (the node died or left the gossip) and a TTL
check of its own, ``atfailover-session-<node>`` on the agent, passed after every renewal
the servers confirmed (the renewal, a server round trip, stays the proof that the session
lives; a pass to a cut-off agent proves nothing). A dead node is then seen after the
gossip's failure detection (a few seconds), a dead supervisor after ``session_check_ttl``,
each plus ``lock_delay``. Because ``serfHealth`` may end the session at any moment, also
right after a renewal, only the lock-delay keeps a standby out until the owner has noticed
and stopped: ``renew_deadline + stop_budget < lock_delay`` (:func:`session_check_problems`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio

from leases.base import (
    Backend,
    Claim,
    ClaimEvent,
    ClaimEventKind,
    ClaimInfo,
    Clock,
    DCSUnavailable,
    Generation,
    GenerationStamp,
    LeaseError,
    SessionLost,
    Timing,
    TimingError,
    normalize_atsign,
)
from leases.keys import (
    KeyLayout,
    decode_generation,
    decode_info,
    decode_json,
    encode_info,
    encode_json,
    generation_value,
    stamp_value,
)
from leases.records import (
    RECORDS_TIMEOUT,
    AtSignRecord,
    RecordEvent,
    chunks,
    record_from_stored,
)
from leases.renewal import RenewingSession

log = logging.getLogger("leases.consul")

T = TypeVar("T")

MAX_LOCK_DELAY = 60.0
"""Consul caps a session's lock-delay at 60 s."""
MAX_TTL = 86400.0


SERF_HEALTH = "serfHealth"
"""The agent's gossip health check (critical when the node failed or left)."""
CRITICAL_CHECK_RETRIES = 5
CRITICAL_CHECK_PAUSE = 0.2
"""A session create that finds its check critical right after the pass is tried again
this many times, this many seconds apart (the agent's sync to the servers is async)."""
SERF_DETECTION = 5.0
"""Seconds Consul's LAN gossip takes to declare a dead agent failed (probe every 1 s, then
the suspicion timeout): what a node's death adds before ``lock_delay``, roughly."""


def session_check_id(node: str) -> str:
    """The agent TTL check a node's session is bound to (one per node on a shared agent)."""
    return f"atfailover-session-{node}"


def session_check_problems(timing: Timing, check_ttl: float, lock_delay: float) -> list[str]:
    """The rules a session bound to ``serfHealth`` and a ``check_ttl`` TTL check must keep.

    - ``check_ttl >= 2 * renew_interval``: one late renewal must not fail the check;
    - ``renew_deadline + stop_budget < lock_delay``: ``serfHealth`` can end the session at
      any moment, also just after a renewal; the owner stops acting by
      ``renew_deadline + stop_budget`` after its last renewal, and only the lock-delay keeps
      a standby from locking before that.
    """
    out = []
    if not (math.isfinite(check_ttl) and check_ttl > 0):
        return [f"session_check_ttl must be a positive number of seconds, got {check_ttl!r}"]
    if check_ttl < 2 * timing.renew_interval:
        out.append(
            f"session_check_ttl ({check_ttl:g}s) must be at least 2 x renew_interval "
            f"({2 * timing.renew_interval:g}s): one late renewal would fail the check"
        )
    needed = timing.renew_deadline + timing.stop_budget
    if not needed < lock_delay:
        out.append(
            f"lock_delay ({lock_delay:g}s) must be above renew_deadline + stop_budget "
            f"({needed:g}s) when the session is bound to serfHealth: Consul may end the "
            "session right after a renewal, and only the lock-delay keeps a standby out "
            "until the owner has stopped"
        )
    return out


def _duration(seconds: float) -> str:
    """A Go duration string Consul accepts: ``10s``, ``0.5s``."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds:g}s"


class ConsulBackend(Backend):
    """Claims under ``<prefix>/claims/`` in one Consul datacenter's KV store.

    ``url``: the agent's HTTP(S) address, e.g. ``http://127.0.0.1:8500``.
    ``token``: ACL token (needs ``session:write`` and ``key:write`` on the prefix);
    only this argument is used (``CONSUL_HTTP_TOKEN`` is ignored, so config wins).
    ``lock_delay``: seconds Consul blocks re-locking a key after its session was
    invalidated (Consul's default is 15 s; at most 60 s). It guards against an
    owner that has not noticed its loss yet, and adds to the failover time.
    ``verify``: verify the server certificate (default True); ``ca_cert`` a CA
    file to verify it with; ``cert_cert``/``cert_key`` a client certificate.
    ``watch_wait``: the blocking-query wait of :meth:`watch`.
    ``session_check_ttl``: bind sessions to ``serfHealth`` and a TTL check of this many
    seconds (see the module docstring); None: TTL only.
    """

    min_ttl = 10.0

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        token: str | None = None,
        request_timeout: float = 1.0,
        lock_delay: float = 15.0,
        verify: bool = True,
        ca_cert: str | Path | None = None,
        cert_cert: str | Path | None = None,
        cert_key: str | Path | None = None,
        watch_wait: float = 5.0,
        session_check_ttl: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Consul url {url!r}: expected http(s)://host:port")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 8500)
        except ValueError:
            raise ValueError(f"Consul url {url!r}: invalid port") from None
        if not request_timeout > 0:
            raise ValueError(f"Consul request_timeout must be positive, got {request_timeout!r}")
        if not (math.isfinite(lock_delay) and 0 <= lock_delay <= MAX_LOCK_DELAY):
            raise ValueError(
                f"Consul lock_delay must be between 0 and {MAX_LOCK_DELAY:g} seconds, "
                f"got {lock_delay!r}"
            )
        if session_check_ttl is not None and not (
            math.isfinite(session_check_ttl) and session_check_ttl >= 1
        ):
            raise ValueError(
                f"Consul session_check_ttl must be at least 1 s, got {session_check_ttl!r}"
            )
        if not watch_wait >= 1:
            raise ValueError(f"Consul watch_wait must be at least 1 s, got {watch_wait!r}")
        if (cert_cert is None) != (cert_key is None):
            raise ValueError("Consul client certificate: give both cert_cert and cert_key")
        for what, path in (("ca_cert", ca_cert), ("cert_cert", cert_cert), ("cert_key", cert_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"Consul {what}: {path} is not a readable file")
        self.url = f"{parts.scheme}://{parts.hostname}:{port}"
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port
        self.layout = KeyLayout(prefix)
        self.request_timeout = request_timeout
        self.lock_delay = lock_delay
        self.watch_wait = watch_wait
        self.session_check_ttl = session_check_ttl
        self.clock = clock
        self._token = token
        self._verify: bool | str = str(ca_cert) if ca_cert is not None else verify
        self._cert = (str(cert_cert), str(cert_key)) if cert_cert and cert_key else None
        self._client: Any = None
        self._closed = False
        self._read_access_checked: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"ConsulBackend(url={self.url!r}, prefix={self.layout.prefix!r}, "
            f"lock_delay={self.lock_delay:g}, session_check_ttl={self.session_check_ttl}, "
            f"token={'<set>' if self._token else None})"
        )

    # --- timing -------------------------------------------------------------------------

    def validate_timing(self, timing: Timing) -> None:
        super().validate_timing(timing)
        if timing.ttl > MAX_TTL:
            raise TimingError(f"ttl ({timing.ttl}s) is above Consul's maximum of {MAX_TTL:g}s")
        if self.session_check_ttl is not None:
            problems = session_check_problems(timing, self.session_check_ttl, self.lock_delay)
            if problems:
                raise TimingError("; ".join(problems))

    def failover_bound(self, timing: Timing) -> float:
        """Without checks: the servers may take 2 x ttl. With them: the check's TTL or the
        gossip's detection, whichever applies (the ttl still bounds it)."""
        if self.session_check_ttl is None:
            return 2 * timing.ttl + self.lock_delay
        detect = max(self.session_check_ttl, SERF_DETECTION)
        return min(2 * timing.ttl, detect) + self.lock_delay

    # --- plumbing -----------------------------------------------------------------------

    def _consul(self) -> Any:
        if self._closed:
            raise LeaseError("the Consul backend is closed")
        if self._client is None:
            # Created lazily: the aiohttp session belongs to the running event loop.
            self._client = consul.aio.Consul(
                host=self._host,
                port=self._port,
                scheme=self._scheme,
                token=self._token,
                verify=self._verify,
                cert=self._cert,
            )
            self._client.token = self._token  # py-consul lets CONSUL_HTTP_TOKEN win otherwise
        return self._client

    async def _call(
        self, what: str, op: Callable[[Any], Awaitable[T]], timeout: float | None = None
    ) -> T:
        """Run ``op(client)`` within the deadline; lets ``consul.NotFound`` through."""
        budget = self.request_timeout if timeout is None else timeout
        client = self._consul()
        try:
            async with asyncio.timeout(budget):
                return await op(client)
        except TimeoutError:
            raise DCSUnavailable(
                f"Consul {self.url}: {what} got no answer within {budget:.3g}s"
            ) from None
        except consul.NotFound:
            raise
        except consul.ACLPermissionDenied:
            raise DCSUnavailable(
                f"Consul {self.url} refused {what}: permission denied (check the ACL token)"
            ) from None
        except (aiohttp.ClientError, OSError, consul.ConsulException) as exc:
            raise DCSUnavailable(f"Consul {self.url}: {what} failed: {exc}") from None

    async def _txn(
        self, payload: list[dict[str, Any]], what: str, timeout: float | None = None
    ) -> tuple[int, Any]:
        """``PUT /v1/txn`` with the token (py-consul's ``txn.put`` sends none)."""

        async def put(c: Any) -> tuple[int, Any]:
            def parse(response: Any) -> tuple[int, Any]:
                try:
                    body = json.loads(response.body) if response.body else None
                except ValueError:
                    body = response.body
                return int(response.code), body

            return await c.http.put(
                parse, "/v1/txn", headers=c.prepare_headers(), data=json.dumps(payload)
            )

        code, body = await self._call(what, put, timeout)
        if code == 403:
            raise DCSUnavailable(
                f"Consul {self.url} refused {what}: permission denied (check the ACL token)"
            )
        if code not in (200, 409):
            raise DCSUnavailable(f"Consul {self.url}: {what} failed: HTTP {code}: {body}")
        return code, body

    def _claim_from_entry(self, entry: Mapping[str, Any]) -> Claim | None:
        atsign = self.layout.atsign_of(str(entry.get("Key", "")))
        session = entry.get("Session")
        if atsign is None or not session:
            return None  # a key no live session holds is not a claim
        value = entry.get("Value")
        if isinstance(value, str):  # transaction results carry base64 text
            value = base64.b64decode(value)
        return Claim(
            atsign=atsign,
            token=int(entry["ModifyIndex"]),
            session_id=str(session),
            info=decode_info(value),
        )

    async def _read_entries(
        self,
        index: int = 0,
        wait: float | None = None,
        prefix: str | None = None,
        what: str = "read of all claims",
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Every entry under ``prefix`` (default: the claims), as a blocking query when
        ``index`` and ``wait`` are given."""
        key = self.layout.claims_dir if prefix is None else prefix
        if wait is not None:
            timeout = wait + wait / 16 + self.request_timeout  # Consul adds up to wait/16 jitter

        async def get(c: Any) -> tuple[Any, Any]:
            return await c.kv.get(
                key,
                recurse=True,
                index=index or None,
                wait=_duration(wait) if wait is not None else None,
            )

        idx, entries = await self._call(what, get, timeout)
        if not entries and key not in self._read_access_checked:
            await self._check_read_access(key)
        return int(idx), entries or []

    async def _check_read_access(self, key: str) -> None:
        """Raise DCSUnavailable if the token may not read ``key`` (a prefix).

        Consul filters a recursive read by the ACLs: a token without ``key:read``
        on the prefix reads as *nothing there*, not as an error. A plain read
        of one key under the prefix is refused with 403 instead, so it tells.
        """

        async def get(c: Any) -> Any:
            return await c.kv.get(key)

        await self._call(f"read of {key} (ACL check)", get)
        self._read_access_checked.add(key)

    def _snapshot(self, entries: list[Mapping[str, Any]]) -> dict[str, Claim]:
        claims: dict[str, Claim] = {}
        for entry in entries:
            claim = self._claim_from_entry(entry)
            if claim is not None:
                claims[claim.atsign] = claim
        return claims

    # --- Backend ------------------------------------------------------------------------

    async def open_session(self, node: str, timing: Timing) -> ConsulSession:
        self.validate_timing(timing)
        if not node:
            raise ValueError("node name must not be empty")
        sent = self.clock()
        checks: list[str] = []  # TTL only: no tie to the health of the agent we talk to
        if self.session_check_ttl is not None:
            await self._register_session_check(node, timing)
            # Re-registering a TTL check that expired leaves it critical (the agent keeps the
            # check's state; a crashed supervisor's check stays behind), and Consul refuses
            # to bind a critical check: pass it explicitly.
            await self._pass_session_check(node, timing.request_timeout)
            checks = [SERF_HEALTH, session_check_id(node)]
        body = {
            "Name": f"atfailover {node}",
            "TTL": _duration(timing.ttl),
            "LockDelay": _duration(self.lock_delay),
            "Behavior": "delete",
            "Checks": checks,
        }

        async def create(c: Any) -> Any:
            def parse(response: Any) -> Any:
                consul.callback.CB._status(response)
                return json.loads(response.body)["ID"]

            return await c.http.put(
                parse, "/v1/session/create", headers=c.prepare_headers(), data=json.dumps(body)
            )

        session_id = await self._create_session(create, timing.request_timeout, bool(checks))
        session = ConsulSession(
            self, node, timing, session_id=str(session_id), granted_sent_at=sent
        )
        session.start()
        log.info(
            "event=session_opened backend=consul node=%s session=%s ttl=%s lock_delay=%s checks=%s",
            node,
            session_id,
            timing.ttl,
            self.lock_delay,
            ",".join(checks) or "-",
        )
        return session

    async def _create_session(
        self, create: Callable[[Any], Awaitable[Any]], timeout: float, with_checks: bool
    ) -> Any:
        """``session create``; with checks, retried a few times while the servers still see
        the just-passed check as critical (the agent syncs it to them asynchronously)."""
        for _ in range(CRITICAL_CHECK_RETRIES - 1 if with_checks else 0):
            try:
                return await self._call("session create", create, timeout)
            except DCSUnavailable as exc:
                if "in critical state" not in str(exc):
                    raise
            await asyncio.sleep(CRITICAL_CHECK_PAUSE)
        return await self._call("session create", create, timeout)

    async def revoke_session(self, session_id: str, timeout: float) -> None:
        if not session_id or any(c not in "0123456789abcdef-" for c in session_id.lower()):
            raise ValueError(f"{session_id!r} is not a Consul session id")
        await self._call(
            "session destroy", lambda c: c.session.destroy(session_id), timeout
        )  # Consul answers true for an unknown id too

    async def _register_session_check(self, node: str, timing: Timing) -> None:
        """(Re)register the node's session check on the agent, passing, so that a session
        can be bound to it (Consul refuses to bind a critical check)."""
        assert self.session_check_ttl is not None
        check = {
            "ID": session_check_id(node),
            "Name": f"atfailover session of {node}",
            "Notes": "passed after every renewal the Consul servers confirmed; critical: the "
            "node's session (and its claims) end",
            "TTL": _duration(self.session_check_ttl),
            "Status": "passing",
        }

        async def register(c: Any) -> Any:
            def parse(response: Any) -> Any:
                consul.callback.CB._status(response)
                return True

            return await c.http.put(
                parse,
                "/v1/agent/check/register",
                headers=c.prepare_headers(),
                data=json.dumps(check),
            )

        await self._call(f"register the session check of {node}", register, timing.request_timeout)

    async def _pass_session_check(self, node: str, timeout: float) -> None:
        check_id = session_check_id(node)
        await self._call(
            f"pass the session check of {node}",
            lambda c: c.agent.check.ttl_pass(check_id),
            timeout,
        )

    async def _deregister_session_check(self, node: str, timeout: float) -> None:
        check_id = session_check_id(node)
        await self._call(
            f"deregister the session check of {node}",
            lambda c: c.agent.check.deregister(check_id),
            timeout,
        )

    async def resume_session(
        self, node: str, timing: Timing, session_id: str
    ) -> ConsulSession | None:
        self.validate_timing(timing)
        if not node:
            raise ValueError("node name must not be empty")
        if not session_id or any(c not in "0123456789abcdef-" for c in session_id.lower()):
            return None
        sent = self.clock()
        session = ConsulSession(self, node, timing, session_id=session_id, granted_sent_at=sent)
        info = await session._renew_info(timing.request_timeout)
        if info is None:
            return None
        ttl = str(info.get("TTL", ""))
        if ttl and ttl != _duration(timing.ttl):
            log.warning(
                "event=resume_refused backend=consul session=%s ttl=%s expected=%s",
                session_id,
                ttl,
                _duration(timing.ttl),
            )
            return None
        session.start()
        log.info("event=session_resumed backend=consul node=%s session=%s", node, session_id)
        return session

    async def owner(self, atsign: str) -> Claim | None:
        key = self.layout.claim_key(atsign)

        async def get(c: Any) -> Any:
            return await c.kv.get(key)

        _, entry = await self._call(f"read of {atsign}", get)
        return self._claim_from_entry(entry) if entry else None

    async def owners(self) -> dict[str, Claim]:
        _, entries = await self._read_entries()
        return self._snapshot(entries)

    async def _read_prefix(self, what: str, prefix: str) -> list[Mapping[str, Any]]:
        async def get(c: Any) -> Any:
            return await c.kv.get(prefix, recurse=True)

        _, entries = await self._call(what, get)
        return list(entries or [])

    def _generation_from_entry(self, entry: Mapping[str, Any]) -> Generation | None:
        key = str(entry.get("Key", ""))
        atsign = self.layout.atsign_of(key, self.layout.generations_dir)
        if atsign is None:
            return None
        value = entry.get("Value")
        if isinstance(value, str):  # transaction results carry base64 text
            value = base64.b64decode(value)
        return decode_generation(atsign, int(entry["ModifyIndex"]), value)

    async def generation(self, atsign: str) -> Generation | None:
        key = self.layout.generation_key(atsign)

        async def get(c: Any) -> Any:
            return await c.kv.get(key)

        _, entry = await self._call(f"read of {atsign}'s generation", get)
        return self._generation_from_entry(entry) if entry else None

    async def generations(self) -> dict[str, Generation]:
        out: dict[str, Generation] = {}
        for entry in await self._read_prefix(
            "read of all generations", self.layout.generations_dir
        ):
            g = self._generation_from_entry(entry)
            if g is not None:
                out[g.atsign] = g
        return out

    async def accept_generation(
        self, atsign: str, expected: int, node: str, dir_id: str, prev: int
    ) -> Generation | None:
        atsign = normalize_atsign(atsign)
        gen_key = self.layout.generation_key(atsign)
        value = base64.b64encode(
            generation_value(node, "", dir_id, prev, accepted_by=node)
        ).decode()
        payload = [
            {"KV": {"Verb": "check-not-exists", "Key": self.layout.claim_key(atsign)}},
            _generation_check(gen_key, expected),
            {"KV": {"Verb": "set", "Key": gen_key, "Value": value}},
            {"KV": {"Verb": "get", "Key": gen_key}},
        ]
        code, body = await self._txn(payload, f"accept of {atsign}'s generation")
        if code != 200:
            return None
        # The last result is the ``get`` (the check and the set return entries too).
        for r in reversed((body or {}).get("Results") or []):
            kv = r.get("KV") or {}
            if kv.get("Key") == gen_key and kv.get("Value"):
                return self._generation_from_entry(kv)
        return await self.generation(atsign)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for entry in await self._read_prefix("read of the node records", self.layout.nodes_dir):
            name = str(entry.get("Key", ""))[len(self.layout.nodes_dir) :]
            if name and entry.get("Session"):
                out[name] = decode_json(entry.get("Value"))
        return out

    async def watch(self) -> AsyncIterator[ClaimEvent]:
        previous: dict[str, Claim] = {}
        async for idx, entries, resync in self._blocking_reads(self.layout.claims_dir, "claims"):
            current = self._snapshot(entries)
            if resync:
                yield ClaimEvent(ClaimEventKind.RESYNC, snapshot=dict(current), revision=idx)
            else:
                for atsign in sorted(previous.keys() - current.keys()):
                    yield ClaimEvent(ClaimEventKind.DELETE, atsign=atsign, revision=idx)
                for atsign, claim in sorted(current.items()):
                    if previous.get(atsign) != claim:
                        yield ClaimEvent(
                            ClaimEventKind.PUT, atsign=atsign, claim=claim, revision=claim.token
                        )
            previous = current

    async def _blocking_reads(
        self, prefix: str, what: str
    ) -> AsyncIterator[tuple[int, list[Mapping[str, Any]], bool]]:
        """(index, every entry under ``prefix``, resync) after each change, forever, by
        blocking queries; ``resync`` is True for the first read, after an outage, and when
        the index went backwards (the agent lost its state): what happened in between is
        unknown then."""
        index = 0
        resync = True
        failures = 0
        while not self._closed:
            try:
                idx, entries = await self._read_entries(
                    index, self.watch_wait if index else None, prefix, f"read of all {what}"
                )
            except DCSUnavailable as exc:
                failures += 1
                resync = True
                log.warning("event=watch_interrupted backend=consul what=%s error=%r", what, exc)
                await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
                continue
            failures = 0
            yield idx, entries, resync or idx < index
            resync = False
            index = max(idx, 1)

    # --- atSign records ------------------------------------------------------------------

    def _records(
        self, entries: list[Mapping[str, Any]]
    ) -> tuple[dict[str, AtSignRecord], dict[str, int], dict[str, str]]:
        """(records, their ModifyIndex, problems) of the entries under the records prefix."""
        records: dict[str, AtSignRecord] = {}
        indexes: dict[str, int] = {}
        problems: dict[str, str] = {}
        base = self.layout.atsigns_dir
        for entry in entries:
            name = str(entry.get("Key", ""))[len(base) :]
            if not name:
                continue
            record, problem = record_from_stored(name, entry.get("Value"))
            if record is None:
                problems[name] = problem
                continue
            records[record.atsign] = record
            indexes[record.atsign] = int(entry.get("ModifyIndex", 0))
        return records, indexes, problems

    async def atsign_records(self) -> tuple[dict[str, AtSignRecord], dict[str, str]]:
        _, entries = await self._read_entries(
            prefix=self.layout.atsigns_dir,
            what="read of the atSign records",
            timeout=max(self.request_timeout, RECORDS_TIMEOUT),
        )
        records, _, problems = self._records(entries)
        return records, problems

    async def atsign_record(self, atsign: str) -> AtSignRecord | None:
        key = self.layout.atsign_record_key(atsign)

        async def get(c: Any) -> Any:
            return await c.kv.get(key)

        _, entry = await self._call(
            f"read of {atsign}'s record", get, max(self.request_timeout, RECORDS_TIMEOUT)
        )
        return record_from_stored(atsign, entry.get("Value"))[0] if entry else None

    async def write_atsign_records(
        self, put: Sequence[AtSignRecord], delete: Sequence[str] = ()
    ) -> None:
        ops: list[dict[str, Any]] = [
            {
                "KV": {
                    "Verb": "set",
                    "Key": self.layout.atsign_record_key(r.atsign),
                    "Value": base64.b64encode(r.encode()).decode(),
                }
            }
            for r in put
        ] + [{"KV": {"Verb": "delete", "Key": self.layout.atsign_record_key(a)}} for a in delete]
        for part in chunks(ops):
            if not part:
                continue
            code, body = await self._txn(
                list(part),
                f"write of {len(part)} atSign record(s)",
                max(self.request_timeout, RECORDS_TIMEOUT),
            )
            if code != 200:
                errors = (body or {}).get("Errors") if isinstance(body, dict) else None
                what = "; ".join(str(e.get("What", e)) for e in errors or []) or str(body)
                if "permission denied" in what.lower():
                    what = "permission denied (the token may not write the atSign records)"
                raise DCSUnavailable(f"Consul {self.url} refused the atSign records: {what}")

    async def watch_atsign_records(self) -> AsyncIterator[RecordEvent]:
        previous: dict[str, int] = {}
        seen_problems: set[str] = set()
        async for idx, entries, resync in self._blocking_reads(
            self.layout.atsigns_dir, "atSign records"
        ):
            records, indexes, problems = self._records(entries)
            for name in problems.keys() - seen_problems:
                log.warning("event=atsign_record_invalid key=%s problem=%r", name, problems[name])
            seen_problems = set(problems)
            if resync:
                yield RecordEvent(ClaimEventKind.RESYNC, snapshot=records, revision=idx)
            else:
                for atsign in sorted(previous.keys() - indexes.keys()):
                    yield RecordEvent(ClaimEventKind.DELETE, atsign=atsign, revision=idx)
                for atsign, modify in sorted(indexes.items()):
                    if previous.get(atsign) != modify:
                        yield RecordEvent(
                            ClaimEventKind.PUT,
                            atsign=atsign,
                            record=records[atsign],
                            revision=modify,
                        )
            previous = indexes

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


class ConsulSession(RenewingSession):
    """A node session backed by one Consul session (TTL, behavior=delete)."""

    def __init__(
        self,
        backend: ConsulBackend,
        node: str,
        timing: Timing,
        *,
        session_id: str,
        granted_sent_at: float,
    ) -> None:
        self._backend = backend
        self._session_id = session_id
        super().__init__(node, timing, clock=backend.clock, granted_sent_at=granted_sent_at)

    def __repr__(self) -> str:
        return f"ConsulSession(node={self.node!r}, id={self._session_id}, state={self.state.value})"

    @property
    def session_id(self) -> str:
        return self._session_id

    async def _renew_once(self, timeout: float) -> bool:
        return await self._renew_info(timeout) is not None

    async def _renew_info(self, timeout: float) -> Mapping[str, Any] | None:
        """One renewal; the session as Consul describes it, or None when it is gone.

        With session checks, the renewal counts only once the session check is passed
        too (after the servers confirmed the renewal): the check's TTL then runs from a
        moment after the renewal was sent, which the deadline arithmetic assumes.
        """
        sid = self._session_id
        started = self._backend.clock()
        try:
            info = await self._backend._call(
                "session renew", lambda c: c.session.renew(sid), timeout
            )
        except consul.NotFound:
            return None
        if self._backend.session_check_ttl is not None:
            left = max(0.05, timeout - (self._backend.clock() - started))
            try:
                await self._backend._pass_session_check(self.node, left)
            except consul.NotFound:
                return None  # the agent lost the check: Consul ends the session with it
        return info if isinstance(info, Mapping) else {}

    async def _revoke(self, timeout: float) -> None:
        await self._backend.revoke_session(self._session_id, timeout)
        if self._backend.session_check_ttl is not None:
            # Revoked: the check has nothing left to guard. Left behind, it would turn
            # critical and, as a node check, every service on the agent's node with it.
            with contextlib.suppress(LeaseError, consul.NotFound):
                await self._backend._deregister_session_check(self.node, timeout)

    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        atsign = normalize_atsign(atsign)
        self.ensure_usable()
        b = self._backend
        key = b.layout.claim_key(atsign)
        value = base64.b64encode(encode_info(info)).decode()
        payload: list[dict[str, Any]] = [{"KV": {"Verb": "check-not-exists", "Key": key}}]
        if generation is not None:
            payload.append(_generation_check(b.layout.generation_key(atsign), generation.expected))
        payload.append(
            {"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": self._session_id}}
        )
        if generation is not None:
            gen_value = stamp_value(generation, info, self.session_id)
            payload.append(
                {
                    "KV": {
                        "Verb": "set",
                        "Key": b.layout.generation_key(atsign),
                        "Value": base64.b64encode(gen_value).decode(),
                    }
                }
            )
        payload.append({"KV": {"Verb": "get", "Key": key}})
        code, body = await b._txn(payload, f"claim of {atsign}")
        claim: Claim | None = None
        if code == 200:
            results = (body or {}).get("Results") or []
            entries = [r["KV"] for r in results if r.get("KV") and r["KV"].get("Key") == key]
            if not entries:
                raise DCSUnavailable(f"Consul claim of {atsign}: transaction returned no entry")
            entry = max(entries, key=lambda e: int(e.get("ModifyIndex", 0)))
            if entry.get("Session") != self._session_id:
                raise DCSUnavailable(f"Consul claim of {atsign}: lock not confirmed")
            claim = Claim(atsign, int(entry["ModifyIndex"]), self._session_id, info)
        else:
            errors = "; ".join(str(e.get("What", "")) for e in (body or {}).get("Errors") or [])
            if "invalid session" in errors.lower():
                self.tracker.mark_lost(f"Consul no longer knows session {self._session_id}")
                self._declare_lost(self.lost_reason or "lost")
                raise SessionLost(f"session {self._session_id} of {self.node}: {errors}")
            # Lost the race (key exists) or lock-delay in effect; a retried transaction
            # whose first attempt applied finds its own lock: still ours.
            current = await b.owner(atsign)
            if current is not None and current.session_id == self._session_id:
                claim = current
            else:
                log.debug("event=claim_refused atsign=%s node=%s why=%r", atsign, self.node, errors)
        if claim is not None:
            self.ensure_usable()
            log.info(
                "event=claimed backend=consul atsign=%s node=%s token=%s",
                atsign,
                self.node,
                claim.token,
            )
        return claim

    async def release(self, claim: Claim) -> bool:
        if claim.session_id != self._session_id:
            return False
        b = self._backend
        key = b.layout.claim_key(claim.atsign)
        # Not ``DELETE ?cas=``: Consul answers true for a CAS delete of a missing key.
        # ``check-index`` fails unless the key exists with exactly this ModifyIndex
        # (any later lock or write changes it), so a stale claim deletes nothing.
        payload: list[dict[str, Any]] = [
            {"KV": {"Verb": "check-index", "Key": key, "Index": claim.token}},
            {"KV": {"Verb": "check-session", "Key": key, "Session": self._session_id}},
            {"KV": {"Verb": "delete", "Key": key}},
        ]
        code, _ = await b._txn(payload, f"release of {claim.atsign}")
        deleted = code == 200
        if deleted:
            log.info(
                "event=released backend=consul atsign=%s node=%s token=%s",
                claim.atsign,
                self.node,
                claim.token,
            )
        return bool(deleted)

    async def publish_node(self, record: Mapping[str, Any]) -> None:
        self.ensure_usable()
        b = self._backend
        key = b.layout.node_key(self.node)
        value = encode_json(dict(record))
        sid = self._session_id

        async def put(c: Any) -> Any:
            return await c.kv.put(key, value, acquire=sid)

        if not await b._call(f"node record of {self.node}", put):
            raise DCSUnavailable(f"Consul refused the node record of {self.node} (session {sid})")


def _generation_check(key: str, expected: int) -> dict[str, Any]:
    """The record is still the one the caller checked (``expected``; 0: absent)."""
    if expected <= 0:
        return {"KV": {"Verb": "check-not-exists", "Key": key}}
    return {"KV": {"Verb": "check-index", "Key": key, "Index": expected}}


__all__ = ["ConsulBackend", "ConsulSession"]
