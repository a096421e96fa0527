"""A soak: mixed load through Envoy for minutes, with the registry down in the middle.

Not part of CI.

    .venv/bin/python benchmarks/soak.py [--minutes 5] [--rate 200]

The real client registry (SQLite), authz-service (AUTHZ_REGISTRY=http, default settings) and
Envoy with envoy/front-proxy.yaml run as processes on loopback, before an upstream that answers
at once. Requests go through Envoy at --rate per second: valid keys (80 %), keys revoked before
the load started (10 %) and random well-formed keys nobody registered (10 %). After a warm-up,
the load runs for --minutes; the registry is stopped for the middle minute (a third of the run,
if shorter) and started again on the same port and database.

Printed: per phase (before, during and after the outage), requests, errors (no answer, or an
answer that is not ours) and latency; wrong outcomes: an allow for a revoked or unknown key
(always wrong) and a deny for a valid key while the registry is up (target: 0); authz-service's
RSS after the warm-up and at the end (target: less than 5 % growth); whether the change feed
streams again once the registry is back and how long a revocation then takes to reach Envoy;
and whether the breaker closed again, with a key created after the outage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from authz_service import apikeys  # noqa: E402
from tests.e2e import harness  # noqa: E402

VALID_CLIENTS, REVOKED_CLIENTS = 50, 10
WARM_UP_SECONDS = 20.0
PHASES = ("before", "outage", "after")
STREAMING = 'authz_feed_mode{mode="streaming"}'


@dataclass
class Outcome:
    phase: str
    kind: str  # valid, revoked, unknown
    status: int  # 0: no answer
    reason: str | None  # our x-ext-authz-reason; None on an allow, or an answer not ours
    seconds: float
    sent_at: float  # wall-clock time

    @property
    def ours(self) -> bool:
        """The answer is authz-service's decision (a deny with its reason, or the upstream's)."""
        return self.status == 200 or self.reason is not None


@dataclass
class Lag:
    """How late things ran, sampled every 100 ms: this process's own event loop (is the
    machine starved?) and authz-service's /healthz, which its event loop answers."""

    own: list[tuple[float, float]] = field(default_factory=list)  # (wall-clock time, seconds)
    service: list[tuple[float, float]] = field(default_factory=list)


