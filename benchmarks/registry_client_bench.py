"""The CPU of a cold lookup's registry call: the service's own client against aiohttp's.

Side by side in one run:

    .venv/bin/python benchmarks/registry_client_bench.py [--lookups 3000] [--rounds 5]

The real client registry (SQLite) runs as a process on loopback. In this process, on one event
loop, each round makes --lookups sequential validation calls of random well-formed keys (each
unknown to the registry, as in a flood) in two ways: through ``HttpRegistry.verify`` (the
service's own keep-alive HTTP/1.1 client, ``registry/origin.py``), and through an aiohttp
session making the same POST with the same headers, reading the body with the same bound and
parsing it with the same contract, as the service did before. Printed: this process's CPU time
(user + system) per call for each, in each round, and the ratio, paired per round (median and
range). The registry's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from authz_service import apikeys, contract, credentials
from authz_service.breaker import CircuitBreaker
from authz_service.credentials import CredentialRules
from authz_service.health import Health
from authz_service.model import Credential
from authz_service.registry.http import MAX_RESPONSE_BYTES, VERIFY_PATH, HttpRegistry
from tests.e2e import harness


def random_credentials(count: int) -> list[Credential]:
    found = []
    for _ in range(count):
        credential = credentials.extract((f"ApiKey {apikeys.generate()}",), CredentialRules())
        assert isinstance(credential, Credential)  # noqa: S101 (a generated key is well formed)
        found.append(credential)
    return found


async def cpu_per_call(call: Callable[[Credential], Awaitable[object]], count: int) -> float:
    keys = random_credentials(count)
    started = time.process_time()
    for key in keys:
        await call(key)
    return (time.process_time() - started) / count * 1e6


async def run(url: str, token: str, args: argparse.Namespace) -> None:
    ours = HttpRegistry(
        url,
        token,
        timeout=1.0,
        max_in_flight=64,
        breaker=CircuitBreaker(1000, 5.0),
        health=Health(),
    )
    await ours.start()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=1.0),
        headers=headers,
    ) as session:

        async def with_aiohttp(credential: Credential) -> object:
            async with session.post(
                url + VERIFY_PATH, json={"api_key": credential.key.reveal()}, allow_redirects=False
            ) as reply:
                if reply.status != 200 or reply.content_type != "application/json":
                    raise RuntimeError(f"HTTP status {reply.status}")
                body = await reply.content.read(MAX_RESPONSE_BYTES + 1)
            return contract.parse_answer(json.loads(body))

        for call in (ours.verify, with_aiohttp):  # warm-up: connections, caches
            await cpu_per_call(call, 200)
        rounds: list[tuple[float, float]] = []
        for _ in range(args.rounds):  # interleaved: the machine's drift hits both alike
            rounds.append(
                (
                    await cpu_per_call(ours.verify, args.lookups),
                    await cpu_per_call(with_aiohttp, args.lookups),
                )
            )
    await ours.close()
    print(
        f"{args.lookups} sequential validation calls per client and round, random keys, "
        "against the real registry; this process's CPU per call"
    )
    print(f"{'round':<8}{'ours µs':>10}{'aiohttp µs':>12}{'ratio':>8}")
    for number, (mine, theirs) in enumerate(rounds, 1):
        print(f"{number:<8}{mine:>10.1f}{theirs:>12.1f}{theirs / mine:>7.2f}x")
    ratios = [theirs / mine for mine, theirs in rounds]
    print(
        f"aiohttp / ours, median of {len(rounds)} rounds: {statistics.median(ratios):.2f}x "
        f"[{min(ratios):.2f} to {max(ratios):.2f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=3000, help="calls per client and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="registry-client-bench-") as workdir,
        harness.registry_process(Path(workdir)) as registry,
    ):
        asyncio.run(run(registry.url, registry.service_token(), args))


if __name__ == "__main__":
    main()
