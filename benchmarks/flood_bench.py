"""A good key's latency while a flood of random keys is refused, side by side in one run.

    .venv/bin/python benchmarks/flood_bench.py [--rounds 3] [--flood 10000] [--flood-rate 1000]

The real client registry (SQLite) and authz-service (AUTHZ_REGISTRY=http, default settings but
--workers for AUTHZ_GRPC_WORKERS) run as processes on loopback. With two cores or more, the
service has one to itself (--service-cpu, default 0) and everything else (this process, its
probe, the flood's process and the registry) shares the others, as clients on other machines
would: on a 2-core VM where both compete, the probe's own client waits for a core and the
figure measures the machine. A probe checks one good, cached key over gRPC every
--probe-interval seconds (open loop: a slow answer does not delay the next probe).

Each of --rounds interleaved rounds has three parts: the probe alone for --baseline-seconds;
while another process sends --flood checks of random well-formed keys (valid checksums, unknown
to the registry) at --flood-rate a second, at most --concurrency in flight; and, as a control,
during the same flood made of the good key itself, answered from memory.

Printed, per round: the probe's p50 and p99 at the client and as the service itself timed them
(its decision log) in each part, and the ratios of the p99s: the random-key flood's to the
baseline (target: at most 3x), and the control's, which is what the same rate of checks costs
the good key on this machine however cheap they are; then the median of each ratio over the
rounds. Per flood: how it was answered (every random key must be refused), the service's CPU
per check (flood and probe) by kind of thread, and the registry calls the random keys caused,
against the cold-lookup bound (AUTHZ_COLD_LOOKUP_BURST + AUTHZ_COLD_LOOKUP_RATE x the flood's
duration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
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


def pin(pid: int, cpu: int) -> None:
    """Keep every thread of a process on one core (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


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


def flood_process(
    target: str, keys: list[str] | None, args: tuple[int, float, int, str], results: Any
) -> None:
    """The flood, in its own process: ``count`` checks at ``rate`` per second, at most
    ``concurrency`` in flight; of random keys, or of ``keys`` in turn."""
    count, rate, concurrency, tag = args
    chosen = [apikeys.generate() for _ in range(count)] if keys is None else keys * count
    # Built before the clock starts, so that the flood's own client is as cheap as it can be.
    payloads = [payload(key, f"flood-{tag}-{n}") for n, key in enumerate(chosen[:count])]
    results.put(asyncio.run(flood(target, payloads, (rate, concurrency))))


async def flood(target: str, payloads: list[bytes], pace: tuple[float, int]) -> dict[str, Any]:
    rate, concurrency = pace
    reasons: Counter[str] = Counter()
    errors = 0
    slots = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)

        async def one(data: bytes) -> None:
            nonlocal errors
            try:
                reply = await call(data, timeout=5)
            except grpc.RpcError:
                errors += 1
                return
            finally:
                slots.release()
            reasons[reply.status.message or "allowed"] += 1

        loop = asyncio.get_running_loop()
        started = next_at = loop.time()
        tasks = []
        for data in payloads:
            await slots.acquire()
            tasks.append(asyncio.create_task(one(data)))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*tasks)
    return {"reasons": dict(reasons), "errors": errors, "seconds": loop.time() - started}


@dataclass
class Flood:
    probe: Probe
    outcome: dict[str, Any]
    seconds: float
    cpu: dict[str, float]  # by process
    threads: dict[str, float]  # authz-service's, by kind of thread
    calls: Counter[str]  # registry calls by outcome