async def sample_lag(port: int, lag: Lag, until: Callable[[], bool]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not until():
            started = time.perf_counter()
            await asyncio.sleep(0.1)
            lag.own.append((time.time(), time.perf_counter() - started - 0.1))
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                await reply.read()
            lag.service.append((time.time(), time.perf_counter() - started))


@dataclass
class Load:
    """The keys the load draws from, and what it saw."""

    valid: list[str]
    revoked: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    phase: str = "warm-up"


Phase = tuple[str, float, dict[str, int], float]  # name, start, Envoy's counts, service CPU
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pct(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


def metrics(service: harness.Service) -> dict[str, float]:
    text = harness.send(service.http_port, "/metrics").body.decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def send(session: aiohttp.ClientSession, port: int, key: str) -> tuple[int, str | None]:
    """One request through Envoy: its status and our x-ext-authz-reason, if any."""
    async with session.get(
        f"http://127.0.0.1:{port}/orders", headers={"Authorization": f"ApiKey {key}"}
    ) as reply:
        await reply.read()
        return reply.status, reply.headers.get("x-ext-authz-reason")


async def drive(port: int, load: Load, rate: float, until: Callable[[], bool]) -> None:
    """Requests at ``rate`` per second (open loop) until ``until()``."""
    rng = random.Random(11)
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        pending: set[asyncio.Task[None]] = set()

        async def one(kind: str, key: str, phase: str) -> None:
            sent_at, started = time.time(), time.perf_counter()
            try:
                status, reason = await send(session, port, key)
            except (aiohttp.ClientError, TimeoutError):
                status, reason = 0, None
            seconds = time.perf_counter() - started
            load.outcomes.append(Outcome(phase, kind, status, reason, seconds, sent_at))

        next_at = loop.time()
        while not until():
            draw = rng.random()
            if draw < 0.8:
                kind, key = "valid", rng.choice(load.valid)
            elif draw < 0.9:
                kind, key = "revoked", rng.choice(load.revoked)
            else:
                kind, key = "unknown", apikeys.generate()
            task = asyncio.create_task(one(kind, key, load.phase))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*pending)


def until_denied(proxy: harness.Envoy, key: str, within: float = 10.0) -> float | None:
    """Seconds until a request with ``key`` is denied through Envoy (None: not within)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if harness.send(proxy.port, "/orders", [("Authorization", f"ApiKey {key}")]).status != 200:
            return time.monotonic() - started
        time.sleep(0.01)
    return None


@contextlib.contextmanager
def upstream() -> Iterator[int]:
    """An upstream that answers 200 at once, in one write, on a socket without Nagle's delay
    (http.server's two writes would otherwise add a delayed ACK, ~40 ms, to every request)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        def log_message(self, *args: object) -> None:
            pass

    with harness.serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield port


def until_allowed(proxy: harness.Envoy, key: str, within: float = 30.0) -> float | None:
    """Seconds until a request with ``key`` is allowed through Envoy (None: not within)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if harness.send(proxy.port, "/orders", [("Authorization", f"ApiKey {key}")]).status == 200:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def envoy_ext_authz_stats(proxy: harness.Envoy) -> dict[str, int]:
    """Envoy's own count of check outcomes (ok, denied, error, timeout, ...)."""
    text = harness.send(proxy.admin_port, "/stats?filter=ext_authz").body.decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("http.ingress.ext_authz.") and value.isdigit() and int(value):
            found[name.removeprefix("http.ingress.ext_authz.")] = int(value)
    return found


def service_events(service: harness.Service, phases: list[Phase]) -> dict[str, Counter[str]]:
    """The service's log lines other than decisions, at warning level or above, by phase and
    event."""
    events: dict[str, Counter[str]] = {}
    for line in service.logs().split("\n"):
        if '"event": "decision"' in line or not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("level") not in ("warning", "error", "critical"):
            continue
        at = datetime.fromisoformat(record["ts"]).timestamp()
        phase = next((name for name, began, *_ in reversed(phases) if at >= began), "warm-up")
        events.setdefault(phase, Counter())[str(record.get("event"))] += 1
    return events


class Registry:
    """The client registry, which the soak stops and starts again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self._workdir, self._port = workdir, harness.free_port()
        self._running: contextlib.AbstractContextManager[harness.RegistryProcess] | None = None

    def start(self) -> harness.RegistryProcess:
        self._running = harness.registry_process(self._workdir, port=self._port)
        return self._running.__enter__()

    def stop(self) -> None:
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = None


@dataclass
class Stack:
    registry: Registry
    source: harness.RegistryProcess
    service: harness.Service
    proxy: harness.Envoy
    load: Load
    clients: list[dict[str, Any]]  # the valid keys' clients, in load.valid's order
    phases: list[Phase] = field(default_factory=list)

    def begin(self, phase: str) -> None:
        """Switch the load to ``phase``; note when, Envoy's counts so far and the CPU time
        authz-service has used."""
        self.load.phase = phase
        counts = envoy_ext_authz_stats(self.proxy)
        self.phases.append((phase, time.time(), counts, cpu_seconds(self.service.process.pid)))

    async def metric(self, name: str) -> float | None:
        return (await asyncio.to_thread(metrics, self.service)).get(name)

    async def revoke_one(self) -> float | None:
        """Revoke a key the load uses; return how long until Envoy denies it."""
        client = self.clients.pop()
        key = self.load.valid.pop()
        await asyncio.to_thread(
            self.source.admin, "DELETE", f"/clients/{client['client_id']}/api-key"
        )
        took = await asyncio.to_thread(until_denied, self.proxy, key)
        self.load.revoked.append(key)
        return took

    async def outage(self, seconds: float, report: dict[str, Any]) -> None:
        """Stop the registry for ``seconds``, noting the breaker's states meanwhile; start it
        again and note how long the feed takes to stream again."""
        await asyncio.to_thread(self.registry.stop)
        self.begin("outage")
        seen: set[float | None] = set()
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            seen.add(await self.metric("authz_registry_circuit_state"))
            await asyncio.sleep(min(1.0, max(0.0, ends - time.monotonic())))
        report["breaker_during"] = seen
        self.source = await asyncio.to_thread(self.registry.start)
        self.begin("after")
        back = time.monotonic()
        report["revocation_on_return"] = await self.revoke_one()
        while await self.metric(STREAMING) != 1:  # noqa: ASYNC110 (another process's state)
            await asyncio.sleep(0.05)
        report["feed_back_after"] = time.monotonic() - back


@contextlib.asynccontextmanager
async def started(workdir: Path) -> AsyncIterator[Stack]:
    """The registry (with its clients), authz-service, an upstream and Envoy."""
    registry = Registry(workdir)
    with contextlib.ExitStack() as processes:
        processes.callback(registry.stop)
        source = registry.start()
        valid = [source.create_client(f"Valid {n}") for n in range(VALID_CLIENTS)]
        revoked = [source.create_client(f"Revoked {n}") for n in range(REVOKED_CLIENTS)]
        for client in revoked:
            source.admin("DELETE", f"/clients/{client['client_id']}/api-key")
        service = processes.enter_context(
            harness.authz_service(
                workdir,
                registry="http",
                registry_url=source.url,
                registry_token=source.service_token(),
            )
        )
        upstream_port = processes.enter_context(upstream())
        config = harness.render_front_proxy(
            harness.free_port(), harness.free_port(), service, upstream_port
        )
        proxy = processes.enter_context(harness.envoy(workdir, config))
        load = Load([c["api_key"] for c in valid], [c["api_key"] for c in revoked])
        yield Stack(registry, source, service, proxy, load, valid)


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    total = args.minutes * 60
    outage = min(60.0, total / 3)
    async with started(workdir) as stack:
        load, pid = stack.load, stack.service.process.pid
        warm_until = time.monotonic() + WARM_UP_SECONDS
        await drive(stack.proxy.port, load, args.rate, lambda: time.monotonic() > warm_until)
        load.outcomes.clear()
        report: dict[str, Any] = {"rss_start": rss_mib(pid), "outage": outage, "total": total}
        report["revocation_before"] = await stack.revoke_one()

        ends = time.monotonic() + total
        stack.begin("before")
        lag = Lag()
        sampling = asyncio.create_task(
            sample_lag(stack.service.http_port, lag, lambda: time.monotonic() > ends)
        )
        driving = asyncio.create_task(
            drive(stack.proxy.port, load, args.rate, lambda: time.monotonic() > ends)
        )
        await asyncio.sleep((total - outage) / 2)
        await stack.outage(outage, report)
        newcomer = await asyncio.to_thread(stack.source.create_client, "After the outage")
        report["new_key_after"] = await asyncio.to_thread(
            until_allowed, stack.proxy, newcomer["api_key"]
        )
        report["revocation_after"] = await stack.revoke_one()
        await driving
        await sampling
        report["lag"] = lag
        report["rss_end"] = rss_mib(pid)
        report["breaker_end"] = await stack.metric("authz_registry_circuit_state")
        report["feed_end"] = await stack.metric(STREAMING)
        report["outcomes"] = load.outcomes
        final = await asyncio.to_thread(metrics, stack.service)
        report["slow_checks"] = final["authz_check_duration_seconds_count"] - final.get(
            'authz_check_duration_seconds_bucket{le="0.25"}', 0
        )
        stack.begin("end")
        report["phases"] = stack.phases
        report["events"] = service_events(stack.service, stack.phases)
    return report


def print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    outcomes: list[Outcome] = report["outcomes"]
    print(
        f"soak: {report['total'] / 60:g} min through Envoy at {args.rate:g} requests/s "
        f"(80 % valid, 10 % revoked, 10 % unknown keys), the registry down for "
        f"{report['outage']:.0f} s in the middle"
    )
    print(f"{'phase':10}{'requests':>10}{'errors':>8}{'wrong':>7}{'p50 ms':>9}{'p99 ms':>9}")
    wrong: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for phase in PHASES:
        rows = [o for o in outcomes if o.phase == phase]
        phase_errors = phase_wrong = 0
        for o in rows:
            if not o.ours:
                errors[f"{phase}: HTTP {o.status or 'no answer'} for a {o.kind} key"] += 1
                phase_errors += 1
            elif o.kind in ("revoked", "unknown") and o.status == 200:
                wrong[f"{phase}: allowed a {o.kind} key"] += 1
                phase_wrong += 1
            elif o.kind == "valid" and o.status != 200 and phase != "outage":
                wrong[f"{phase}: denied a valid key ({o.reason})"] += 1
                phase_wrong += 1
        seconds = [o.seconds for o in rows]
        print(
            f"{phase:10}{len(rows):>10}{phase_errors:>8}{phase_wrong:>7}"
            f"{pct(seconds, 0.5):>9.2f}{pct(seconds, 0.99):>9.2f}"
        )
    outage_valid = Counter(
        o.status for o in outcomes if o.phase == "outage" and o.kind == "valid" and o.ours
    )
    print(f"wrong outcomes: {sum(wrong.values())} (target 0) {dict(wrong)}")
    print(f"errors (an answer not authz-service's): {sum(errors.values())} {dict(errors)}")
    print(f"valid keys during the outage, by status: {dict(outage_valid)}")
    phases = report["phases"]
    for (phase, began, counts, cpu), (_, ended, later, cpu_later) in itertools.pairwise(phases):
        envoy = {name: later[name] - counts.get(name, 0) for name in later}
        events = dict(report["events"].get(phase, {}))
        print(f"{phase}: Envoy's check outcomes {envoy}; service warnings and errors {events}")
        requests = sum(1 for o in outcomes if o.phase == phase)
        print(
            f"  authz-service CPU {cpu_later - cpu:.1f} s over {ended - began:.0f} s: "
            f"{(cpu_later - cpu) / max(requests, 1) * 1e6:.0f} µs per request"
        )
        failed = [o.sent_at - began for o in outcomes if o.phase == phase and not o.ours]
        if failed:
            print(f"  its errors were sent from +{min(failed):.1f} s to +{max(failed):.1f} s")
        lag: Lag = report["lag"]
        own = [seconds for at, seconds in lag.own if began <= at < ended]
        service = [seconds for at, seconds in lag.service if began <= at < ended]
        print(
            f"  lag: this process's event loop p99 {pct(own, 0.99):.0f} ms, max "
            f"{max(own, default=0) * 1000:.0f} ms; authz-service's /healthz p99 "
            f"{pct(service, 0.99):.0f} ms, max {max(service, default=0) * 1000:.0f} ms"
        )
    print(
        f"checks the service itself took over 250 ms (Envoy's timeout) for: "
        f"{report['slow_checks']:.0f}"
    )
    growth = (report["rss_end"] / report["rss_start"] - 1) * 100
    print(
        f"authz-service RSS: {report['rss_start']:.1f} MiB after the warm-up, "
        f"{report['rss_end']:.1f} MiB at the end ({growth:+.1f} %, target below +5 %)"
    )

    def took(seconds: float | None) -> str:
        return "not within the wait" if seconds is None else f"{seconds * 1000:.0f} ms"

    print(
        f"feed: streaming again {report['feed_back_after']:.2f} s after the registry returned "
        f"(streaming at the end: {report['feed_end'] == 1}); a revocation took "
        f"{took(report['revocation_before'])} to reach Envoy before the outage, "
        f"{took(report['revocation_on_return'])} when made as the registry returned, "
        f"{took(report['revocation_after'])} once the feed streamed again"
    )
    states = {0.0: "closed", 1.0: "open", 2.0: "half-open", None: "?"}
    during = "/".join(sorted(states[state] for state in report["breaker_during"]))
    print(
        f"breaker: {during} during the outage, "
        f"{states[report['breaker_end']]} at the end; a key created after the outage "
        f"was allowed after {took(report['new_key_after'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the measured load")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="authz-soak-") as workdir:
        report = asyncio.run(soak(args, Path(workdir)))
    print_report(args, report)


if __name__ == "__main__":
    main()
