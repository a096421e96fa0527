"""What the usage ledger and a rate limit add to a check, in process, side by side.

    .venv/bin/python benchmarks/usage_bench.py [--number 20000] [--rounds 9]

Runs the check core as the check server does: checks decided on a worker thread (this one),
the event loop in a thread of its own (where a rate limit kept in Redis is awaited, in a
private redis-server), and the decision log's writer (writing to /dev/null). Times what the
server does for one check of a known key answered from memory (the keys file), gRPC itself
aside: the check core (credential, lookup, policy, the rate limit, recording in the decision
log, the metrics and the ledger), and encoding and serialising the CheckResponse. The figure
is this process's CPU time (every thread; Redis's own is not counted), so other processes on
the machine count for little; the rounds are interleaved. check_bench.py measures the whole
server through gRPC. The limit is too high to be reached: every check takes
from the bucket and gets its RateLimit headers. Prints CPU microseconds per check (the best
round) and the ratio to the same check without the ledger or a limit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_service import envoy_codec, logs
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
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    logs.configure("info", stream=open(os.devnull, "w"))  # noqa: SIM115 (open until exit)
    keys = Path(tempfile.mkdtemp(prefix="usage-bench-")) / "keys.yaml"
    plain = request(add_key(keys, "bench", "Benchmark client", ("reader",)))
    unreachable = RateLimit(1_000_000_000, "second")
    limited = request(
        add_key(keys, "bench-limited", "Limited client", ("reader",), rate_limit=unreachable)
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, loop).result()

    registry = StaticFileRegistry(keys, reload_interval=0)
    on_loop(registry.start())
    encoder = envoy_codec.Encoder(AnswerSettings())
    quiet = envoy_codec.Encoder(AnswerSettings(), quota_headers_on_allow=False)
    with redis_server() as redis_url:
        shared = SharedBuckets(redis_url, "bench", timeout=1.0, breaker=CircuitBreaker(5, 5.0))
        on_loop(shared.start())

        metrics: dict[Checker, Metrics] = {}

        def server(ledger: bool, limits: RateLimiter | None) -> Checker:
            counted = Metrics()
            counted.watch_rate_limits(limits or RateLimiter(LocalBuckets()))
            core = Checker(
                registry,
                CheckSettings(CredentialRules(), check_timeout=1.0),
                loop,
                counted,
                limits=limits,
                usage=UsageLedger(max_entries=100_000) if ledger else None,
            )
            metrics[core] = counted
            return core

        cases = [
            ("without either", server(False, None), encoder, plain),
            ("+ ledger", server(True, None), encoder, plain),
            ("+ local limit", server(False, RateLimiter(LocalBuckets())), encoder, limited),
            (
                "+ local limit, 429 headers",  # AUTHZ_RATE_LIMIT_HEADERS=false
                server(False, RateLimiter(LocalBuckets())),
                quiet,
                limited,
            ),
            (
                "+ ledger + local limit",
                server(True, RateLimiter(LocalBuckets())),
                encoder,
                limited,
            ),
            (
                "+ Redis limit",
                server(False, RateLimiter(LocalBuckets(), shared)),
                encoder,
                limited,
            ),
        ]
        runs: dict[str, list[float]] = {name: [] for name, *_ in cases}
        for _ in range(args.rounds):  # interleaved, so that drift hits every case alike
            for name, core, encoding, payload in cases:
                runs[name].append(cpu_per_check(core, encoding, payload, args.number))
        modes = {name: counted_in(metrics[core]) for name, core, *_ in cases}
        on_loop(shared.close())
    timings = {name: min(times) for name, times in runs.items()}
    floor = timings["without either"]
    print(
        f"{args.number} checks per case, best of {args.rounds} interleaved rounds, "
        "CPU time of the process, in process (all but gRPC)"
    )
    print(f"{'check':<30}{'us/check':>9}{'added us':>10}{'ratio':>8}")
    for name, micros in timings.items():
        note = f"  ({modes[name]})" if modes[name] else ""
        print(f"{name:<30}{micros:>9.2f}{micros - floor:>10.2f}{micros / floor:>7.2f}x{note}")


def cpu_per_check(
    core: Checker, encoder: envoy_codec.Encoder, payload: bytes, number: int
) -> float:
    check, encode, decode = core.check, encoder.encode, envoy_codec.decode
    (writer,) = logging.getLogger().handlers  # the decision log's batching writer
    started = time.process_time()
    for _ in range(number):
        encode(check(decode(payload, 1 << 20)))  # serialised, as the servicer answers
    writer.flush()  # this round's lines are formatted and written within the round
    return (time.process_time() - started) / number * 1e6


def counted_in(metrics: Metrics) -> str:
    """Where the rate-limited checks were counted (every one in Redis, unless it failed)."""
    counts = {
        mode: metrics.registry.get_sample_value("authz_rate_limit_checks_total", {"mode": mode})
        for mode in ("shared", "local")
    }
    return ", ".join(f"{mode}: {int(n)}" for mode, n in counts.items() if n)


if __name__ == "__main__":
    main()
