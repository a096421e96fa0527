"""A good key's latency while a flood of random keys is refused, side by side in one run.

    .venv/bin/python benchmarks/flood_bench.py [--flood 20000] [--concurrency 64]

The real client registry (SQLite) and authz-service (AUTHZ_REGISTRY=http, default settings but
--workers for AUTHZ_GRPC_WORKERS) run as processes on loopback. A probe checks one good, cached
key over gRPC every --probe-interval seconds (open loop: a slow answer does not delay the next
probe): first alone for --baseline-seconds, then while another process sends --flood checks of
random well-formed keys (valid checksums, unknown to the registry) with --concurrency in flight,
then alone again (were it far from the baseline, the machine drifted: other load on it).

Printed: the probe's p50 and p99 at the client, and as the service itself timed them (its
decision log), before, during and after the flood, and the ratio of the p99s (target: at most 3x);
how the flood was refused (every key must be), and the registry calls it caused against the
cold-lookup bound (AUTHZ_COLD_LOOKUP_BURST + AUTHZ_COLD_LOOKUP_RATE x its duration); the CPU
each process used during the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from authz_service import apikeys  # noqa: E402
from tests.e2e import harness  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
TICKS = os.sysconf("SC_CLK_TCK")
COLD_LOOKUP_RATE, COLD_LOOKUP_BURST = 200.0, 400  # the service's defaults, which it runs with


def payload(key: str, request_id: str = "") -> bytes:
    headers = {"authorization": f"ApiKey {key}"}
    if request_id:
        headers["x-request-id"] = request_id
    http = AttributeContext.HttpRequest(method="GET", host="api", path="/v1/x", headers=headers)
    data: bytes = CheckRequest(
        attributes=AttributeContext(request=AttributeContext.Request(http=http))
    ).SerializeToString()
    return data


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads: its main thread (the event loop), gRPC's core
    threads, and the other Python threads (the check workers, the log writer)."""
    by_kind: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            kind = "event loop"
        elif name.startswith(("event_engine", "grpc", "lifeguard")):
            kind = "gRPC core"
        else:
            kind = "check workers and log writer"
        by_kind[kind] = by_kind.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return by_kind


def pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


@dataclass
class Probe:
    latencies: list[float]
    errors: int
    denied: int


async def probe(target: str, key: str, interval: float, tag: str, until: Any) -> Probe:
    """Check ``key`` every ``interval`` seconds until ``until()`` is true."""
    result = Probe([], 0, 0)
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)

        async def one(n: int) -> None:
            started = time.perf_counter()
            try:
                reply = await call(payload(key, f"probe-{tag}-{n}"), timeout=5)
            except grpc.RpcError:
                result.errors += 1
                return
            result.latencies.append(time.perf_counter() - started)
            result.denied += reply.status.code != 0

        tasks, n = [], 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not until():
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*tasks)
    return result


def flood_process(target: str, count: int, concurrency: int, results: Any) -> None:
    """The flood, in its own process: ``count`` random keys, ``concurrency`` in flight."""
    keys = [apikeys.generate() for _ in range(count)]
    results.put(asyncio.run(flood(target, keys, concurrency)))


async def flood(target: str, keys: list[str], concurrency: int) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        queue = list(reversed(keys))

        async def worker() -> None:
            nonlocal errors
            while queue:
                key = queue.pop()
                try:
                    reply = await call(payload(key), timeout=5)
                except grpc.RpcError:
                    errors += 1
                    continue
                reasons[reply.status.message or "allowed"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"reasons": dict(reasons), "errors": errors, "seconds": time.perf_counter() - started}


