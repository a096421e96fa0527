"""The registry and authz-service at scale (issue 15), every scenario in one run, with its
target beside it.

    .venv/bin/python benchmarks/scale_bench.py [--keys 1000000] [--quick] [--only NAME,...]

Data is bulk-inserted straight into the database (COPY for PostgreSQL, one transaction for
SQLite), never through the API: --keys keys across --keys/5 clients, with a full change log.
PostgreSQL is a private server started for the run (as the tests start theirs), or
--postgres-url. Each registry is a `client-registry serve` process of its own, so its CPU and
RSS are its own; the load comes from this process. Scenarios (--only picks some):

- snapshot: the streamed snapshot (NDJSON) and the JSON document of 100k and --keys keys:
  time to the first byte and to the first entry, total time, the registry's peak RSS and the
  slowest /healthz answer meanwhile; and a 304 with the current ETag.
- verify: POST /v1/keys/verify p50/p99 at 500 requests/s, open loop, against SQLite and
  PostgreSQL, in rounds alternating between no streams and 300 idle streams (the median round,
  and the range); how late this process sent the requests is shown beside them.
- idle: database statements/s (pg_stat_statements) and registry CPU with 0, 100 and 300 idle
  change streams on PostgreSQL.
- revocation: from sending a revocation until each of 300 streams has it, p50/p99/max, through
  the registry serving the streams and through another registry process (LISTEN/NOTIFY).
- capacity: the registry's RSS, idle CPU and revocation p99 with 300, 1000 and 2000 streams.
- authz: authz-service itself (benchmarks/memory_bench.py): snapshot mode end to end at 100k and
  --keys keys (time to ready, peak and steady RSS, reloads), and the http-mode cache's bytes per
  key.

--quick: 100k keys, shorter windows, one round. Not in CI: tests/registry/test_feed_and_snapshot.py
runs each registry scenario at small size, and tests/e2e/test_snapshot_scale.py the authz one,
for correctness only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from client_registry.db import Database  # noqa: E402 (after the path is set)
from tests.registry.postgres import create_database, postgres_server  # noqa: E402

ADMIN = "scale-admin-token-0123456789abcdef"
SERVICE = "scale-service-token-0123456789abcdef"
KEYS_PER_CLIENT = 5
CHANGE_LOG_ROWS = 100_000  # the registry's default REGISTRY_CHANGE_MAX_ROWS
RATE = 500  # verifications per second
STREAMS = 300
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- results ---------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    figure: str
    value: float
    unit: str
    target: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    postgres: str  # an admin URL without a database name
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    _datasets: dict[tuple[str, int], str] = field(default_factory=dict)
    _victims: dict[str, Iterator[int]] = field(default_factory=dict)

    def report(self, scenario: str, figure: str, value: float, unit: str, target: str = "") -> None:
        row = Row(scenario, figure, value, unit, target)
        self.rows.append(row)
        print(f"  {figure:<58} {value:>10.1f} {unit:<8} {target}", flush=True)

    def victims(self, url: str) -> Iterator[int]:
        """Clients of a dataset not revoked yet, from the last one down (verify's keys are
        random, so it runs before any revocation)."""
        if url not in self._victims:
            keys = next(n for (_, n), known in self._datasets.items() if known == url)
            self._victims[url] = iter(range(max(1, keys // KEYS_PER_CLIENT) - 1, 0, -1))
        return self._victims[url]

    def dataset(self, dialect: str, keys: int) -> str:
        """A database URL holding ``keys`` keys (made once per run)."""
        if (dialect, keys) not in self._datasets:
            started = time.monotonic()
            if dialect == "postgresql":
                url = create_database(self.postgres, f"scale_{keys}_{os.getpid()}")
                fill_postgresql(url, keys)
            else:
                url = f"sqlite:///{self.workdir / f'scale_{keys}.db'}"
                fill_sqlite(url, keys)
            print(
                f"  ({dialect}: {keys:,} keys generated in {time.monotonic() - started:.1f} s)",
                flush=True,
            )
            self._datasets[dialect, keys] = url
        return self._datasets[dialect, keys]


# --- data ------------------------------------------------------------------------------------
def key(n: int) -> str:
    return f"azk_scale{n:023d}"


def key_hash(n: int) -> str:
    return hashlib.sha256(key(n).encode()).hexdigest()


def client_id(n: int) -> str:
    return f"cl_{n:016x}"


def rows(keys: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every row of a registry of ``keys`` keys, table by table (the last changes logged)."""
    now = time.time()
    clients = max(1, keys // KEYS_PER_CLIENT)
    for c in range(clients):
        yield "clients", (client_id(c), f"Client {c}", "ops@example.com", '["reader"]', "active")
    for k in range(keys):
        yield "api_keys", (key_hash(k), f"{k:012x}", client_id(k % clients), now)
    for k in range(max(0, keys - CHANGE_LOG_ROWS), keys):
        c = k % clients
        entry = {
            "key_hash": key_hash(k),
            "key_id": f"{k:012x}",
            "valid_until": None,
            "client": {
                "client_id": client_id(c),
                "client_name": f"Client {c}",
                "roles": ["reader"],
                "status": "active",
            },
        }
        payload = {"op": "upsert", "key_hash": key_hash(k), "entry": entry}
        yield "changes", (now, json.dumps(payload, sort_keys=True))


COLUMNS = {
    "clients": "client_id, name, email, roles, status, created_at, updated_at",
    "api_keys": "key_hash, key_id, client_id, created_at",
    "changes": "at, payload",
}


def tables(keys: int) -> Iterator[tuple[str, Iterator[tuple[Any, ...]]]]:
    now = time.time()
    for name, group in itertools.groupby(rows(keys), key=lambda item: item[0]):
        yield name, ((*row, now, now) if name == "clients" else row for _, row in group)


def fill_postgresql(url: str, keys: int) -> None:
    import psycopg  # noqa: PLC0415

    Database(url).migrate()
    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        for name, table in tables(keys):
            with cursor.copy(f"COPY {name} ({COLUMNS[name]}) FROM STDIN") as copy:
                lines = []
                for row in table:
                    lines.append("\t".join(map(str, row)) + "\n")
                    if len(lines) == 10_000:
                        copy.write("".join(lines))
                        lines = []
                copy.write("".join(lines))
        connection.commit()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
        connection.execute("CHECKPOINT")  # not in the middle of a measurement


def fill_sqlite(url: str, keys: int) -> None:
    import sqlite3  # noqa: PLC0415

    path = url.removeprefix("sqlite:///")
    Path(path).unlink(missing_ok=True)
    Database(url).migrate()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        for name, table in tables(keys):
            marks = ", ".join("?" * len(COLUMNS[name].split(",")))
            connection.executemany(
                f"INSERT INTO {name} ({COLUMNS[name]}) VALUES ({marks})",  # noqa: S608
                table,
            )
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
    finally:
        connection.close()


# --- registry processes ----------------------------------------------------------------------
@dataclass
class Registry:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def registry(bench: Bench, url: str, **settings: str) -> Iterator[Registry]:
    """`client-registry serve` on a port of its choosing, until the block ends."""
    env = {
        **os.environ,
        "REGISTRY_ADDRESS": "127.0.0.1:0",
        "REGISTRY_DATABASE_URL": url,
        "REGISTRY_ADMIN_TOKEN": ADMIN,
        "REGISTRY_SERVICE_TOKEN": SERVICE,
        "REGISTRY_LOG_LEVEL": "info",  # the serving line names the port
        **{f"REGISTRY_{name.upper()}": value for name, value in settings.items()},
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "client_registry", "serve"],
        cwd=bench.workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        log = process.stderr
        if log is None:
            raise RuntimeError("no pipe from the registry")
        port = None
        for line in log:
            record = json.loads(line)
            if record.get("event") == "serving":
                port = int(record["port"])
                break
        if port is None:
            raise RuntimeError(f"the registry did not start (exit status {process.wait()})")
        threading.Thread(target=log.read, daemon=True).start()  # keep it drained
        yield Registry(process, port)
    finally:
        process.terminate()
        process.wait(30)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


# --- a lean HTTP/1.1 client (the load must cost this process little) --------------------------
class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=2**20))

    async def request(
        self, method: str, path: str, token: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: registry\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


class Stream:
    """One change stream, read in the background: when each event id arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer.write(
            f"GET /v1/changes/stream HTTP/1.1\r\nHost: registry\r\n"
            f"Authorization: Bearer {SERVICE}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if int(head[9:12]) != 200:
            raise RuntimeError(f"stream refused: {head[:12]!r}")
        self._task = asyncio.create_task(self._read(reader))
        await self.ready.wait()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if line.startswith(b"id: "):
                self.arrivals[int(line[4:])] = time.monotonic()
                self.ready.set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


@contextlib.asynccontextmanager
async def streams(port: int, count: int) -> Any:
    opened = [Stream() for _ in range(count)]
    try:
        for batch in range(0, count, 50):
            await asyncio.gather(*(s.open(port) for s in opened[batch : batch + 50]))
        yield opened
    finally:
        for stream in opened:
            stream.close()


def expect(condition: bool, problem: str) -> None:
    if not condition:
        raise RuntimeError(problem)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --- scenario: snapshot ----------------------------------------------------------------------
@dataclass
class Download:
    status: int = 0
    headers_s: float = 0.0
    first_byte_s: float = 0.0
    first_entry_s: float = 0.0
    total_s: float = 0.0
    megabytes: float = 0.0
    lines: int = 0


def download(port: int, accept: str | None, etag: str | None = None) -> Download:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {SERVICE}"}
    if accept:
        headers["Accept"] = accept
    if etag:
        headers["If-None-Match"] = etag
    result = Download()
    started = time.monotonic()
    connection.request("GET", "/v1/snapshot", headers=headers)
    reply = connection.getresponse()
    result.status, result.headers_s = reply.status, time.monotonic() - started
    size = 0
    while piece := reply.read1(1 << 20):
        now = time.monotonic() - started
        if not size:
            result.first_byte_s = now
        size += len(piece)
        result.lines += piece.count(b"\n")
        if not result.first_entry_s and (result.lines >= 2 or b'"key_hash"' in piece):
            result.first_entry_s = now
    result.total_s, result.megabytes = time.monotonic() - started, size / 1e6
    connection.close()
    return result


# Asks for /healthz every 20 ms until its stdin closes, then prints the slowest answer (s). A
# process of its own, so that this one's work is not counted as the registry's delay.
PROBE = """
import http.client, sys, threading, time
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
slowest = 0.0
while not done.wait(0.02):
    started = time.monotonic()
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    slowest = max(slowest, time.monotonic() - started)
print(slowest)
"""


class Watch:
    """While a block runs: the registry's peak RSS, and the slowest /healthz answer."""

    def __init__(self, target: Registry) -> None:
        self._target = target
        self.peak_rss = rss_mib(target.pid)
        self.slowest_health = 0.0
        self._done = threading.Event()

    def __enter__(self) -> Watch:
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        self._probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(self._target.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._sampler.join()
        answer = self._probe.communicate(timeout=60)[0]
        self.slowest_health = float(answer)

    def _sample_rss(self) -> None:
        while not self._done.wait(0.01):
            self.peak_rss = max(self.peak_rss, rss_mib(self._target.pid))


async def snapshot_scenario(bench: Bench) -> None:
    sizes = sorted({min(100_000, bench.args.keys), bench.args.keys})
    cases = [("postgresql", n) for n in sizes] + [("sqlite", bench.args.keys)]
    for dialect, keys in cases:
        url = bench.dataset(dialect, keys)
        with registry(bench, url) as target:
            idle_rss = rss_mib(target.pid)
            for form, accept in (("NDJSON", "application/x-ndjson"), ("JSON", None)):
                with Watch(target) as watch:
                    got = await asyncio.to_thread(download, target.port, accept)
                expect(got.status == 200, f"snapshot answered {got}")
                name = f"snapshot {form}, {dialect}, {keys:,} keys"
                bench.report(
                    "snapshot",
                    f"{name}: first byte",
                    got.first_byte_s * 1e3,
                    "ms",
                    "<= 1000 ms" if form == "NDJSON" else "",
                )
                bench.report("snapshot", f"{name}: first entry", got.first_entry_s * 1e3, "ms")
                bench.report(
                    "snapshot", f"{name}: total ({got.megabytes:.0f} MB)", got.total_s, "s"
                )
                bench.report(
                    "snapshot",
                    f"{name}: registry peak RSS (idle {idle_rss:.0f})",
                    watch.peak_rss,
                    "MiB",
                    "<= 256 MiB",
                )
                bench.report(
                    "snapshot",
                    f"{name}: slowest /healthz meanwhile",
                    watch.slowest_health * 1e3,
                    "ms",
                    "<= 50 ms",
                )
            etag = f'"v{await current_version(target.port)}"'
            unchanged = await asyncio.to_thread(download, target.port, None, etag)
            expect(unchanged.status == 304, f"If-None-Match answered {unchanged}")
            bench.report(
                "snapshot",
                f"304 with the current ETag, {dialect}, {keys:,} keys",
                unchanged.total_s * 1e3,
                "ms",
            )


async def current_version(port: int) -> int:
    connection = await Connection.open(port)
    try:
        status, body = await connection.request("GET", "/v1/changes", SERVICE)
    finally:
        connection.close()
    expect(status == 200, f"/v1/changes answered {status}")
    return int(json.loads(body)["current_version"])


# --- scenario: verify ------------------------------------------------------------------------
@dataclass
class Load:
    latencies: list[float]  # from sending a request to its whole answer
    lateness: list[float]  # from when a request was due to when it was sent
    failures: int = 0  # answers other than "valid" (503 when the registry is overwhelmed)


async def open_loop(port: int, keys: int, seconds: float) -> Load:
    """Verify random keys at RATE per second for ``seconds``, open loop: a request is sent when
    it is due, whether or not earlier ones were answered (on a new connection if no idle one
    is left), so a slow registry cannot slow the load down. How late this process sent them
    (its timer granularity and the shared machine) is reported beside the latencies."""
    idle: list[Connection] = []
    load = Load([], [])

    async def one(due: float, n: int) -> None:
        sent = time.monotonic()
        load.lateness.append(sent - due)
        connection = idle.pop() if idle else await Connection.open(port)
        body = json.dumps({"api_key": key(n)}).encode()
        status, answer = await connection.request("POST", "/v1/keys/verify", SERVICE, body)
        load.latencies.append(time.monotonic() - sent)
        idle.append(connection)
        if status != 200 or b'"valid": true' not in answer:
            load.failures += 1

    rng = random.Random(7)
    tasks = []
    start = time.monotonic() + 0.05
    total = int(RATE * seconds)
    sent = 0
    while sent < total:
        now = time.monotonic()
        while sent < total and start + sent / RATE <= now:  # all that are due, at once
            tasks.append(asyncio.create_task(one(start + sent / RATE, rng.randrange(keys))))
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / RATE - time.monotonic()))
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    return load


