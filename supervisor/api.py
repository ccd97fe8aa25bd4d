"""The node's HTTP API: health, readiness, status, metrics, and the operator commands.

GET  /healthz  200 while the event loop runs
GET  /readyz   200 once the session is alive and a first cycle ran, else 503
GET  /status   this node's view as JSON (see :meth:`Supervisor.status`)
GET  /metrics  Prometheus text from the injected registry
POST /drain    hand off every atSign one by one and claim nothing until /resume
POST /resume   claim again
POST /handoff  {"atsign": "@alice"}: hand one atSign off now
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from leases.base import normalize_atsign

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor
    from supervisor.metrics import SupervisorMetrics


def build_app(sup: Supervisor, metrics: SupervisorMetrics) -> web.Application:
    """The aiohttp application for one supervisor."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": sup.me.name})

    async def readyz(_: web.Request) -> web.Response:
        ready = sup.ready
        return web.json_response(
            {"ready": ready, "draining": sup.state.draining}, status=200 if ready else 503
        )

    async def status(_: web.Request) -> web.Response:
        return web.json_response(sup.status())

    async def metrics_view(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def drain(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "message": sup.request_drain()})

    async def resume(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "message": sup.request_resume()})

    async def handoff(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            atsign = normalize_atsign(str(body["atsign"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return web.json_response(
                {"ok": False, "error": f'body must be {{"atsign": "@name"}}: {exc}'}, status=400
            )
        try:
            message = sup.request_handoff(atsign)
        except LookupError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=409)
        return web.json_response({"ok": True, "message": message})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_post("/drain", drain)
    app.router.add_post("/resume", resume)
    app.router.add_post("/handoff", handoff)
    return app


async def start_api(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on host:port; the caller cleans up the returned runner."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
