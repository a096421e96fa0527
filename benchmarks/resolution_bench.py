"""Key resolution through the real client registry: latency, and registry calls per check.

Cold-miss and hit latency, and registry calls per 1000 checks under a mixed workload (90% hot
keys, 10% random keys).

    .venv/bin/python benchmarks/resolution_bench.py [--checks 5000]

Runs the registry (SQLite) and authz-service (AUTHZ_REGISTRY=http) as processes on loopback,
with a counting proxy between them so that registry calls are counted exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from authz_service import apikeys  # noqa: E402
from tests.e2e import harness  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"


async def counting_proxy(target: str) -> tuple[web.AppRunner, str, dict[str, int]]:
    """Forwards every request to the registry and counts validation calls."""
    counts = {"verify": 0}
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/keys/verify":
            counts["verify"] += 1
        async with session.request(
            request.method,
            target + request.path_qs,
            headers=request.headers,
            data=await request.read(),
        ) as reply:
            return web.Response(
                status=reply.status, body=await reply.read(), content_type=reply.content_type
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", counts


def payload(key: str) -> bytes:
    http = AttributeContext.HttpRequest(
        method="GET", host="api", path="/", headers={"authorization": f"ApiKey {key}"}
    )
    data: bytes = CheckRequest(
        attributes=AttributeContext(request=AttributeContext.Request(http=http))
    ).SerializeToString()
    return data


async def timed_checks(target: str, keys: list[str], concurrency: int) -> list[float]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        queue = list(reversed(keys))

        async def worker() -> None:
            while queue:
                key = queue.pop()
                started = time.perf_counter()
                await call(payload(key), timeout=5)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(latencies)


def pct(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))] * 1000


async def run(args: argparse.Namespace, workdir: Path) -> None:
    with harness.registry_process(workdir) as registry:
        keys = [registry.create_client(f"C{n}")["api_key"] for n in range(args.clients)]
        runner, proxy, counts = await counting_proxy(registry.url)
        try:
            with harness.authz_service(
                workdir,
                registry="http",
                registry_url=proxy,
                registry_token=registry.service_token(),
                log_level="warning",
            ) as service:
                cold = await timed_checks(service.grpc_target, keys, concurrency=1)
                hot = await timed_checks(service.grpc_target, keys * 5, concurrency=1)
                calls_before = counts["verify"]
                rng = random.Random(7)
                mixed = [
                    rng.choice(keys) if rng.random() < 0.9 else apikeys.generate()
                    for _ in range(args.checks)
                ]
                await timed_checks(service.grpc_target, mixed, concurrency=16)
                mixed_calls = counts["verify"] - calls_before
        finally:
            await runner.cleanup()
    print(f"{args.clients} clients; authz-service -> counting proxy -> registry (SQLite)")
    print(
        f"cold miss  p50 {pct(cold, 0.5):6.2f} ms  p99 {pct(cold, 0.99):6.2f} ms  "
        f"({len(cold)} first checks of a key, one at a time)"
    )
    print(f"cache hit  p50 {pct(hot, 0.5):6.2f} ms  p99 {pct(hot, 0.99):6.2f} ms")
    print(
        f"mixed (90% hot, 10% random keys, {args.checks} checks, 16 in flight): "
        f"{mixed_calls} registry calls = {mixed_calls / args.checks * 1000:.0f} per 1000 checks"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="authz-resolution-") as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