async def verify_scenario(bench: Bench) -> None:
    """Rounds alternate between no streams and STREAMS idle streams, and the median round is
    reported with the range, so that the shared machine's drift shows and cancels out."""
    keys, seconds, rounds = bench.args.keys, bench.args.seconds, bench.args.rounds
    for dialect in ("sqlite", "postgresql"):
        url = bench.dataset(dialect, keys)
        quiet: list[Load] = []
        busy: list[Load] = []
        with registry(bench, url) as target:
            await open_loop(target.port, keys, 1.0)  # warm-up: connections, prepared plans
            for _ in range(rounds):
                quiet.append(await open_loop(target.port, keys, seconds))
                async with streams(target.port, STREAMS):
                    busy.append(await open_loop(target.port, keys, seconds))
        for label, loads in (("no streams", quiet), (f"{STREAMS} idle streams", busy)):
            name = f"verify, {dialect}, {keys:,} keys, {RATE}/s, {label}"
            for share, figure in ((0.5, "p50"), (0.99, "p99")):
                values = sorted(percentile(load.latencies, share) * 1e3 for load in loads)
                target_text = "<= 5 ms" if dialect == "postgresql" and share == 0.99 else ""
                bench.report(
                    "verify",
                    f"{name}: {figure} ({values[0]:.1f}-{values[-1]:.1f})",
                    statistics.median(values),
                    "ms",
                    target_text,
                )
            late = statistics.median(percentile(load.lateness, 0.99) * 1e3 for load in loads)
            bench.report("verify", f"{name}: (requests sent late by, p99)", late, "ms")
            failed = sum(load.failures for load in loads)
            bench.report("verify", f"{name}: answers other than valid", failed, "", "<= 0")
        ratios = [
            percentile(b.latencies, 0.99) / percentile(q.latencies, 0.99)
            for q, b in zip(quiet, busy, strict=True)
        ]
        bench.report(
            "verify",
            f"verify, {dialect}: p99 with / without streams, per round "
            f"({min(ratios):.2f}-{max(ratios):.2f})",
            statistics.median(ratios),
            "x",
        )


