"""The plain-HTTP port: liveness and readiness for probes, and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

JSON = "application/json"


def build_app(is_ready: Callable[[], bool], metrics: Callable[[], bytes]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the event loop answers. Readiness is a separate question.
        return web.Response(text='{"status":"ok"}', content_type=JSON)

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text='{"status":"ready"}', content_type=JSON)
        return web.Response(status=503, text='{"status":"not_ready"}', content_type=JSON)

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
    address: str, is_ready: Callable[[], bool], metrics: Callable[[], bytes]
) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(build_app(is_ready, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
