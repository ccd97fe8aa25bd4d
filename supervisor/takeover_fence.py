"""Fencing at the storage layer before a takeover (invariant 6 of the design).

Before a node starts an atSign whose previous owner was *lost* (its session ended without a
release, so its atServer may still hold files open, or be frozen and thaw later), it
evicts that owner's CephFS client instance and blocklists it: the MDS drops the client's
capabilities at once (the new atServer's ``open()`` no longer waits ``session_timeout``) and
no OSD accepts anything the old client writes afterwards. A planned handoff (the owner
released the claim while its session lived, after stopping its atServer) needs no fence.

The client instance comes from the atSign's generation record (the owner wrote its client
identity there when it claimed), so a node that has mounted anew since keeps its new mount;
without one (records written before this version) every mount of the owner's entity is
evicted. Concurrent takeovers from one lost owner share one eviction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from supervisor.config import CephFSConfig
from supervisor.metrics import SupervisorMetrics

log = logging.getLogger("supervisor")

REMEMBER_S = 60.0
"""A fenced client instance is not fenced again within this many seconds."""


def parse_client_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``client.a1/4160/127.0.0.1:0/1234`` -> (entity, global id, address)."""
    entity, _, rest = ref.partition("/")
    gid, _, addr = rest.partition("/")
    return entity, int(gid) if gid.isdigit() else None, addr or None


class TakeoverFence:
    """Evicts and blocklists a lost owner's CephFS client (one fencer connection, reused)."""

    def __init__(self, c: CephFSConfig, metrics: SupervisorMetrics | None = None) -> None:
        self.c = c
        self.metrics = metrics
        self._fencer: Any = None
        self._lock = asyncio.Lock()
        self._recent: dict[str, tuple[float, asyncio.Future[tuple[bool, str]]]] = {}

    async def _connected(self) -> Any:
        from storage.ceph_fence import CephFencer

        async with self._lock:
            if self._fencer is None:
                fencer = CephFencer(
                    conffile=self.c.conf,
                    entity=self.c.fencer_entity,
                    keyring=self.c.fencer_keyring,
                    fs_name=self.c.fs_name,
                    timeout=self.c.evict_timeout,
                )
                await fencer.connect(timeout=self.c.evict_timeout)
                self._fencer = fencer
            return self._fencer

    async def fence(self, client_ref: str, fallback_entity: str) -> tuple[bool, str]:
        """Fence the client named by ``client_ref`` (or, if empty, every mount of
        ``fallback_entity``); (fenced, a sentence saying what happened)."""
        key = client_ref or fallback_entity
        now = time.monotonic()
        seen = self._recent.get(key)
        if seen is not None and now - seen[0] < REMEMBER_S:
            return await asyncio.shield(seen[1])
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._recent[key] = (now, future)
        try:
            result = await self._fence(client_ref, fallback_entity)
        except BaseException as exc:
            self._recent.pop(key, None)
            future.set_result((False, f"fence of {key} failed: {exc!r}"))
            raise
        if not result[0]:
            self._recent.pop(key, None)  # try again next time
        future.set_result(result)
        return result

    async def holds_session(self, client_ref: str) -> bool | None:
        """Whether an MDS still lists the client instance ``client_ref`` names (``None``:
        could not tell, or the ref names no instance)."""
        from storage.ceph_fence import CephFenceError

        entity, gid, _ = parse_client_ref(client_ref)
        if gid is None:
            return None
        try:
            fencer = await self._connected()
            sessions = await fencer.list_sessions(entity, timeout=self.c.evict_timeout)
        except (CephFenceError, OSError, ValueError, TimeoutError):
            return None
        return any(s.global_id == gid for s in sessions)

    async def _fence(self, client_ref: str, fallback_entity: str) -> tuple[bool, str]:
        from storage.ceph_fence import CephFenceError

        began = time.monotonic()
        entity, gid, addr = (
            parse_client_ref(client_ref) if client_ref else (fallback_entity, None, None)
        )
        try:
            fencer = await self._connected()
            result = await fencer.evict(
                entity,
                known=[addr] if addr else [],
                instances=[gid] if gid is not None else None,
                timeout=self.c.evict_timeout,
            )
        except (CephFenceError, OSError, ValueError, TimeoutError) as exc:
            ok, text = False, f"could not fence {entity}: {exc!r}"
        else:
            ok, text = result.fenced, str(result)
        took = time.monotonic() - began
        if self.metrics is not None:
            self.metrics.storage_fences.labels("fenced" if ok else "failed").inc()
            self.metrics.storage_fence_seconds.observe(took)
        log.log(
            logging.INFO if ok else logging.ERROR,
            "event=storage-fence client=%s ok=%s took=%.2fs detail=%r",
            client_ref or entity,
            ok,
            took,
            text,
        )
        return ok, text

    async def close(self) -> None:
        if self._fencer is not None:
            await self._fencer.close()
            self._fencer = None