def registry_calls(service: harness.Service) -> Counter[str]:
    text = harness.send(service.http_port, "/metrics").body.decode()
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("authz_registry_calls_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            calls[outcome] = int(float(line.rpartition(" ")[2]))
    return calls


def flood_latencies(service: harness.Service) -> dict[str, list[float]]:
    """The flood's checks (those without a request id) as the service timed them, by reason."""
    found: dict[str, list[float]] = {}
    for line in service.logs().split("\n"):
        if '"event": "decision"' in line and '"request_id": null' in line:
            record = json.loads(line)
            found.setdefault(record["reason"], []).append(record["latency_ms"] / 1000)
    return found


def server_latencies(service: harness.Service, tag: str) -> list[float]:
    """The probe's checks as the service timed them (its decision log)."""
    found = []
    for line in service.logs().split("\n"):
        if f'"request_id": "probe-{tag}-' in line:
            found.append(json.loads(line)["latency_ms"] / 1000)
    return found


async def run(args: argparse.Namespace, workdir: Path) -> None:
    with harness.registry_process(workdir) as registry:
        key = registry.create_client("Good client")["api_key"]
        with harness.authz_service(
            workdir,
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            grpc_workers=str(args.workers),
        ) as service:
            target = service.grpc_target
            warm = time.monotonic() + 1
            await probe(target, key, 0.001, "warm", lambda: time.monotonic() > warm)
            until = time.monotonic() + args.baseline_seconds
            baseline = await probe(
                target, key, args.probe_interval, "base", lambda: time.monotonic() > until
            )

            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            worker = context.Process(
                target=flood_process, args=(target, args.flood, args.concurrency, results)
            )
            calls_before = registry_calls(service)
            pids = {"authz-service": service.process.pid, "registry": registry.process.pid}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            threads_before = thread_cpu(service.process.pid)
            worker.start()
            started = time.perf_counter()
            during = await probe(
                target, key, args.probe_interval, "flood", lambda: not worker.is_alive()
            )
            elapsed = time.perf_counter() - started
            flooded = results.get(timeout=60)
            worker.join()
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            until = time.monotonic() + args.baseline_seconds
            after = await probe(
                target, key, args.probe_interval, "after", lambda: time.monotonic() > until
            )
            threads = {
                kind: seconds - threads_before.get(kind, 0.0)
                for kind, seconds in thread_cpu(service.process.pid).items()
            }
            calls = registry_calls(service) - calls_before
            harness.wait_until(
                lambda: len(server_latencies(service, "after")) == len(after.latencies),
                5,
                "the decision log",
            )
            server = {tag: server_latencies(service, tag) for tag in ("base", "flood", "after")}
            flood_server = flood_latencies(service)

    print(
        f"authz-service (http, {args.workers} workers, other settings default) -> registry "
        f"(SQLite); probe every "
        f"{args.probe_interval * 1000:g} ms; flood of {args.flood} random keys, "
        f"{args.concurrency} in flight, from another process"
    )
    print(f"{'':16}{'checks':>8}{'p50 ms':>9}{'p99 ms':>9}{'server p50':>12}{'server p99':>12}")
    rows = (("baseline", baseline, "base"), ("during flood", during, "flood"))
    for name, result, tag in (*rows, ("after (drift?)", after, "after")):
        print(
            f"{name:16}{len(result.latencies):>8}{pct(result.latencies, 0.5):>9.2f}"
            f"{pct(result.latencies, 0.99):>9.2f}{pct(server[tag], 0.5):>12.3f}"
            f"{pct(server[tag], 0.99):>12.3f}"
        )
    ratio = pct(during.latencies, 0.99) / pct(baseline.latencies, 0.99)
    print(f"good key p99 during / baseline: {ratio:.2f}x (target: at most 3x)")
    print(
        f"good key errors {baseline.errors + during.errors + after.errors}, denials "
        f"{baseline.denied + during.denied + after.denied} (must be 0)"
    )
    refused = flooded["reasons"]
    print(
        f"flood: {sum(refused.values())} answered in {flooded['seconds']:.2f} s "
        f"({sum(refused.values()) / flooded['seconds']:.0f}/s), gRPC errors {flooded['errors']}, "
        f"outcomes {dict(sorted(refused.items()))} (an allow would be wrong)"
    )
    print(
        "flood checks as the service timed them: "
        + ", ".join(
            f"{reason} p50 {pct(times, 0.5):.2f} ms p99 {pct(times, 0.99):.2f} ms"
            for reason, times in sorted(flood_server.items())
        )
    )
    bound = COLD_LOOKUP_BURST + COLD_LOOKUP_RATE * elapsed
    print(f"registry calls during the flood: {dict(calls)}; cold-lookup bound {bound:.0f}")
    print(
        "CPU during the flood: "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in cpu.items())
        + f" over {elapsed:.2f} s (2 cores shared with the load generators)"
    )
    print(
        "authz-service CPU by thread: "
        + ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in sorted(threads.items()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20_000, help="random keys in the flood")
    parser.add_argument("--concurrency", type=int, default=64, help="flood checks in flight")
    parser.add_argument(
        "--workers", type=int, default=32, help="AUTHZ_GRPC_WORKERS (the default is 32)"
    )
    parser.add_argument("--probe-interval", type=float, default=0.002, help="seconds")
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="authz-flood-") as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
