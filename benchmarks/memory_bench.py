"""Memory, load time and lookups of snapshot mode at a million keys, end to end, in one run.

    .venv/bin/python benchmarks/memory_bench.py [--sizes 100000 1000000]
        [--scenarios service store layouts] [--checks 10000] [--json]

Snapshots are generated in the contract's form (tests/e2e/stand_in_registry.py): five keys per
client, clients like ``cl_`` + 16 hex with 1-3 roles from a small set, 1% of keys with a
``valid_until``; a client's keys are spread over the whole snapshot.

service (the headline figures): for each size, a real ``authz-service serve`` in
``AUTHZ_REGISTRY=snapshot`` mode loads the snapshot streamed as NDJSON by a stand-in registry
(a thread of this process), which also serves an empty change log and a change stream that
only stays open. Measured on the service process (wall seconds depend on what else the
machine runs; its CPU seconds, from /proc, much less):

- ready: seconds from starting the process to /readyz answering 200 (imports, start-up and
  the load), and the load alone as the service logs it (``snapshot_loaded``);
- peak RSS while loading (VmHWM) and steady RSS after it (VmRSS once the load is done);
- two reloads, each started by publishing a new snapshot (the change log is then pruned, so
  the service resyncs, as after falling behind): one with the same keys, one in which every
  key is replaced by another; for each, its time, its own peak (VmHWM reset beforehand through
  /proc/<pid>/clear_refs) and the steady RSS after it;
- CPU per check on the cache-hit path: the service's CPU time from /proc over --checks gRPC
  checks of 1,000 keys spread over the whole snapshot, against a service answering from a
  keys file (a plain dict of digests; one key), the floor an in-memory lookup can reach, in
  3 rounds that alternate which goes first: the medians and the median of the paired ratios
  (the services on CPU 1 and this process, the load generator, on CPU 0 meanwhile).
  Every check is verified (the snapshot's keys allowed; others, and replaced ones, refused as
  unknown).

store: for each size, in a fresh process per case, after importing what authz-service
imports at start, the entries parsed with the contract's parser one line at a time:
``KeyStore.build`` with the clients shared through ``contract.Identities`` (as the service
loads), against the former form, a dict of hex key_hash -> (client, valid_until) with a
client per entry. Per case: RSS before (the import baseline), steady and peak, bytes per key,
load time; then ns per lookup for the store and the dict side by side, alternating rounds:
hits on a hot set of 1,000 keys, hits spread over every key, misses; and what making the
lookup key costs (``digest()`` for the store, ``hexdigest()`` for the dict).

cache: the http-mode cache (``AUTHZ_REGISTRY=http``: the resolver's), in a fresh process per
size, after the same imports: bytes per cached key, with five keys a client, each answer
parsed into a new client object as the registry's answers are, and interned by the resolver.

layouts (not run unless asked for): the key tables the store could have used, each in a
fresh process, without clients (one shared record): a dict of the 32-byte digests (the store's
choice), a dict of digests cut to 31 bytes (which fit a 64-byte allocation instead of 80, but
need a Python-level get), and an open-addressing table of the digests in a bytearray.

The scenario functions (``service_scenario``, ``store_scenario``, ``cache_scenario``,
``run_layout``) are importable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

import authz_service.app  # noqa: F401 (the baseline: a process that has imported the service)
from authz_service import contract
from authz_service.contract import Identities
from authz_service.keystore import KeyStore
from authz_service.model import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_bench import CHECK, check_request, cpu_seconds

from tests.e2e import harness
from tests.e2e.stand_in_registry import TOKEN, Snapshot, key, stand_in_registry, write_entries

HOT_KEYS = 1_000
ROUNDS = 7
SERVICE_CPU, BENCH_CPU = 1, 0
READY_TIMEOUT = 120.0
CONCURRENCY = 16
CPU_ROUNDS = 3
TARGETS = {"steady_mib": 256.0, "peak_mib": 384.0, "ready_s": 20.0}  # at 1M keys (issue 15)
SERVE = [sys.executable, "-m", "authz_service", "serve"]
_VERSION = re.compile(rb"^authz_snapshot_version (\S+)$", re.MULTILINE)

Get = Callable[[Any], object]


# --- the service, end to end ----------------------------------------------------------------


def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in text.splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Starts VmHWM afresh from the current RSS (Linux: clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Service:
    """``authz-service serve`` as its own process on its own CPU, with these AUTHZ_ settings."""

    def __init__(self, workdir: Path, settings: dict[str, str]) -> None:
        self.grpc_port, self.http_port = harness.free_port(), harness.free_port()
        self.log_path = workdir / f"authz-{self.grpc_port}.log"
        env = {
            **os.environ,
            "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{self.grpc_port}",
            "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{self.http_port}",
            "AUTHZ_ADMIN_ADDRESS": "",
            "AUTHZ_ACCESS_LOG_ADDRESS": "",
            "AUTHZ_HTTP_CHECK_ADDRESS": "",
            **settings,
        }
        self.started = time.monotonic()
        self.slowest = 0.0
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                SERVE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self) -> float:
        """Seconds from the start of the process until /readyz said ready."""
        harness.wait_until(
            lambda: self._alive() and self.get("/readyz").status == 200,
            READY_TIMEOUT,
            "authz-service",
        )
        return time.monotonic() - self.started

    def wait_version(self, version: int) -> float:
        """Seconds until the service's copy is at ``version`` (its authz_snapshot_version)."""
        started = time.monotonic()
        harness.wait_until(
            lambda: self._alive() and self.version() == version, READY_TIMEOUT, "load"
        )
        return time.monotonic() - started

    def get(self, path: str) -> harness.Response:
        """A GET of the service's HTTP port; ``slowest`` keeps the longest answer time (the
        event loop answers it: a load that held the loop shows here)."""
        started = time.monotonic()
        reply = harness.send(self.http_port, path)
        self.slowest = max(self.slowest, time.monotonic() - started)
        return reply

    def version(self) -> int | None:
        body = self.get("/metrics").body
        found = _VERSION.search(body)
        return None if found is None or found[1] == b"NaN" else int(float(found[1]))

    def loads(self, count: int) -> list[dict[str, Any]]:
        """The service's first ``count`` snapshot_loaded log lines (its log is written in
        batches, a moment after the fact)."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            lines = self.log_path.read_text().splitlines()
            found[:] = [json.loads(line) for line in lines if '"snapshot_loaded"' in line]
            return len(found) >= count

        harness.wait_until(logged, 10, "snapshot_loaded in the log")
        return found[:count]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"authz-service exited; see {self.log_path}")
        return True


@contextmanager
def running(workdir: Path, settings: dict[str, str]) -> Iterator[Service]:
    service = Service(workdir, settings)
    try:
        yield service
    finally:
        service.stop()


async def _checks(target: str, payloads: list[bytes], checks: int, expect: str | None) -> None:
    """``checks`` checks cycling over ``payloads``; each must be allowed (``expect`` None) or
    denied with that reason."""
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        queue = iter(range(checks))

        async def worker() -> None:
            for number in queue:
                reply = await call(payloads[number % len(payloads)], timeout=10)
                outcome = None if reply.status.code == 0 else reply.status.message
                if outcome != expect:
                    raise RuntimeError(f"check {number}: {outcome!r}, expected {expect!r}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def verify(target: str, indices: range | list[int], expect: str | None) -> None:
    """Checks of these keys' indices are all allowed (None), or all denied with ``expect``."""
    payloads = [check_request(key(index)) for index in indices]
    asyncio.run(_checks(target, payloads, len(payloads), expect))


