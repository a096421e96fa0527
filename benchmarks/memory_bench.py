"""Memory and lookup cost of the key store at snapshot scale, against today's dict, in one run.

    .venv/bin/python benchmarks/memory_bench.py [--layouts] [--sizes 100000 1000000]

For each size it writes a snapshot in the contract's form, NDJSON with one Entry a line (five
keys per client, clients like ``cl_`` + 16 hex with 1-3 roles from a small set, 1% of keys with
a ``valid_until``), and loads it in a fresh process per case, after importing what
authz-service imports at start (``authz_service.app``), parsing one line at a time with
``json.loads``:

- ``store``: ``KeyStore.build``: digests as bytes, one client object per client, and equal
  roles tuples shared through ``keystore.Interner`` (without that, 1M keys cost 35 MiB more);
- ``dict``: today's form, ``dict[hex key_hash] -> (client, valid_until)``, a client per entry.

Per case: RSS before loading (the import baseline), after loading (steady, after a collection),
the peak (VmHWM), bytes per key above the baseline, and the load time, split into reading the
lines, ``json.loads``, parsing the entries and building the store. Then, in the store's process
with both tables loaded, ns per lookup for the store and the dict side by side: hits on a hot
set of 1,000 keys, hits spread over every key, and misses, each on fresh digest objects (as a
check computes its digest anew), alternating rounds; and what making the lookup key costs
(``digest()`` for the store, ``hexdigest()`` for the dict).

With ``--layouts``, it first compares the key tables the store could have used, each in a
fresh process, without clients (one shared record): a dict of the 32-byte digests (the
store's choice), a dict of digests cut to 31 bytes (which fit a 64-byte allocation instead of
80, but need a Python-level get), and an open-addressing table of the digests in a bytearray.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import authz_service.app  # noqa: F401 (the baseline: a process that has imported the service)
from authz_service.keystore import Interner, KeyStore

HOT_KEYS = 1_000
ROUNDS = 7
KEYS_PER_CLIENT = 5
ROLE_SETS = (("reader",), ("reader", "writer"), ("billing", "reader"), ("admin", "ops", "reader"))
VALID_UNTIL = "2031-01-01T00:00:00+00:00"
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as the contract's Identity
ROLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
TARGETS = "targets at 1M keys: steady <= 256 MiB, peak <= 384 MiB, ready <= 20 s"


@dataclass(frozen=True, slots=True)
class BenchClient:
    """Shaped like authz_service.model.Client (which this benchmark does not depend on)."""

    client_id: str
    name: str
    roles: tuple[str, ...] = ()
    rate_limit: object | None = None


Entry = tuple[bytes, BenchClient, float | None]
Roles = Callable[[tuple[str, ...]], tuple[str, ...]]  # shares equal roles tuples, or not
Get = Callable[[Any], object]


def digest(index: int) -> bytes:
    """The SHA-256 of the index-th key: hits are indices below the size, misses above."""
    return hashlib.sha256(b"bench-key-%d" % index).digest()


def write_snapshot(path: Path, size: int) -> None:
    count = max(1, size // KEYS_PER_CLIENT)
    clients = [
        json.dumps(
            {
                "client_id": "cl_" + hashlib.sha256(b"%d" % number).hexdigest()[:16],
                "client_name": f"Client number {number:06d}",
                "roles": list(ROLE_SETS[number % len(ROLE_SETS)]),
                "status": "active",
            }
        )
        for number in range(count)
    ]
    with path.open("w") as out:
        for index in range(size):
            key_hash = digest(index).hex()
            valid_until = f'"{VALID_UNTIL}"' if index % 100 == 0 else "null"
            out.write(
                f'{{"key_hash": "{key_hash}", "key_id": "{key_hash[:12]}",'
                f' "valid_until": {valid_until}, "client": {clients[index % count]}}}\n'
            )


def parse_time(value: Any) -> float | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.timestamp()


def parse_client(client: Any, roles_of: Roles) -> BenchClient:
    """As strict as the service's parse_identity (the checks cost load time too)."""
    if set(client) != {"client_id", "client_name", "roles", "status"}:
        raise ValueError("client is not an identity")
    client_id, name, roles = client["client_id"], client["client_name"], client["roles"]
    if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
        raise ValueError("client_id")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ValueError("client_name")
    if not isinstance(roles, list) or not all(
        isinstance(role, str) and ROLE.fullmatch(role) for role in roles
    ):
        raise ValueError("roles")
    if client["status"] != "active":
        raise ValueError("status")
    return BenchClient(client_id, name, roles_of(tuple(roles)))


