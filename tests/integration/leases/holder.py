"""A claim holder in its own process, for tests that SIGKILL it.

Prints one JSON line ``{"token": ..., "session": ...}`` once it holds the claim,
then keeps its session alive until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from leases import ClaimInfo, Timing, open_backend
from leases.base import Backend


def _backend(args: argparse.Namespace) -> Backend:
    if args.kind == "etcd":
        return open_backend("etcd", endpoints=args.endpoint, prefix=args.prefix)
    return open_backend(
        "consul", url=args.endpoint[0], prefix=args.prefix, lock_delay=args.lock_delay
    )


async def main(args: argparse.Namespace) -> None:
    backend = _backend(args)
    session = await backend.open_session(args.node, Timing.for_ttl(args.ttl))
    claim = None
    for _ in range(200):
        claim = await session.claim(args.atsign, ClaimInfo(node=args.node))
        if claim is not None:
            break
        await asyncio.sleep(0.05)
    if claim is None:
        print(json.dumps({"error": "could not claim"}), flush=True)
        sys.exit(1)
    print(json.dumps({"token": claim.token, "session": session.session_id}), flush=True)
    await session.lost.wait()
    print(json.dumps({"lost": session.lost_reason}), flush=True)  # type: ignore[attr-defined]
    sys.exit(2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["etcd", "consul"], required=True)
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--atsign", required=True)
    parser.add_argument("--node", default="holder")
    parser.add_argument("--ttl", type=float, required=True)
    parser.add_argument("--lock-delay", type=float, default=15.0)
    asyncio.run(main(parser.parse_args()))
