"""The node's HTTP API: health, readiness, status, metrics, and the operator commands.

GET  /healthz  200 while the event loop runs
GET  /readyz   200 once the session is alive, the storage ready and a cycle ran; else 503
               with ``why``
GET  /status   this node's view as JSON (see :meth:`Supervisor.status`); ``?reports=N``
               returns the latest N finished handoff reports (default 50, at most 200 kept)
GET  /metrics  Prometheus text from the injected registry
POST /drain    hand off every atSign one by one and claim nothing until /resume
POST /resume   claim again
POST /handoff  {"atsign": "@alice"}: hand one atSign off now; a peer node's credential
               must add {"for_node": "a1"}, and only a failback the placement allows passes
GET  /atsigns  every atSign record (``inventory.source: dcs``), as ``supervisor atsigns export``
POST /atsigns  {"atsign": "@alice", "prefer_nodes": [...], "prefer_clouds": [...],
               "disabled": false}: create or replace the record (the registrar's call)
POST /atsigns/remove  {"atsign": "@alice"}: delete the record (its data stays)
POST /atsigns/import  {"atsigns": [...], "nodes": [...], "dry_run": false, "prune": false}:
               ``supervisor atsigns import`` (all entries or none)

With ``http.auth`` every call but /healthz needs a bearer token whose role may make it
(:mod:`supervisor.api_auth`); /healthz, /readyz and /metrics are then also served without
credentials on ``http.public_listen`` (plain HTTP, loopback by default).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from leases.base import LeaseError, normalize_atsign
from leases.records import RECORDS_TIMEOUT, AtSignRecord, RecordProblem, make_record
from supervisor.api_auth import ROLE_KEY, Credentials, Role, auth_middleware, refusal
from supervisor.deadline import within
from supervisor.inventory_ops import (
    export_doc,
    import_records,
    parse_inventory_doc,
    put_record,
    remove_record,
)

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor
    from supervisor.metrics import SupervisorMetrics

T = TypeVar("T")
log = logging.getLogger("supervisor.api")


def build_app(
    sup: Supervisor, metrics: SupervisorMetrics, credentials: Credentials | None = None
) -> web.Application:
    """The node API of one supervisor; ``credentials``: who may call what (None: anyone)."""
    app = web.Application(middlewares=[auth_middleware(credentials, metrics)])
    _add_read_only(app, sup, metrics)

    async def drain(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "message": sup.request_drain()})

    async def resume(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "message": sup.request_resume()})

    async def handoff(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            atsign = normalize_atsign(str(body["atsign"]))
            for_node = body.get("for_node")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            return web.json_response(
                {"ok": False, "error": f'body must be {{"atsign": "@name"}}: {exc}'}, status=400
            )
        try:
            if request[ROLE_KEY] is Role.PEER:
                if not isinstance(for_node, str) or not for_node:
                    raise PermissionError(
                        'a peer node\'s handoff must name the node it is for ("for_node")'
                    )
                message = sup.request_failback(atsign, for_node)
            else:
                message = sup.request_handoff(atsign)
        except PermissionError as exc:
            return refusal(request, 403, str(exc), metrics)
        except LookupError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=409)
        return web.json_response({"ok": True, "message": message})

    async def status(request: web.Request) -> web.Response:
        raw = request.query.get("reports")
        if raw is None:
            return web.json_response(sup.status())
        if not raw.isdigit():
            return web.json_response(
                {"ok": False, "error": f"reports must be a whole number >= 0, got {raw!r}"},
                status=400,
            )
        return web.json_response(sup.status(reports=int(raw)))

    _add_inventory(app, sup)
    app.router.add_get("/status", status)
    app.router.add_post("/drain", drain)
    app.router.add_post("/resume", resume)
    app.router.add_post("/handoff", handoff)
    return app


def _add_inventory(app: web.Application, sup: Supervisor) -> None:
    """The registrar's calls: the atSign records, through this node's DCS client."""
    timeout = 3 * RECORDS_TIMEOUT  # a node read, a record read, a write

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"ok": False, "error": message}, status=status)

    async def dcs(work: Callable[[], Awaitable[T]]) -> T | web.Response:
        if sup.cfg.inventory.source != "dcs":
            return error(409, "this node's inventory is static (inventory.source: static)")
        try:
            return await within(work(), timeout)
        except (TimeoutError, LeaseError) as exc:
            why = str(exc) or f"no answer within {timeout:g}s"
            log.warning("event=api-dcs-failed error=%r", why)
            return error(503, f"the DCS did not answer: {why}")

    async def body_record(request: web.Request) -> AtSignRecord | web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return error(400, f"body: not JSON: {exc}")
        if not isinstance(body, dict) or "atsign" not in body:
            return error(400, 'body must be {"atsign": "@name", ...}')
        try:
            return make_record(str(body["atsign"]), body, "body")
        except RecordProblem as exc:
            return error(400, str(exc))

    async def list_atsigns(_: web.Request) -> web.Response:
        got = await dcs(sup.backend.atsign_records)
        if isinstance(got, web.Response):
            return got
        records, problems = got
        return web.json_response({**export_doc(records), "invalid": problems})

    async def put_atsign(request: web.Request) -> web.Response:
        record = await body_record(request)
        if isinstance(record, web.Response):
            return record
        got = await dcs(lambda: put_record(sup.backend, record))
        if isinstance(got, web.Response):
            return got
        code, message = got
        if code:
            return error(400, message)
        return web.json_response({"ok": True, "message": message})

    async def remove_atsign(request: web.Request) -> web.Response:
        record = await body_record(request)
        if isinstance(record, web.Response):
            return record
        got = await dcs(lambda: remove_record(sup.backend, record.atsign))
        if isinstance(got, web.Response):
            return got
        if not got:
            return error(404, f"{record.atsign}: no such record")
        return web.json_response({"ok": True, "message": f"removed {record.atsign}"})

    async def import_atsigns(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return error(400, f"body: not JSON: {exc}")
        if not isinstance(body, dict):
            return error(400, 'body must be {"atsigns": [...], "dry_run": false, ...}')
        records, nodes, problems = parse_inventory_doc(body, "body")
        for flag in ("dry_run", "prune"):
            if not isinstance(body.get(flag, False), bool):
                problems.append(f"body: {flag}: expected true or false")
        if problems:
            return web.json_response(
                {"ok": False, "error": "nothing was written", "problems": problems}, status=400
            )
        got = await dcs(
            lambda: import_records(
                sup.backend,
                records,
                nodes | {n.name for n in sup.cfg.inventory.nodes},
                dry_run=bool(body.get("dry_run", False)),
                prune=bool(body.get("prune", False)),
            )
        )
        if isinstance(got, web.Response):
            return got
        changes, bad = got
        if bad:
            return web.json_response(
                {"ok": False, "error": "nothing was written", "problems": bad}, status=400
            )
        return web.json_response(
            {
                "ok": True,
                "dry_run": bool(body.get("dry_run", False)),
                "message": changes.summary(),
                "added": [r.atsign for r in changes.added],
                "updated": [r.atsign for r in changes.updated],
                "removed": list(changes.removed),
            }
        )

    app.router.add_get("/atsigns", list_atsigns)
    app.router.add_post("/atsigns/import", import_atsigns)
    app.router.add_post("/atsigns", put_atsign)
    app.router.add_post("/atsigns/remove", remove_atsign)


def build_public_app(sup: Supervisor, metrics: SupervisorMetrics) -> web.Application:
    """The read-only listener: /healthz, /readyz, /metrics, without credentials."""
    app = web.Application()
    _add_read_only(app, sup, metrics)
    return app


def _add_read_only(app: web.Application, sup: Supervisor, metrics: SupervisorMetrics) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": sup.me.name})

    async def readyz(_: web.Request) -> web.Response:
        ready = sup.ready
        body: dict[str, object] = {"ready": ready, "draining": sup.state.draining}
        if not ready:
            body["why"] = sup.not_ready_because()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)


async def start_api(
    app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve ``app`` on host:port (HTTPS with ``tls``); the caller cleans up the runner."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    return runner