def parse_entry(line: bytes, roles_of: Roles) -> tuple[str, BenchClient, float | None]:
    entry = json.loads(line)
    key_hash = entry["key_hash"]
    if not isinstance(key_hash, str) or len(key_hash) != 64:
        raise ValueError("key_hash")
    return key_hash, parse_client(entry["client"], roles_of), parse_time(entry["valid_until"])


def lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as snapshot:
        yield from snapshot


def status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def run_case(case: str, path: Path, size: int, lookups: int) -> dict[str, Any]:
    gc.collect()
    baseline = status()["VmRSS"]
    roles = Interner[tuple[str, ...]]()
    started = time.perf_counter()
    if case == "store":

        def entries() -> Iterator[Entry]:
            for line in lines(path):
                key_hash, client, valid_until = parse_entry(line, roles)
                yield bytes.fromhex(key_hash), client, valid_until

        store = KeyStore[BenchClient].build(entries())
        loaded = len(store)
    else:
        records: dict[str, tuple[BenchClient, float | None]] = {}
        for line in lines(path):
            key_hash, client, valid_until = parse_entry(line, tuple)
            records[key_hash] = (client, valid_until)
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
        result["phases"] = load_phases(path, roles)
        result["lookups"] = compare_lookups(store, size, lookups)
    return result


def load_phases(path: Path, roles: Roles) -> dict[str, float]:
    """Seconds to read the lines, and to json.loads them, and to parse them into entries."""

    def timed(work: Callable[[bytes], object]) -> float:
        started = time.perf_counter()
        for line in lines(path):
            work(line)
        return time.perf_counter() - started

    return {
        "read": timed(lambda _: None),
        "json.loads": timed(json.loads),
        "parse": timed(lambda line: parse_entry(line, roles)),
    }


def compare_lookups(
    store: KeyStore[BenchClient], size: int, lookups: int
) -> dict[str, dict[str, float]]:
    """Median ns per lookup for the store and today's dict, over rounds that alternate which
    goes first; and the same for making the lookup key from a presented key."""
    records = {digest(index).hex(): store.get(digest(index)) for index in range(size)}
    pools = {"hot hit": (0, min(size, HOT_KEYS)), "spread hit": (0, size), "miss": (size, 2 * size)}
    timings: dict[str, dict[str, list[float]]] = {
        name: {"store": [], "dict": []} for name in [*pools, "make key"]
    }
    presented = [b"ak_bench_%032d" % n for n in range(lookups)]
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
            ("store", lambda key: hashlib.sha256(key).digest()),
            ("dict", lambda key: hashlib.sha256(key).hexdigest()),
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
        for key in keys:
            get(key)
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
    record = (BenchClient("cl_0000000000000000", "Client number 000000"), None)
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


def report(results: list[dict[str, Any]]) -> None:
    print(TARGETS)
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
        phases = row["phases"]
        build = row["load_s"] - phases["parse"]
        print(
            f"\n{row['keys']} keys, load time: read lines {phases['read']:.2f} s, json.loads"
            f" {phases['json.loads'] - phases['read']:.2f} s, parse entries"
            f" {phases['parse'] - phases['json.loads']:.2f} s, digests and store {build:.2f} s"
            f" (total {row['load_s']:.2f} s)"
        )
        print(f"{'lookup':<11} {'store ns':>9} {'dict ns':>8} {'store/dict':>10}")
        for name, forms in row["lookups"].items():
            print(
                f"{name:<11} {forms['store']:>9.0f} {forms['dict']:>8.0f}"
                f" {forms['store'] / forms['dict']:>10.2f}"
            )


def child(case: str, size: int, lookups: int, snapshot: Path | None = None) -> dict[str, Any]:
    """Runs one case in a fresh process, so that its RSS figures are its own."""
    command = [sys.executable, __file__, "--case", case, "--sizes", str(size)]
    command += ["--lookups", str(lookups)]
    if snapshot is not None:
        command += ["--snapshot", str(snapshot)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--lookups", type=int, default=100_000, help="per round and kind")
    parser.add_argument("--layouts", action="store_true", help="compare key tables first")
    parser.add_argument("--case", choices=["store", "dict", *LAYOUTS], help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case in LAYOUTS:
        print(json.dumps(run_layout(args.case, args.sizes[0], args.lookups)))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.snapshot, args.sizes[0], args.lookups)))
        return
    if args.layouts:
        report_layouts(
            [child(layout, size, args.lookups) for size in args.sizes for layout in LAYOUTS]
        )
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            path = Path(scratch) / f"snapshot-{size}.ndjson"
            write_snapshot(path, size)
            results += [child(case, size, args.lookups, path) for case in ("store", "dict")]
            path.unlink()
    report(results)


if __name__ == "__main__":
    main()