async def flooded(
    args: argparse.Namespace,
    service: harness.Service,
    registry: harness.RegistryProcess,
    key: str,
    *,
    keys: list[str] | None,
    tag: str,
) -> Flood:
    """Probe ``key`` while another process floods the service (``keys``: None for random)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    worker = context.Process(
        target=flood_process,
        args=(
            service.grpc_target,
            keys,
            (args.flood, args.flood_rate, args.concurrency, tag),
            results,
        ),
    )
    calls_before = registry_calls(service)
    pids = {"authz-service": service.process.pid, "registry": registry.process.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    threads_before = thread_cpu(service.process.pid)
    worker.start()
    started = time.perf_counter()
    during = await probe(
        service.grpc_target, key, args.probe_interval, tag, lambda: not worker.is_alive()
    )
    elapsed = time.perf_counter() - started
    outcome = results.get(timeout=60)
    worker.join()
    return Flood(
        during,
        outcome,
        elapsed,
        {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()},
        {
            kind: seconds - threads_before.get(kind, 0.0)
            for kind, seconds in thread_cpu(service.process.pid).items()
        },
        registry_calls(service) - calls_before,
    )


def registry_calls(service: harness.Service) -> Counter[str]:
    text = harness.send(service.http_port, "/metrics").body.decode()
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("authz_registry_calls_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            calls[outcome] = int(float(line.rpartition(" ")[2]))
    return calls


def flood_latencies(service: harness.Service, tag: str) -> dict[str, list[float]]:
    """A flood's checks as the service timed them, by reason."""
    found: dict[str, list[float]] = {}
    for line in service.logs().split("\n"):
        if f'"request_id": "flood-{tag}-' in line:
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


@dataclass
class Round:
    probes: dict[str, Probe]  # by part: baseline, random-key flood, cached-key flood
    server: dict[str, list[float]]  # the same checks as the service timed them
    floods: dict[str, Flood]


# Each part of a round, and the tag of its checks' request ids (with the round's number).
TAGS = {
    "baseline": "baseline",
    "random-key flood": "random",
    "cached-key flood (control)": "cached",
}
PARTS = tuple(TAGS)


async def run(args: argparse.Namespace, workdir: Path) -> None:
    if args.service_cpu is not None:
        # This process, and the registry and flood processes it starts, keep off the service's
        # core.
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - {args.service_cpu})
    with harness.registry_process(workdir) as registry:
        key = registry.create_client("Good client")["api_key"]
        with harness.authz_service(
            workdir,
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            grpc_workers=str(args.workers),
        ) as service:
            if args.service_cpu is not None:
                pin(service.process.pid, args.service_cpu)
            target = service.grpc_target
            warm = time.monotonic() + 1
            await probe(target, key, 0.001, "warm", lambda: time.monotonic() > warm)
            rounds = []
            for number in range(args.rounds):
                rounds.append(await one_round(args, service, registry, key, number))
                report_round(args, number, rounds[-1])
                flood_server = flood_latencies(service, f"{TAGS['random-key flood']}{number}")
                print(
                    "  random-key flood checks as the service timed them: "
                    + ", ".join(
                        f"{reason} p50 {pct(times, 0.5):.2f} ms p99 {pct(times, 0.99):.2f} ms"
                        for reason, times in sorted(flood_server.items())
                    )
                )
    summary(rounds)


async def one_round(
    args: argparse.Namespace,
    service: harness.Service,
    registry: harness.RegistryProcess,
    key: str,
    number: int,
) -> Round:
    tags = {part: f"{tag}{number}" for part, tag in TAGS.items()}
    until = time.monotonic() + args.baseline_seconds
    alone = await probe(
        service.grpc_target,
        key,
        args.probe_interval,
        tags["baseline"],
        lambda: time.monotonic() > until,
    )
    floods = {}
    for part, keys in zip(PARTS[1:], (None, [key]), strict=True):
        floods[part] = await flooded(args, service, registry, key, keys=keys, tag=tags[part])
    probes = {"baseline": alone, **{part: found.probe for part, found in floods.items()}}
    harness.wait_until(
        lambda: all(
            len(server_latencies(service, tags[part])) == len(found.latencies)
            for part, found in probes.items()
        ),
        5,
        "the decision log",
    )
    return Round(probes, {part: server_latencies(service, tags[part]) for part in PARTS}, floods)


