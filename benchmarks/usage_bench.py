"""What the usage ledger and a local rate limit add to a check, in process, side by side.

    .venv/bin/python benchmarks/usage_bench.py [--number 100000] [--rounds 5]

Times what a check server's worker does for one check of a known key answered from memory
(the keys file): the check core (credential, lookup, policy, the rate limit, recording in the
metrics and the ledger) and encoding the CheckResponse. Decision logging is off here (its
writer thread would share the interpreter with the timing), and so is gRPC: check_bench.py
measures the whole server through gRPC, including the rate limit kept in Redis. The limit is
too high to be reached: every check takes from the bucket and gets its RateLimit headers.
Prints CPU microseconds per check (the best of interleaved rounds) and the ratio to the same
check without either. Then, what one take from the shared bucket costs this process on the event
loop (the Lua script in a private redis-server, awaited one at a time, through redis-py): the
Redis rate limit's own part of a check, without the hand-over from the worker thread to the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_service import envoy_codec
from authz_service.answers import AnswerSettings
from authz_service.breaker import CircuitBreaker
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.limits import LocalBuckets, RateLimiter, SharedBuckets
from authz_service.metrics import Metrics
from authz_service.model import RateLimit
from authz_service.registry.static_file import StaticFileRegistry, add_key
from authz_service.usage import UsageLedger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.test_shared_cache import redis_server


def request(key: str) -> bytes:
    http = AttributeContext.HttpRequest(
        id="4f1c9a52-8e0b-4f3b-9a59-1f0e5d2c7b11",
        method="GET",
        host="api.example.com",
        path="/v1/orders/12345?expand=items",
        headers={"authorization": f"ApiKey {key}", "x-request-id": "4f1c9a52"},
    )
    check = CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))
    payload: bytes = check.SerializeToString()
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = Path(tempfile.mkdtemp(prefix="usage-bench-")) / "keys.yaml"
    plain = request(add_key(keys, "bench", "Benchmark client", ("reader",)))
    unreachable = RateLimit(1_000_000_000, "second")
    limited = request(
        add_key(keys, "bench-limited", "Limited client", ("reader",), rate_limit=unreachable)
    )
    loop = asyncio.new_event_loop()
    registry = StaticFileRegistry(keys, reload_interval=0)
    loop.run_until_complete(registry.start())
    encoder = envoy_codec.Encoder(AnswerSettings())

    def server(ledger: bool, limits: bool) -> Checker:
        return Checker(
            registry,
            CheckSettings(CredentialRules(), check_timeout=1.0),
            loop,
            Metrics(),
            limits=RateLimiter(LocalBuckets()) if limits else None,
            usage=UsageLedger(max_entries=100_000) if ledger else None,
        )

    cases = [
        ("without either", server(ledger=False, limits=False), plain),
        ("+ ledger", server(ledger=True, limits=False), plain),
        ("+ local limit", server(ledger=False, limits=True), limited),
        ("+ ledger + local limit", server(ledger=True, limits=True), limited),
    ]
    timers = {
        name: timeit.Timer(
            "encode(check(decode(payload, 1 << 20)))",
            # CPU time of this thread: other processes on the machine do not count.
            timer=time.thread_time,
            globals={
                "encode": encoder.encode,
                "check": core.check,
                "decode": envoy_codec.decode,
                "payload": payload,
            },
        )
        for name, core, payload in cases
    }
    runs: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):  # interleaved, so that drift hits every case alike
        for name, timer in timers.items():
            runs[name].append(timer.timeit(number=args.number) / args.number * 1e6)
    timings = {name: min(times) for name, times in runs.items()}
    redis_micros = shared_take_cost(args.number // 10)
    floor = timings["without either"]
    print(
        f"{args.number} checks per case, best of {args.rounds} interleaved rounds, CPU time, "
        "in process (no gRPC, no decision log)"
    )
    print(f"{'check':<26}{'us/check':>9}{'added us':>10}{'ratio':>8}")
    for name, micros in timings.items():
        print(f"{name:<26}{micros:>9.2f}{micros - floor:>10.2f}{micros / floor:>7.2f}x")
    print(f"one take from the shared bucket in Redis, on the event loop: {redis_micros:.1f} us CPU")


def shared_take_cost(number: int) -> float:
    """CPU microseconds of this process per take from a bucket in a real Redis."""
    limit = RateLimit(1_000_000_000, "second")

    async def takes(url: str) -> float:
        shared = SharedBuckets(url, "bench", timeout=1.0, breaker=CircuitBreaker(5, 5.0))
        await shared.start()
        try:
            best = float("inf")
            for _ in range(5):
                started = time.process_time()
                for _ in range(number):
                    await shared.take("bench-limited", limit)
                best = min(best, (time.process_time() - started) / number * 1e6)
            return best
        finally:
            await shared.close()

    with redis_server() as url:
        return asyncio.run(takes(url))


if __name__ == "__main__":
    main()