def cpu_per_check(service: Service, payloads: list[bytes], checks: int) -> float:
    """Microseconds of the service's CPU per allowed check."""
    before = cpu_seconds(service.pid)
    asyncio.run(_checks(service.target, payloads, checks, None))
    return (cpu_seconds(service.pid) - before) / checks * 1e6


def compare_cpu(
    service: Service, keys: list[str], floor: Service, floor_key: str, checks: int
) -> dict[str, float]:
    """CPU per check of ``service`` (over ``keys``) and of ``floor`` (one key), in rounds that
    alternate which goes first, after a warm-up: the medians, and the median paired ratio."""
    runs = [(service, [check_request(api_key) for api_key in keys])]
    runs.append((floor, [check_request(floor_key)]))
    figures: list[list[float]] = [[], []]
    with pinned([service.pid, floor.pid]):
        for server, payloads in runs:
            asyncio.run(_checks(server.target, payloads, max(1_000, checks // 10), None))
        for round_ in range(CPU_ROUNDS):
            order = [0, 1] if round_ % 2 else [1, 0]
            for which in order:
                figures[which].append(cpu_per_check(*runs[which], checks))
    ratios = [ours / plain for ours, plain in zip(*figures, strict=True)]
    return {
        "us": statistics.median(figures[0]),
        "keys_file_us": statistics.median(figures[1]),
        "ratio": statistics.median(ratios),
    }


@contextmanager
def pinned(pids: list[int]) -> Iterator[None]:
    """These processes (every thread) on SERVICE_CPU, and this one on BENCH_CPU, meanwhile:
    the load generator and the server then do not take each other's cycles. Loads are not
    pinned, so that they can use whichever CPU is free on a shared machine."""
    everywhere = os.sched_getaffinity(0)
    moves = [(pid, {SERVICE_CPU}) for pid in pids] + [(os.getpid(), {BENCH_CPU})]
    for pid, cpus in moves:
        _set_affinity(pid, cpus)
    try:
        yield
    finally:
        for pid, _ in moves:
            _set_affinity(pid, everywhere)


def _set_affinity(pid: int, cpus: set[int]) -> None:
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread.name), cpus)


@contextmanager
def keys_file_service(workdir: Path) -> Iterator[tuple[Service, str]]:
    """A service answering from a keys file (a plain dict of digests) of one key, and the key."""
    from authz_service.registry.static_file import add_key  # noqa: PLC0415 (bench-only)

    keys = workdir / "keys.yaml"
    keys.unlink(missing_ok=True)
    api_key = add_key(keys, "bench", "Benchmark client", ("reader",))
    settings = {"AUTHZ_REGISTRY": "static", "AUTHZ_KEYS_FILE": str(keys)}
    with running(workdir, settings) as service:
        service.wait_ready()
        yield service, api_key


def spread(size: int, first: int = 0, count: int = HOT_KEYS) -> list[int]:
    """``count`` indices spread over the keys ``first`` to ``first + size - 1``."""
    step = max(1, size // count)
    return list(range(first, first + size, step))[:count]


def reload(service: Service, registry: Any, snapshot: Snapshot) -> dict[str, float]:
    """Publishes ``snapshot`` and measures the service's reload of it."""
    reset_peak(service.pid)
    cpu = cpu_seconds(service.pid)
    service.slowest = 0.0
    registry.publish(snapshot)
    seconds = service.wait_version(snapshot.version)
    peak = status(service.pid)["VmHWM"]
    time.sleep(1)  # the reload's garbage is freed by then: what stays is the steady state
    return {
        "s": seconds,
        "cpu_s": cpu_seconds(service.pid) - cpu,
        "slowest_http_s": service.slowest,
        "peak_mib": peak,
        "steady_mib": status(service.pid)["VmRSS"],
    }


def service_scenario(size: int, workdir: Path, checks: int = 10_000) -> dict[str, Any]:
    """One real service loading a streamed snapshot of ``size`` keys, then reloading it with
    the same keys and with every key replaced; see the module's docstring."""
    first, rotated = workdir / f"first-{size}.ndjson", workdir / f"rotated-{size}.ndjson"
    write_entries(first, 0, size)
    write_entries(rotated, size, size)
    sample, replaced = spread(size), spread(size, first=size)
    result: dict[str, Any] = {"keys": size}
    with stand_in_registry() as registry:
        registry.publish(Snapshot(1, first, size))
        settings = {
            "AUTHZ_REGISTRY": "snapshot",
            "AUTHZ_REGISTRY_URL": registry.url,
            "AUTHZ_REGISTRY_TOKEN": TOKEN,
        }
        with running(workdir, settings) as service:
            result["ready_s"] = service.wait_ready()
            result["ready_cpu_s"] = cpu_seconds(service.pid)
            result["slowest_http_s"] = service.slowest
            result["load_s"] = service.loads(1)[0]["seconds"]
            result["peak_mib"] = status(service.pid)["VmHWM"]
            time.sleep(1)
            result["steady_mib"] = status(service.pid)["VmRSS"]
            verify(service.target, sample, None)
            verify(service.target, [2 * size, 2 * size + 1], "unknown_key")
            with keys_file_service(workdir) as (floor, floor_key):
                keys = [key(index) for index in sample]
                result["cpu_per_check"] = compare_cpu(service, keys, floor, floor_key, checks)
            result["reload_same"] = reload(service, registry, Snapshot(2, first, size))
            verify(service.target, sample, None)
            result["reload_replaced"] = reload(service, registry, Snapshot(3, rotated, size))
            verify(service.target, replaced, None)
            verify(service.target, sample[:10], "unknown_key")
            result["load_log"] = service.loads(3)
    first.unlink()
    rotated.unlink()
    return result


# --- the store against the former dict, in-process ----------------------------------------------


def digest(index: int) -> bytes:
    """The SHA-256 of the index-th key: hits are indices below the size, misses above."""
    return hashlib.sha256(key(index).encode()).digest()


def lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as snapshot:
        yield from snapshot


def store_scenario(case: str, path: Path, size: int, lookups: int) -> dict[str, Any]:
    """One case of the in-process comparison, in this process (run each in a fresh one)."""
    gc.collect()
    baseline = status()["VmRSS"]
    started = time.perf_counter()
    if case == "store":
        identities = Identities()

        def entries() -> Iterator[tuple[bytes, Client, float | None]]:
            for line in lines(path):
                entry = contract.parse_entry(json.loads(line), identities)
                yield entry.digest, entry.client, entry.valid_until

        store = KeyStore[Client].build(entries())
        loaded = len(store)
    else:
        records: dict[str, tuple[Client, float | None]] = {}
        for line in lines(path):
            entry = contract.parse_entry(json.loads(line))
            records[entry.digest.hex()] = (entry.client, entry.valid_until)
        loaded = len(records)
    load_seconds = time.perf_counter() - started
    gc.collect()
    after = status()
    result: dict[str, Any] = {
        "case": case,
        "keys": loaded,
        "baseline_mib": baseline,
        "steady_mib": after["VmRSS"],
        "peak_mib": after["VmHWM"],
        "bytes_per_key": (after["VmRSS"] - baseline) * 2**20 / size,
        "load_s": load_seconds,
    }
    if case == "store":
        result["lookups"] = compare_lookups(store, size, lookups)
        result["parse_ns"] = compare_parsing(path)
    return result


def cache_scenario(size: int) -> dict[str, Any]:
    """The resolver's cache holding ``size`` answers, in this process (run it in a fresh one)."""
    from authz_service.changes import RecentChanges  # noqa: PLC0415 (this scenario only)
    from authz_service.contract import Answer  # noqa: PLC0415
    from authz_service.resolver import CachingResolver, ResolverSettings  # noqa: PLC0415

    gc.collect()
    baseline = status()["VmRSS"]
    resolver = CachingResolver(
        _Unreachable(),
        ResolverSettings(max_entries=size),
        asyncio.new_event_loop(),
        RecentChanges(retention=60),
    )
    for index in range(size):
        client = index // 5
        answer = Answer(Client(f"cl_{client:016x}", f"Client {client}", ("reader",)))
        resolver._store(digest(index), answer, None)  # what a registry answer does
    gc.collect()
    after = status()["VmRSS"]
    return {
        "case": "cache",
        "keys": resolver.entries,
        "baseline_mib": baseline,
        "steady_mib": after,
        "bytes_per_key": (after - baseline) * 2**20 / size,
    }


class _Unreachable:
    """A registry backend the cache scenario never calls."""

    ready = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def verify(self, credential: object) -> Any:
        raise AssertionError("the cache scenario asks no registry")


def compare_parsing(path: Path) -> dict[str, float]:
    """ns per entry to parse the snapshot's lines with the contract's parser, sharing clients
    through Identities (an identity seen before is not parsed again) and without, one pass
    each (the store's process, so that the memory figures above are unaffected)."""
    timings = {}
    for name, identities in (("identities", Identities()), ("plain", None)):
        started, count = time.process_time(), 0
        for line in lines(path):
            contract.parse_entry(json.loads(line), identities)
            count += 1
        timings[name] = (time.process_time() - started) / count * 1e9
    return timings


def compare_lookups(
    store: KeyStore[Client], size: int, lookups: int
) -> dict[str, dict[str, float]]:
    """Median ns per lookup for the store and the former dict, over rounds that alternate
    which goes first; and the same for making the lookup key from a presented key."""
    records = {digest(index).hex(): store.get(digest(index)) for index in range(size)}
    pools = {"hot hit": (0, min(size, HOT_KEYS)), "spread hit": (0, size), "miss": (size, 2 * size)}
    timings: dict[str, dict[str, list[float]]] = {
        name: {"store": [], "dict": []} for name in [*pools, "make key"]
    }
    presented = [key(n).encode() for n in range(lookups)]
    rng = random.Random(15)
    for round_ in range(ROUNDS):
        order = 1 if round_ % 2 else -1
        for name, (low, high) in pools.items():
            indices = [rng.randrange(low, high) for _ in range(lookups)]
            runs: list[tuple[str, Get, list[Any]]] = [
                ("store", store.get, [digest(i) for i in indices]),
                ("dict", records.get, [digest(i).hex() for i in indices]),
            ]
            for form, get, keys in runs[::order]:
                timings[name][form].append(time_gets(get, keys))
        makers: list[tuple[str, Get]] = [
            ("store", lambda presented: hashlib.sha256(presented).digest()),
            ("dict", lambda presented: hashlib.sha256(presented).hexdigest()),
        ]
        for form, make in makers[::order]:
            timings["make key"][form].append(time_gets(make, presented))
    return {
        name: {form: statistics.median(runs) for form, runs in forms.items()}
        for name, forms in timings.items()
    }


def time_gets(get: Get, keys: list[Any]) -> float:
    gc.disable()  # a collection in the middle of a round would be counted as lookup time
    try:
        started = time.perf_counter_ns()
        for lookup_key in keys:
            get(lookup_key)
        return (time.perf_counter_ns() - started) / len(keys)
    finally:
        gc.enable()


class CutKeys:
    """The 31-byte candidate: 248 bits of each digest are kept and compared."""

    def __init__(self) -> None:
        self._keys: dict[bytes, object] = {}

    def put(self, digest: bytes, record: object) -> None:
        self._keys[digest[:31]] = record

    def get(self, digest: bytes) -> object:
        return self._keys.get(digest[:31])


class PackedTable:
    """The open-addressing candidate: whole digests in one bytearray, at most half full, probed
    linearly from the digest's first 8 bytes (uniform, as SHA-256 is); 0 marks a free slot in
    the parallel array of record numbers."""

    def __init__(self, capacity: int, records: list[object]) -> None:
        slots = 1 << (2 * capacity - 1).bit_length()
        self._mask = slots - 1
        self._digests = bytearray(32 * slots)
        self._refs = array("I", bytes(4 * slots))
        self._records = records

    def put(self, digest: bytes, record: int) -> None:
        slot = int.from_bytes(digest[:8], "little") & self._mask
        while self._refs[slot] and self._digests[32 * slot : 32 * slot + 32] != digest:
            slot = (slot + 1) & self._mask
        self._digests[32 * slot : 32 * slot + 32] = digest
        self._refs[slot] = record + 1

    def get(self, digest: bytes) -> object:
        refs, digests, mask = self._refs, self._digests, self._mask
        slot = int.from_bytes(digest[:8], "little") & mask
        while ref := refs[slot]:
            if digests[32 * slot : 32 * slot + 32] == digest:
                return self._records[ref - 1]
            slot = (slot + 1) & mask
        return None


LAYOUTS = {
    "dict32": "dict, 32-byte keys (chosen)",
    "dict31": "dict, 31-byte keys",
    "packed": "bytearray table",
}


def run_layout(layout: str, size: int, lookups: int) -> dict[str, Any]:
    """Memory above the baseline per key, and median ns per lookup, for one key table."""
    gc.collect()
    baseline = status()["VmRSS"]
    record = (Client("cl_0000000000000000", "Client number 000000", ("reader",)), None)
    get: Get
    if layout == "dict32":
        whole = {digest(index): record for index in range(size)}
        get = whole.get
    elif layout == "dict31":
        cut = CutKeys()
        for index in range(size):
            cut.put(digest(index), record)
        get = cut.get
    else:
        packed = PackedTable(size, [record])
        for index in range(size):
            packed.put(digest(index), 0)
        get = packed.get
    gc.collect()
    result: dict[str, Any] = {
        "layout": layout,
        "keys": size,
        "bytes_per_key": (status()["VmRSS"] - baseline) * 2**20 / size,
    }
    pools = {"hot hit": (0, min(size, HOT_KEYS)), "spread hit": (0, size), "miss": (size, 2 * size)}
    rng = random.Random(15)
    for name, (low, high) in pools.items():
        runs = []
        for _ in range(ROUNDS):
            runs.append(time_gets(get, [digest(rng.randrange(low, high)) for _ in range(lookups)]))
        result[name] = statistics.median(runs)
    return result


def report_layouts(results: list[dict[str, Any]]) -> None:
    print("key tables alone (ns per lookup, and the ratio to the chosen one)")
    columns = "".join(f"{name:>16}" for name in ("hot hit", "spread hit", "miss"))
    print(f"{'keys':>9} {'key table':<28} {'B/key':>6}{columns}")
    chosen = {row["keys"]: row for row in results if row["layout"] == "dict32"}
    for row in results:
        base = chosen[row["keys"]]
        figures = "".join(
            f"{row[name]:>8.0f} ns {row[name] / base[name]:>4.2f}"
            for name in ("hot hit", "spread hit", "miss")
        )
        print(
            f"{row['keys']:>9} {LAYOUTS[row['layout']]:<28} {row['bytes_per_key']:>6.0f} {figures}"
        )
    print()


def child(case: str, size: int, lookups: int, path: Path | None = None) -> dict[str, Any]:
    """Runs one store or layout case in a fresh process, so that its RSS figures are its own."""
    command = [sys.executable, __file__, "--case", case, "--sizes", str(size)]
    command += ["--lookups", str(lookups)]
    if path is not None:
        command += ["--snapshot", str(path)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- the report -----------------------------------------------------------------------------------


def report_service(rows: list[dict[str, Any]]) -> None:
    print(
        "service, end to end: the service process's wall and CPU seconds, peak and steady RSS,"
        " and its slowest HTTP answer meanwhile (/readyz, /metrics: a stalled event loop)"
    )
    print(
        f"{'keys':>9}  {'':<24} {'s':>6} {'CPU s':>6} {'peak MiB':>9} {'steady MiB':>11}"
        f" {'slowest HTTP s':>15} {'CPU us/check':>13}"
    )
    for row in rows:
        phases = [
            ("ready (start to /readyz)", row["ready_s"], row["ready_cpu_s"], row),
            ("reload, same keys", *_phase(row["reload_same"])),
            ("reload, every key new", *_phase(row["reload_replaced"])),
        ]
        for number, (name, seconds, cpu, figures) in enumerate(phases):
            check_cpu = f"{row['cpu_per_check']['us']:>13.1f}" if number == 0 else ""
            print(
                f"{row['keys'] if number == 0 else '':>9}  {name:<24} {seconds:>6.2f} {cpu:>6.2f}"
                f" {figures['peak_mib']:>9.1f} {figures['steady_mib']:>11.1f}"
                f" {figures['slowest_http_s']:>15.3f}{check_cpu}"
            )
        print(f"{'':>11}(the first load alone, as the service logs it: {row['load_s']:.2f} s)")
    for row in rows:
        cpu = row["cpu_per_check"]
        print(
            f"CPU per check (cache hit), snapshot of {row['keys']} keys {cpu['us']:.1f} us,"
            f" keys file (a dict) {cpu['keys_file_us']:.1f} us: {cpu['ratio']:.2f}x"
            f" (median of {CPU_ROUNDS} paired rounds)"
        )
    for row in rows:
        if row["keys"] == 1_000_000:
            figures = {
                "steady_mib": row["steady_mib"],
                "peak_mib": max(row["peak_mib"], row["reload_same"]["peak_mib"]),
                "ready_s": row["ready_s"],
            }
            verdicts = ", ".join(
                f"{name} {figures[name]:.1f} <= {limit:g}: {_met(figures[name] <= limit)}"
                for name, limit in TARGETS.items()
            )
            print(f"targets at 1M keys (peak: load, and a reload of the same keys): {verdicts}")
    print()


def _met(met: bool) -> str:
    return "met" if met else "NOT MET"


def _phase(figures: dict[str, float]) -> tuple[float, float, dict[str, float]]:
    return figures["s"], figures["cpu_s"], figures


def report_cache(results: list[dict[str, Any]]) -> None:
    print("the http-mode cache (the resolver's), in-process, five keys a client")
    print(f"{'keys':>9} {'baseline MiB':>12} {'steady MiB':>10} {'B/key':>6}")
    for row in results:
        print(
            f"{row['keys']:>9} {row['baseline_mib']:>12.1f} {row['steady_mib']:>10.1f}"
            f" {row['bytes_per_key']:>6.0f}"
        )
    print()


def report_store(results: list[dict[str, Any]]) -> None:
    print("key store against the former dict, in-process")
    print(
        f"{'keys':>9} {'case':<6} {'baseline MiB':>12} {'steady MiB':>10} {'peak MiB':>9}"
        f" {'B/key':>6} {'load s':>7}"
    )
    for row in results:
        print(
            f"{row['keys']:>9} {row['case']:<6} {row['baseline_mib']:>12.1f}"
            f" {row['steady_mib']:>10.1f} {row['peak_mib']:>9.1f} {row['bytes_per_key']:>6.0f}"
            f" {row['load_s']:>7.2f}"
        )
    for row in results:
        if row["case"] != "store":
            continue
        parse = row["parse_ns"]
        print(
            f"\n{row['keys']} keys: json.loads and parse_entry, {parse['identities']:.0f} ns an"
            f" entry with Identities, {parse['plain']:.0f} ns without:"
            f" {parse['identities'] / parse['plain']:.2f}x"
        )
        print(f"{'lookup':<11} {'store ns':>9} {'dict ns':>8} {'store/dict':>10}")
        for name, forms in row["lookups"].items():
            print(
                f"{name:<11} {forms['store']:>9.0f} {forms['dict']:>8.0f}"
                f" {forms['store'] / forms['dict']:>10.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=["service", "store", "cache", "layouts"],
        default=["service", "store", "cache"],
    )
    parser.add_argument("--checks", type=int, default=10_000, help="checks per round and service")
    parser.add_argument("--lookups", type=int, default=100_000, help="per round and kind (store)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")
    parser.add_argument(
        "--case", choices=["store", "dict", "cache", *LAYOUTS], help=argparse.SUPPRESS
    )
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case in LAYOUTS:
        print(json.dumps(run_layout(args.case, args.sizes[0], args.lookups)))
        return
    if args.case == "cache":
        print(json.dumps(cache_scenario(args.sizes[0])))
        return
    if args.case:
        print(json.dumps(store_scenario(args.case, args.snapshot, args.sizes[0], args.lookups)))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as scratch:
        workdir = Path(scratch)
        if "service" in args.scenarios:
            results["service"] = [
                service_scenario(size, workdir, args.checks) for size in args.sizes
            ]
        if "layouts" in args.scenarios:
            results["layouts"] = [
                child(layout, size, args.lookups) for size in args.sizes for layout in LAYOUTS
            ]
        if "cache" in args.scenarios:
            results["cache"] = [child("cache", size, args.lookups) for size in args.sizes]
        if "store" in args.scenarios:
            results["store"] = []
            for size in args.sizes:
                path = workdir / f"store-{size}.ndjson"
                write_entries(path, 0, size)
                for case in ("store", "dict"):
                    results["store"].append(child(case, size, args.lookups, path))
                path.unlink()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    reports = {
        "service": report_service,
        "layouts": report_layouts,
        "cache": report_cache,
        "store": report_store,
    }
    for name, rows in results.items():
        reports[name](rows)


if __name__ == "__main__":
    main()
