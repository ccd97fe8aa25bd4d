"""Claims on etcd v3: one lease per node session, one key per atSign, token = mod_revision.

We use aetcd's generated gRPC stubs and messages (``aetcd.rpc``) on channels we
build ourselves, because ``aetcd.Client`` only opens plaintext channels to one
endpoint, runs no keepalives and does not re-create watches. Every call here
has a deadline; a member that fails or does not answer in time is left for
the next one (several endpoints = one cluster).

- Session: ``LeaseGrant(ttl)``; renewals are ``LeaseKeepAlive`` round trips; an
  answer with ``TTL == 0`` means the lease is gone.
- Claim: ``Txn(create_revision(key) == 0 → put(key, info, lease) | range(key))``;
  the fencing token is the key's ``mod_revision`` (the txn's header revision).
- Release: ``Txn(mod_revision(key) == token → delete(key))``.
- Generation (data guard): the claim txn also compares the atSign's generation record
  (``mod_revision == expected``, or absent) and puts the new one, without a lease, in the
  same txn; so the record's mod_revision is the claim's token and no round trip is added.
- Node record: ``put(<prefix>/nodes/<node>, lease)``.
- Watch: one Watch stream per iterator, resumed from the last seen revision on
  another member after a failure; a compacted gap yields a RESYNC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]  # no stubs; see docs/leases.md
from aetcd import rpc

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
    Session,
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

log = logging.getLogger("leases.etcd")

T = TypeVar("T")
E = TypeVar("E")
Metadata = tuple[tuple[str, str], ...]

# Transport trouble: try the next member. Anything else is an answer.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}

RANGE_PAGE = 5000
"""Keys per page of a prefix read (a claim is about 300 bytes: 1.5 MB a page)."""
MAX_RANGE_PAGES = 10_000

_CHANNEL_OPTIONS = [
    # Reconnect to a restarted member within about a second, not after minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # etcd's default --grpc-keepalive-min-time is 5 s; ping less often than that.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
]


def parse_endpoint(endpoint: str) -> tuple[str, bool | None]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` → (``host:port``, tls)."""
    text = endpoint.strip()
    tls: bool | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
        tls = scheme == "https"
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port (e.g. 127.0.0.1:2379)")
    return f"{host}:{port}", tls


def _read_file(what: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"etcd {what}: cannot read {path}: {exc.strerror}") from None


@dataclass
class _Member:
    """One endpoint with its lazily opened channel, stubs and auth token."""

    address: str
    channel: grpc.aio.Channel | None = None
    kv: Any = None
    lease: Any = None
    watch: Any = None
    auth: Any = None
    token: str | None = field(default=None, repr=False)


