"""The plain-HTTP port: liveness and readiness for probes, and Prometheus metrics."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

JSON = "application/json"


def build_app(not_ready: Callable[[], list[str]], metrics: Callable[[], bytes]) -> web.Application:
    """``not_ready`` says, in words, what keeps the replica from serving (nothing: ready)."""

    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the event loop answers. Readiness is a separate question.
        return web.Response(text='{"status":"ok"}', content_type=JSON)

    async def readyz(_: web.Request) -> web.Response:
        reasons = not_ready()
        if not reasons:
            return web.Response(text='{"status":"ready"}', content_type=JSON)
        body = json.dumps({"status": "not_ready", "reasons": reasons})
        return web.Response(status=503, text=body, content_type=JSON)

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics(),
            content_type="text/plain",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    app = web.Application(client_max_size=1024)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start(
    address: str, not_ready: Callable[[], list[str]], metrics: Callable[[], bytes]
) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(build_app(not_ready, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
