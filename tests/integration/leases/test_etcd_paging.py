"""Prefix reads of etcd come in pages: 100,000 claims do not fit in one gRPC answer (4 MB)."""

from __future__ import annotations

from typing import Any

from aetcd import rpc

from leases import ClaimEventKind, Timing
from leases.base import ClaimInfo
from leases.etcd import RANGE_PAGE, EtcdBackend
from leases.keys import encode_info
from testbed.etcd import EtcdCluster


async def test_owners_and_the_watch_list_every_claim_across_pages(
    etcd: EtcdCluster, key_prefix: str
) -> None:
    backend = EtcdBackend(etcd.endpoints, key_prefix)
    try:
        session = await backend.open_session("bulk", Timing.for_ttl(6))
        lease = int(session.session_id, 16)
        total = 2 * RANGE_PAGE + 123
        value = encode_info(ClaimInfo(node="bulk", extra={"pad": "x" * 200}))
        for first in range(0, total, 128):  # etcd's max-txn-ops is 128
            ops = [
                rpc.RequestOp(
                    request_put=rpc.PutRequest(
                        key=backend.layout.claim_key(f"@p{i:06d}").encode(),
                        value=value,
                        lease=lease,
                    )
                )
                for i in range(first, min(total, first + 128))
            ]

            async def txn(m: Any, t: float, md: Any, ops: list[Any] = ops) -> Any:
                return await m.kv.Txn(rpc.TxnRequest(success=ops), timeout=t, metadata=md)

            await backend._call("bulk put", txn, 5.0)
        owners = await backend.owners()
        assert len(owners) == total
        assert {c.session_id for c in owners.values()} == {session.session_id}
        async for event in backend.watch():
            assert event.kind is ClaimEventKind.RESYNC
            assert len(event.snapshot or {}) == total
            break
        await session.close()
    finally:
        await backend.close()