class EtcdBackend(Backend):
    """Claims under ``<prefix>/claims/`` on an etcd v3 cluster.

    ``endpoints``: ``host:port`` of every member (``http://``/``https://`` accepted).
    TLS is used when an endpoint says ``https://`` or ``ca_cert`` is given;
    ``cert_cert``/``cert_key`` add a client certificate. ``username``/``password``
    use etcd's auth (a token is fetched per member and renewed when refused).
    Secrets are read once and never logged or shown in ``repr``.
    """

    min_ttl = 2.0

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str,
        *,
        request_timeout: float = 1.0,
        ca_cert: str | Path | None = None,
        cert_key: str | Path | None = None,
        cert_cert: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("etcd endpoints: at least one host:port is required")
        parsed = [parse_endpoint(e) for e in endpoints]
        schemes = {tls for _, tls in parsed if tls is not None}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints: mix of http:// and https:// endpoints")
        if not request_timeout > 0:
            raise ValueError(f"etcd request_timeout must be positive, got {request_timeout!r}")
        if (username is None) != (password is None):
            raise ValueError("etcd auth: give both username and password, or neither")
        if (cert_key is None) != (cert_cert is None):
            raise ValueError("etcd client certificate: give both cert_cert and cert_key")
        self.layout = KeyLayout(prefix)
        self.request_timeout = request_timeout
        self.clock = clock
        self._tls = bool(schemes == {True} or ca_cert is not None or cert_cert is not None)
        self._credentials: grpc.ChannelCredentials | None = None
        if self._tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_file("ca_cert", ca_cert),
                private_key=_read_file("cert_key", cert_key),
                certificate_chain=_read_file("cert_cert", cert_cert),
            )
        self._username = username
        self._password = password
        self._members = [_Member(address) for address, _ in parsed]
        self._current = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"EtcdBackend(endpoints={[m.address for m in self._members]!r}, "
            f"prefix={self.layout.prefix!r}, tls={self._tls}, "
            f"auth={'yes' if self._username else 'no'})"
        )

    @property
    def endpoints(self) -> list[str]:
        return [m.address for m in self._members]

    @property
    def current_endpoint(self) -> str:
        """The member the next call goes to first (it moves on when a member fails)."""
        return self._members[self._current].address

    # --- timing -------------------------------------------------------------------------

    def validate_timing(self, timing: Timing) -> None:
        super().validate_timing(timing)
        if timing.ttl != int(timing.ttl):
            raise TimingError(f"ttl ({timing.ttl}s): etcd lease TTLs are whole seconds")

    def failover_bound(self, timing: Timing) -> float:
        # The leader's lessor sweeps expired leases every 500 ms.
        return timing.ttl + 0.5

    # --- plumbing -----------------------------------------------------------------------

    def _open(self, member: _Member) -> _Member:
        if member.channel is None:
            if self._credentials is not None:
                member.channel = grpc.aio.secure_channel(
                    member.address, self._credentials, options=_CHANNEL_OPTIONS
                )
            else:
                member.channel = grpc.aio.insecure_channel(member.address, options=_CHANNEL_OPTIONS)
            member.kv = rpc.KVStub(member.channel)
            member.lease = rpc.LeaseStub(member.channel)
            member.watch = rpc.WatchStub(member.channel)
            member.auth = rpc.AuthStub(member.channel)
        return member

    async def _metadata(self, member: _Member, timeout: float) -> Metadata:
        if self._username is None:
            return ()
        if member.token is None:
            resp = await member.auth.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=timeout,
            )
            member.token = resp.token
        return (("token", member.token or ""),)

    def _rotate_from(self, index: int) -> None:
        if self._current == index:
            self._current = (index + 1) % len(self._members)

    async def _call(
        self,
        what: str,
        op: Callable[[_Member, float, Metadata], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """Run ``op`` on the current member, moving on to the next ones until the deadline.

        Raises DCSUnavailable naming every member tried; lets NOT_FOUND and
        FAILED_PRECONDITION through as ``grpc.aio.AioRpcError`` (they are answers).
        """
        if self._closed:
            raise LeaseError("the etcd backend is closed")
        loop = asyncio.get_running_loop()
        budget = self.request_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        errors: list[str] = []
        reauthed = False
        attempts = 2 * len(self._members)
        for attempt in range(attempts):
            index = self._current
            member = self._open(self._members[index])
            remaining = deadline - loop.time()
            if remaining <= 0.005:
                break
            # With several members the first try gets half the budget: a dead or frozen
            # member (TCP open, no answer) must leave time to ask another one in this call.
            share = remaining / 2 if attempt == 0 and len(self._members) > 1 else remaining
            try:
                async with asyncio.timeout(share):
                    metadata = await self._metadata(member, share)
                    return await op(member, share, metadata)
            except TimeoutError:
                errors.append(f"{member.address}: no answer within {share:.3g}s")
                self._rotate_from(index)
                continue
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and self._username and not reauthed:
                    member.token = None  # expired or revoked token: fetch a new one once
                    reauthed = True
                    continue
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                errors.append(f"{member.address}: {code.name}: {exc.details()}")
                if code not in _RETRYABLE:
                    raise DCSUnavailable(
                        f"etcd refused {what}: {code.name}: {exc.details()}"
                    ) from None
                self._rotate_from(index)
            if (attempt + 1) % len(self._members) == 0:
                # Every member failed fast: pause briefly before the next round.
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        raise DCSUnavailable(
            f"etcd {what} failed within {budget:.3g}s: "
            + "; ".join(dict.fromkeys(errors or ["no time left"]))
        )

    def _claim_from_kv(self, kv: Any) -> Claim | None:
        atsign = self.layout.atsign_of(kv.key.decode(errors="replace"))
        if atsign is None:
            return None
        return Claim(
            atsign=atsign,
            token=int(kv.mod_revision),
            session_id=f"{kv.lease:x}",
            info=decode_info(kv.value),
        )

    # --- Backend ------------------------------------------------------------------------

    async def open_session(self, node: str, timing: Timing) -> EtcdSession:
        self.validate_timing(timing)
        if not node:
            raise ValueError("node name must not be empty")
        sent = self.clock()

        async def grant(m: _Member, t: float, md: Metadata) -> Any:
            return await m.lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=int(timing.ttl)), timeout=t, metadata=md
            )

        resp = await self._call("lease grant", grant, timing.request_timeout)
        if resp.error:
            raise DCSUnavailable(f"etcd refused the lease grant: {resp.error}")
        session = EtcdSession(self, node, timing, lease_id=int(resp.ID), granted_sent_at=sent)
        session.start()
        log.info(
            "event=session_opened backend=etcd node=%s lease=%s ttl=%s",
            node,
            session.session_id,
            resp.TTL,
        )
        return session

    async def resume_session(
        self, node: str, timing: Timing, session_id: str
    ) -> EtcdSession | None:
        self.validate_timing(timing)
        if not node:
            raise ValueError("node name must not be empty")
        try:
            lease_id = int(session_id, 16)
        except ValueError:
            return None
        sent = self.clock()
        session = EtcdSession(self, node, timing, lease_id=lease_id, granted_sent_at=sent)
        ttl = await session._keepalive(timing.request_timeout)
        if ttl <= 0:
            return None
        if ttl != int(timing.ttl):
            log.warning(
                "event=resume_refused backend=etcd lease=%s ttl=%s expected=%s",
                session.session_id,
                ttl,
                int(timing.ttl),
            )
            return None
        session.start()
        log.info("event=session_resumed backend=etcd node=%s lease=%s", node, session.session_id)
        return session

    async def revoke_session(self, session_id: str, timeout: float) -> None:
        try:
            lease_id = int(session_id, 16)
        except ValueError:
            raise ValueError(f"{session_id!r} is not an etcd lease id") from None
        await self._revoke_lease(lease_id, timeout)

    async def _revoke_lease(self, lease_id: int, timeout: float) -> None:
        async def revoke(m: _Member, t: float, md: Metadata) -> Any:
            return await m.lease.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout=t, metadata=md
            )

        try:
            await self._call("lease revoke", revoke, timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # already expired: nothing to do
                raise DCSUnavailable(f"etcd lease revoke: {exc.details()}") from None

    async def owner(self, atsign: str) -> Claim | None:
        key = self.layout.claim_key(atsign).encode()

        async def get(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Range(rpc.RangeRequest(key=key), timeout=t, metadata=md)

        resp = await self._call(f"read of {atsign}", get)
        return self._claim_from_kv(resp.kvs[0]) if resp.kvs else None

    async def _range_pages(
        self, what: str, prefix: str, timeout: float | None = None
    ) -> tuple[list[Any], int]:
        """Every key under ``prefix`` at one revision, read in pages of RANGE_PAGE keys
        (one answer for 100,000 claims would exceed gRPC's 4 MB message limit)."""
        start = prefix.encode()
        end = _prefix_end(start)
        key = start
        revision = 0
        kvs: list[Any] = []
        for _ in range(MAX_RANGE_PAGES):

            async def get(
                m: _Member, t: float, md: Metadata, key: bytes = key, revision: int = revision
            ) -> Any:
                return await m.kv.Range(
                    rpc.RangeRequest(key=key, range_end=end, limit=RANGE_PAGE, revision=revision),
                    timeout=t,
                    metadata=md,
                )

            resp = await self._call(what, get, timeout)
            if revision == 0:
                revision = int(resp.header.revision)
            kvs.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return kvs, revision
            key = bytes(resp.kvs[-1].key) + b"\0"
        raise DCSUnavailable(f"etcd {what}: more than {MAX_RANGE_PAGES * RANGE_PAGE} keys")

    async def _snapshot(self) -> tuple[dict[str, Claim], int]:
        kvs, revision = await self._range_pages("read of all claims", self.layout.claims_dir)
        claims: dict[str, Claim] = {}
        for kv in kvs:
            claim = self._claim_from_kv(kv)
            if claim is not None:
                claims[claim.atsign] = claim
        return claims, revision

    async def owners(self) -> dict[str, Claim]:
        claims, _ = await self._snapshot()
        return claims

    def _generation_from_kv(self, kv: Any) -> Generation | None:
        atsign = self.layout.atsign_of(kv.key.decode(errors="replace"), self.layout.generations_dir)
        if atsign is None:
            return None
        return decode_generation(atsign, int(kv.mod_revision), kv.value)

    async def generation(self, atsign: str) -> Generation | None:
        key = self.layout.generation_key(atsign).encode()

        async def get(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Range(rpc.RangeRequest(key=key), timeout=t, metadata=md)

        resp = await self._call(f"read of {atsign}'s generation", get)
        return self._generation_from_kv(resp.kvs[0]) if resp.kvs else None

    async def generations(self) -> dict[str, Generation]:
        kvs, _ = await self._range_pages("read of all generations", self.layout.generations_dir)
        out: dict[str, Generation] = {}
        for kv in kvs:
            g = self._generation_from_kv(kv)
            if g is not None:
                out[g.atsign] = g
        return out

    async def accept_generation(
        self, atsign: str, expected: int, node: str, dir_id: str, prev: int
    ) -> Generation | None:
        atsign = normalize_atsign(atsign)
        claim_key = self.layout.claim_key(atsign).encode()
        gen_key = self.layout.generation_key(atsign).encode()
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=claim_key,
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=0,
                ),
                _generation_compare(gen_key, expected),
            ],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(
                        key=gen_key,
                        value=generation_value(node, "", dir_id, prev, accepted_by=node),
                    )
                )
            ],
        )

        async def txn(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Txn(request, timeout=t, metadata=md)

        try:
            resp = await self._call(f"accept of {atsign}'s generation", txn)
        except grpc.aio.AioRpcError as exc:
            raise DCSUnavailable(f"etcd accept of {atsign}: {exc.details()}") from None
        if not resp.succeeded:
            return None
        return await self.generation(atsign)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        kvs, _ = await self._range_pages("read of the node records", self.layout.nodes_dir)
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            name = kv.key.decode(errors="replace")[len(self.layout.nodes_dir) :]
            if name:
                out[name] = decode_json(kv.value)
        return out

    async def watch(self) -> AsyncIterator[ClaimEvent]:
        async def resync() -> tuple[ClaimEvent, int]:
            snapshot, rev = await self._snapshot()
            return ClaimEvent(ClaimEventKind.RESYNC, snapshot=snapshot, revision=rev), rev

        async for event in self._watch_dir(self.layout.claims_dir, resync, self._claim_event):
            yield event

    async def _watch_dir(
        self,
        directory: str,
        resync: Callable[[], Awaitable[tuple[E, int]]],
        convert: Callable[[Any], E],
    ) -> AsyncIterator[E]:
        """Every change under ``directory``: ``resync()`` first and after a gap (compaction),
        then each watch event through ``convert``; resumes from the last revision across
        member failures."""
        next_rev: int | None = None
        failures = 0
        while not self._closed:
            if next_rev is None:
                try:
                    first, rev = await resync()
                except DCSUnavailable as exc:
                    failures += 1
                    log.warning("event=watch_resync_failed dir=%s error=%r", directory, exc)
                    await asyncio.sleep(_backoff(failures))
                    continue
                yield first
                next_rev = rev + 1
            stream = _WatchStream(self, next_rev, directory)
            try:
                async for raw in stream.events():
                    failures = 0
                    next_rev = int(raw.kv.mod_revision) + 1
                    yield convert(raw)
            except _Compacted as exc:
                log.warning("event=watch_compacted revision=%s; resyncing", exc.revision)
                next_rev = None
            except DCSUnavailable as exc:
                failures += 1
                log.warning(
                    "event=watch_interrupted member=%s error=%r; resuming from revision %s",
                    stream.member_address,
                    exc,
                    next_rev,
                )
                self._rotate_from(stream.member_index)
                await asyncio.sleep(_backoff(failures))
            finally:
                await stream.close()

    def _claim_event(self, event: Any) -> ClaimEvent:
        kv = event.kv
        rev = int(kv.mod_revision)
        atsign = self.layout.atsign_of(kv.key.decode(errors="replace"))
        if event.type == rpc.Event.DELETE:
            return ClaimEvent(ClaimEventKind.DELETE, atsign=atsign, revision=rev)
        return ClaimEvent(
            ClaimEventKind.PUT, atsign=atsign, claim=self._claim_from_kv(kv), revision=rev
        )

    # --- atSign records ------------------------------------------------------------------

    async def _record_snapshot(self) -> tuple[dict[str, AtSignRecord], dict[str, str], int]:
        kvs, revision = await self._range_pages(
            "read of the atSign records", self.layout.atsigns_dir, self._records_timeout
        )
        records: dict[str, AtSignRecord] = {}
        problems: dict[str, str] = {}
        for kv in kvs:
            name = kv.key.decode(errors="replace")[len(self.layout.atsigns_dir) :]
            record, problem = record_from_stored(name, kv.value)
            if record is not None:
                records[record.atsign] = record
            else:
                problems[name] = problem
        return records, problems, revision

    @property
    def _records_timeout(self) -> float:
        return max(self.request_timeout, RECORDS_TIMEOUT)

    async def atsign_records(self) -> tuple[dict[str, AtSignRecord], dict[str, str]]:
        records, problems, _ = await self._record_snapshot()
        return records, problems

    async def atsign_record(self, atsign: str) -> AtSignRecord | None:
        key = self.layout.atsign_record_key(atsign).encode()

        async def get(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Range(rpc.RangeRequest(key=key), timeout=t, metadata=md)

        resp = await self._call(f"read of {atsign}'s record", get, self._records_timeout)
        if not resp.kvs:
            return None
        return record_from_stored(atsign, resp.kvs[0].value)[0]

    async def write_atsign_records(
        self, put: Sequence[AtSignRecord], delete: Sequence[str] = ()
    ) -> None:
        ops = [
            rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=self.layout.atsign_record_key(r.atsign).encode(), value=r.encode()
                )
            )
            for r in put
        ] + [
            rpc.RequestOp(
                request_delete_range=rpc.DeleteRangeRequest(
                    key=self.layout.atsign_record_key(a).encode()
                )
            )
            for a in delete
        ]
        for part in chunks(ops):
            if not part:
                continue
            request = rpc.TxnRequest(success=list(part))

            async def txn(m: _Member, t: float, md: Metadata, request: Any = request) -> Any:
                return await m.kv.Txn(request, timeout=t, metadata=md)

            try:
                await self._call(
                    f"write of {len(part)} atSign record(s)", txn, self._records_timeout
                )
            except grpc.aio.AioRpcError as exc:
                raise DCSUnavailable(
                    f"etcd write of atSign records: {exc.code().name}: {exc.details()}"
                ) from None

    async def watch_atsign_records(self) -> AsyncIterator[RecordEvent]:
        async def resync() -> tuple[RecordEvent, int]:
            records, problems, rev = await self._record_snapshot()
            for name, problem in problems.items():
                log.warning("event=atsign_record_invalid key=%s problem=%r", name, problem)
            return RecordEvent(ClaimEventKind.RESYNC, snapshot=records, revision=rev), rev

        def convert(event: Any) -> RecordEvent:
            kv = event.kv
            rev = int(kv.mod_revision)
            name = kv.key.decode(errors="replace")[len(self.layout.atsigns_dir) :]
            if event.type == rpc.Event.DELETE:
                atsign = self.layout.atsign_of(
                    kv.key.decode(errors="replace"), self.layout.atsigns_dir
                )
                return RecordEvent(ClaimEventKind.DELETE, atsign=atsign or name, revision=rev)
            record, problem = record_from_stored(name, kv.value)
            return RecordEvent(
                ClaimEventKind.PUT,
                atsign=record.atsign if record else name,
                record=record,
                problem=problem,
                revision=rev,
            )

        async for event in self._watch_dir(self.layout.atsigns_dir, resync, convert):
            yield event

    async def close(self) -> None:
        self._closed = True
        for m in self._members:
            if m.channel is not None:
                await m.channel.close()
                m.channel = None
                m.token = None


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted below {revision}")
        self.revision = revision