def report_round(args: argparse.Namespace, number: int, result: Round) -> None:
    if number == 0:
        print(
            f"authz-service (http, {args.workers} workers, "
            f"{'not pinned' if args.service_cpu is None else f'alone on core {args.service_cpu}'}"
            f", other settings default) -> registry (SQLite); a good key probed every "
            f"{args.probe_interval * 1000:g} ms; floods of {args.flood} checks at "
            f"{args.flood_rate:g}/s (at most {args.concurrency} in flight) from another process"
        )
    print(f"round {number + 1}")
    print(f"{'':30}{'checks':>8}{'p50 ms':>9}{'p99 ms':>9}{'server p50':>12}{'server p99':>12}")
    for part in PARTS:
        latencies, server = result.probes[part].latencies, result.server[part]
        print(
            f"  {part:28}{len(latencies):>8}{pct(latencies, 0.5):>9.2f}"
            f"{pct(latencies, 0.99):>9.2f}{pct(server, 0.5):>12.3f}{pct(server, 0.99):>12.3f}"
        )
    for part, found in result.floods.items():
        outcomes = found.outcome["reasons"]
        answered = sum(outcomes.values())
        checks = answered + len(found.probe.latencies)
        cpu = found.cpu["authz-service"]
        print(
            f"  {part}: {answered} answered in {found.outcome['seconds']:.2f} s "
            f"({answered / found.outcome['seconds']:.0f}/s), gRPC errors "
            f"{found.outcome['errors']}, outcomes {dict(sorted(outcomes.items()))}; "
            f"authz-service CPU {cpu:.2f} s = {cpu / max(checks, 1) * 1e6:.0f} µs per check "
            "of the flood or the probe ("
            + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(found.threads.items()))
            + ")"
        )
    junk = result.floods["random-key flood"]
    bound = COLD_LOOKUP_BURST + COLD_LOOKUP_RATE * junk.seconds
    print(
        f"  registry calls during the random-key flood: {dict(junk.calls)} "
        f"(cold-lookup bound {bound:.0f}); registry CPU {junk.cpu['registry']:.2f} s"
    )


def summary(rounds: list[Round]) -> None:
    def ratios(part: str) -> list[float]:
        return [
            pct(r.probes[part].latencies, 0.99) / pct(r.probes["baseline"].latencies, 0.99)
            for r in rounds
        ]

    junk, control = ratios("random-key flood"), ratios("cached-key flood (control)")
    print(
        f"good key p99 during the random-key flood / baseline, median of {len(rounds)} rounds: "
        f"{statistics.median(junk):.2f}x (rounds: {', '.join(f'{r:.2f}x' for r in junk)}; "
        "target: at most 3x)"
    )
    print(
        "good key p99 during the cached-key flood / baseline (the same rate of checks answered "
        f"from memory): {statistics.median(control):.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}x' for r in control)})"
    )
    probes = [found for r in rounds for found in r.probes.values()]
    print(
        f"good key errors {sum(p.errors for p in probes)}, denials "
        f"{sum(p.denied for p in probes)} (must be 0)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--flood", type=int, default=10_000, help="checks in each flood")
    parser.add_argument("--flood-rate", type=float, default=1000.0, help="flood checks a second")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="flood checks in flight at most"
    )
    parser.add_argument(
        "--workers", type=int, default=32, help="AUTHZ_GRPC_WORKERS (the default is 32)"
    )
    parser.add_argument(
        "--service-cpu",
        type=int,
        default=0 if len(os.sched_getaffinity(0)) > 1 else -1,
        help="the core authz-service has to itself, the others running everything else "
        "(-1: nothing pinned); default 0 with two cores or more",
    )
    parser.add_argument("--probe-interval", type=float, default=0.005, help="seconds")
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.service_cpu < 0:
        args.service_cpu = None
    with tempfile.TemporaryDirectory(prefix="authz-flood-") as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