# --- scenario: idle streams --------------------------------------------------------------------
def statements(url: str) -> float:
    """Statements the registry's database has run (pg_stat_statements), less this query."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT LIKE '%pg_stat_statements%'"
        ).fetchone()
    return float(row[0]) if row else 0.0


async def idle_scenario(bench: Bench) -> None:
    import psycopg  # noqa: PLC0415

    url = bench.dataset("postgresql", bench.args.keys)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    window = bench.args.seconds * 2
    with registry(bench, url) as target:
        for count in (0, 100, STREAMS):
            async with streams(target.port, count):
                await asyncio.sleep(1.0)  # let the opening settle
                queries, cpu = statements(url), cpu_seconds(target.pid)
                await asyncio.sleep(window)
                rate = (statements(url) - queries) / window
                busy = (cpu_seconds(target.pid) - cpu) / window * 100
            bench.report(
                "idle",
                f"database statements/s, {count} idle streams",
                rate,
                "/s",
                "<= 5/s" if count == STREAMS else "",
            )
            bench.report(
                "idle",
                f"registry CPU, {count} idle streams",
                busy,
                "%",
                "<= 5 %" if count == STREAMS else "",
            )


# --- scenario: revocation ----------------------------------------------------------------------
async def revocations(
    bench: Bench, served: Registry, writer: Registry, opened: list[Stream], victims: Iterator[int]
) -> list[float]:
    """Revoke clients one at a time through ``writer``; for each revocation and each stream
    (served by ``served``), the time from sending it until that stream had it."""
    admin = await Connection.open(writer.port)
    latencies = []
    try:
        for _ in range(bench.args.revocations):
            before = await current_version(served.port)
            sent = time.monotonic()
            status, _ = await admin.request(
                "DELETE", f"/clients/{client_id(next(victims))}/api-key", ADMIN
            )
            expect(status == 204, f"revocation answered {status}")
            after = await current_version(served.port)
            expect(after > before, "the revocation logged no change")
            async with asyncio.timeout(10):
                # Polling is fine here: arrival times are taken by the readers.
                while not all(after in s.arrivals for s in opened):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            latencies += [s.arrivals[after] - sent for s in opened]
            await asyncio.sleep(0.1)
    finally:
        admin.close()
    return latencies


async def revocation_scenario(bench: Bench) -> None:
    url = bench.dataset("postgresql", bench.args.keys)
    victims = bench.victims(url)
    with registry(bench, url) as served, registry(bench, url) as other:
        async with streams(served.port, STREAMS) as opened:
            for label, writer in (("the same registry", served), ("another registry", other)):
                latencies = await revocations(bench, served, writer, opened, victims)
                name = f"revocation to {STREAMS} streams, through {label}"
                bench.report("revocation", f"{name}: p50", percentile(latencies, 0.5) * 1e3, "ms")
                bench.report(
                    "revocation",
                    f"{name}: p99",
                    percentile(latencies, 0.99) * 1e3,
                    "ms",
                    "<= 100 ms",
                )
                bench.report("revocation", f"{name}: max", max(latencies) * 1e3, "ms")


# --- scenario: capacity ------------------------------------------------------------------------
async def capacity_scenario(bench: Bench) -> None:
    """What one registry process holds: RSS, idle CPU and revocation latency by stream count
    (the default REGISTRY_MAX_FEED_SUBSCRIBERS comes from here)."""
    url = bench.dataset("postgresql", bench.args.keys)
    victims = bench.victims(url)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16_384)), hard))
    with registry(bench, url, max_feed_subscribers="10000") as served:
        idle_rss = rss_mib(served.pid)
        for count in (300, 1000, 2000):
            async with streams(served.port, count) as opened:
                await asyncio.sleep(1.0)
                rss, cpu = rss_mib(served.pid), cpu_seconds(served.pid)
                await asyncio.sleep(bench.args.seconds)
                busy = (cpu_seconds(served.pid) - cpu) / bench.args.seconds * 100
                latencies = await revocations(bench, served, served, opened, victims)
            name = f"{count} streams"
            bench.report("capacity", f"{name}: registry RSS (idle {idle_rss:.0f})", rss, "MiB")
            bench.report("capacity", f"{name}: registry CPU while idle", busy, "%")
            bench.report(
                "capacity",
                f"{name}: revocation p99",
                percentile(latencies, 0.99) * 1e3,
                "ms",
            )


async def authz_scenario(bench: Bench) -> None:
    """authz-service at this size: snapshot mode end to end (a real service loading a streamed
    snapshot: time to ready, peak and steady RSS, a reload), and the http-mode cache's bytes
    per key, from benchmarks/memory_bench.py in a process of its own."""
    sizes = sorted({min(100_000, bench.args.keys), bench.args.keys})
    command = [sys.executable, str(HERE / "memory_bench.py"), "--scenarios", "service", "cache"]
    command += ["--json", "--checks", "2000", "--sizes", *map(str, sizes)]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    expect(done.returncode == 0, f"memory_bench.py failed: {done.stderr[-2000:]}")
    results = json.loads(done.stdout)
    for row in results["service"]:
        keys, at_target = row["keys"], row["keys"] >= 1_000_000
        bench.report(
            "authz",
            f"{keys} keys: snapshot mode ready",
            row["ready_s"],
            "s",
            "<= 20 s" if at_target else "",
        )
        peak = max(row["peak_mib"], row["reload_same"]["peak_mib"])
        bench.report(
            "authz",
            f"{keys} keys: peak RSS (load, reload of the same keys)",
            peak,
            "MiB",
            "<= 384 MiB" if at_target else "",
        )
        bench.report(
            "authz",
            f"{keys} keys: steady RSS",
            row["steady_mib"],
            "MiB",
            "<= 256 MiB" if at_target else "",
        )
        bench.report(
            "authz",
            f"{keys} keys: peak RSS, a reload with every key new",
            row["reload_replaced"]["peak_mib"],
            "MiB",
        )
    for row in results["cache"]:
        bench.report(
            "authz", f"{row['keys']} keys: http-mode cache per key", row["bytes_per_key"], "B"
        )


SCENARIOS: dict[str, Callable[[Bench], Coroutine[Any, Any, None]]] = {
    "authz": authz_scenario,
    "snapshot": snapshot_scenario,
    "verify": verify_scenario,
    "idle": idle_scenario,
    "revocation": revocation_scenario,
    "capacity": capacity_scenario,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, help="keys in the registry (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100k keys, shorter windows")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument(
        "--postgres-url",
        help="a PostgreSQL server (URL without a database) "
        "whose user may create databases; it needs pg_stat_statements preloaded",
    )
    args = parser.parse_args()
    args.keys = args.keys or (100_000 if args.quick else 1_000_000)
    args.seconds = 3.0 if args.quick else 5.0
    args.revocations = 5 if args.quick else 20
    args.rounds = 1 if args.quick else 3
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    print(f"{' '.join([Path(sys.executable).name, *sys.argv])}  ({os.cpu_count()} cores)")
    with contextlib.ExitStack() as stack:
        postgres = args.postgres_url or stack.enter_context(
            postgres_server(["shared_preload_libraries=pg_stat_statements"])
        )
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-bench-")))
        bench = Bench(args, postgres.rstrip("/"), workdir)
        for name in chosen:
            print(f"\n{name}")
            asyncio.run(SCENARIOS[name](bench))
    missed = [row for row in bench.rows if row.target and not meets(row)]
    print(f"\n{len(missed)} target(s) missed" + "".join(f"\n  {r.figure}" for r in missed))


def meets(row: Row) -> bool:
    limit = float(row.target.split()[1].rstrip("/s"))
    return row.value <= limit


if __name__ == "__main__":
    main()