class _WatchStream:
    """One Watch RPC on one member; reads through a pump task (cancelling a read kills it)."""

    def __init__(self, backend: EtcdBackend, start_revision: int, directory: str) -> None:
        self.backend = backend
        self.start_revision = start_revision
        self.directory = directory
        self.member_index = backend._current
        self.member = backend._open(backend._members[self.member_index])
        self.member_address = self.member.address
        self._call: Any = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    async def _pump_responses(self) -> None:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    await self._queue.put(DCSUnavailable("watch stream ended"))
                    return
                await self._queue.put(resp)
        except grpc.aio.AioRpcError as exc:
            await self._queue.put(
                DCSUnavailable(f"watch stream failed: {exc.code().name}: {exc.details()}")
            )

    async def _next(self, timeout: float) -> Any:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result and
        # drops a cancellation that arrives just as get() completes, so a cancelled watch
        # consumer would keep running (and whoever awaits it would hang).
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def events(self) -> AsyncIterator[Any]:
        """The raw watch events under the stream's directory."""
        b = self.backend
        t = b.request_timeout
        # Probe an idle stream this often: a frozen member keeps TCP open but says nothing.
        idle = max(1.0, 3 * t)
        start = self.directory.encode()
        try:
            async with asyncio.timeout(t):
                metadata = await b._metadata(self.member, t)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            raise DCSUnavailable(f"watch auth on {self.member_address}: {exc!r}") from None
        # "hasleader": a member cut off from the quorum cancels the watch instead of
        # going silent.
        self._call = self.member.watch.Watch(metadata=(*metadata, ("hasleader", "true")))
        self._pump = asyncio.create_task(self._pump_responses(), name="etcd watch pump")
        create = rpc.WatchCreateRequest(
            key=start, range_end=_prefix_end(start), start_revision=self.start_revision
        )
        try:
            async with asyncio.timeout(t):
                await self._call.write(rpc.WatchRequest(create_request=create))
            resp = await self._next(t)
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise DCSUnavailable(f"watch create on {self.member_address}: {exc!r}") from None
        self._check(resp)
        while True:
            for event in resp.events:
                yield event
            try:
                resp = await self._next(idle)
            except TimeoutError:
                try:
                    async with asyncio.timeout(t):
                        await self._call.write(
                            rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
                        )
                    resp = await self._next(t)
                except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    raise DCSUnavailable(
                        f"watch on {self.member_address} did not answer a progress request "
                        f"within {t:.3g}s"
                    ) from None
            self._check(resp)

    def _check(self, resp: Any) -> None:
        if resp.compact_revision:
            raise _Compacted(int(resp.compact_revision))
        if resp.canceled:
            raise DCSUnavailable(f"watch canceled by {self.member_address}: {resp.cancel_reason}")

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump


class EtcdSession(RenewingSession):
    """A node session backed by one etcd lease."""

    def __init__(
        self,
        backend: EtcdBackend,
        node: str,
        timing: Timing,
        *,
        lease_id: int,
        granted_sent_at: float,
    ) -> None:
        self._backend = backend
        self.lease_id = lease_id
        super().__init__(node, timing, clock=backend.clock, granted_sent_at=granted_sent_at)

    def __repr__(self) -> str:
        return f"EtcdSession(node={self.node!r}, lease={self.session_id}, state={self.state.value})"

    @property
    def session_id(self) -> str:
        return f"{self.lease_id:x}"

    async def _renew_once(self, timeout: float) -> bool:
        return await self._keepalive(timeout) > 0

    async def _keepalive(self, timeout: float) -> int:
        """One keepalive round trip; the lease's TTL as etcd answers it (0: gone)."""
        lease_id = self.lease_id

        async def keepalive(m: _Member, t: float, md: Metadata) -> Any:
            call = m.lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=t, metadata=md
            )
            async for reply in call:
                return reply
            raise DCSUnavailable("keepalive stream closed without an answer")

        reply = await self._backend._call("lease keepalive", keepalive, timeout)
        return int(reply.TTL)

    async def _revoke(self, timeout: float) -> None:
        await self._backend._revoke_lease(self.lease_id, timeout)

    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        atsign = normalize_atsign(atsign)
        self.ensure_usable()
        b = self._backend
        key = b.layout.claim_key(atsign).encode()
        value = encode_info(info)
        compare = [
            rpc.Compare(
                key=key,
                target=rpc.Compare.CREATE,
                result=rpc.Compare.EQUAL,
                create_revision=0,
            )
        ]
        success = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=self.lease_id))
        ]
        if generation is not None:
            gen_key = b.layout.generation_key(atsign).encode()
            compare.append(_generation_compare(gen_key, generation.expected))
            gen_value = stamp_value(generation, info, self.session_id)
            success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=gen_key, value=gen_value)))
        request = rpc.TxnRequest(
            compare=compare,
            success=success,
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )

        async def txn(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Txn(request, timeout=t, metadata=md)

        try:
            resp = await b._call(f"claim of {atsign}", txn)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # "requested lease not found"
                self.tracker.mark_lost(f"etcd no longer knows lease {self.session_id}")
                self._declare_lost(self.lost_reason or "lost")
                raise SessionLost(
                    f"session {self.session_id} of {self.node}: lease expired"
                ) from None
            raise DCSUnavailable(f"etcd claim of {atsign}: {exc.details()}") from None
        if resp.succeeded:
            claim: Claim | None = Claim(
                atsign=atsign,
                token=int(resp.header.revision),
                session_id=self.session_id,
                info=info,
            )
        else:
            kvs = resp.responses[0].response_range.kvs
            # A retried txn whose first attempt did apply finds its own key: still ours.
            ours = bool(kvs) and int(kvs[0].lease) == self.lease_id
            claim = b._claim_from_kv(kvs[0]) if ours else None
        if claim is not None:
            # Lost while the txn was in flight: the key goes with the lease; do not use it.
            self.ensure_usable()
            log.info(
                "event=claimed backend=etcd atsign=%s node=%s token=%s",
                atsign,
                self.node,
                claim.token,
            )
        return claim

    async def release(self, claim: Claim) -> bool:
        if claim.session_id != self.session_id:
            return False
        b = self._backend
        key = b.layout.claim_key(claim.atsign).encode()
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=key,
                    target=rpc.Compare.MOD,
                    result=rpc.Compare.EQUAL,
                    mod_revision=claim.token,
                )
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
        )

        async def txn(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Txn(request, timeout=t, metadata=md)

        try:
            resp = await b._call(f"release of {claim.atsign}", txn)
        except grpc.aio.AioRpcError as exc:
            raise DCSUnavailable(f"etcd release of {claim.atsign}: {exc.details()}") from None
        if resp.succeeded:
            log.info(
                "event=released backend=etcd atsign=%s node=%s token=%s",
                claim.atsign,
                self.node,
                claim.token,
            )
        return bool(resp.succeeded)

    async def publish_node(self, record: Mapping[str, Any]) -> None:
        self.ensure_usable()
        b = self._backend
        key = b.layout.node_key(self.node).encode()
        value = encode_json(dict(record))
        lease_id = self.lease_id

        async def put(m: _Member, t: float, md: Metadata) -> Any:
            return await m.kv.Put(
                rpc.PutRequest(key=key, value=value, lease=lease_id), timeout=t, metadata=md
            )

        try:
            await b._call(f"node record of {self.node}", put)
        except grpc.aio.AioRpcError as exc:
            raise DCSUnavailable(f"etcd node record of {self.node}: {exc.details()}") from None


def _generation_compare(key: bytes, expected: int) -> Any:
    """The record is still the one the caller checked (``expected``; 0: absent)."""
    if expected <= 0:
        return rpc.Compare(
            key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
        )
    return rpc.Compare(
        key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=expected
    )


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _backoff(failures: int) -> float:
    return min(2.0, 0.05 * 2 ** min(failures, 6))


__all__ = ["EtcdBackend", "EtcdSession", "Session", "parse_endpoint"]
