"""The plain-HTTP port: liveness and readiness for probes and load balancers."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

JSON = "application/json"


def build_app(is_ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the event loop answers. Readiness is a separate question.
        return web.Response(text='{"status":"ok"}', content_type=JSON)

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text='{"status":"ready"}', content_type=JSON)
        return web.Response(status=503, text='{"status":"not_ready"}', content_type=JSON)

    app = web.Application(client_max_size=1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start(address: str, is_ready: Callable[[], bool]) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(build_app(is_ready), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
