"""A stand-in client registry on loopback that serves large generated snapshots, for the snapshot
mode's scale scenarios (tests/e2e/test_snapshot_scale.py, benchmarks/memory_bench.py).

It serves what a replica in ``AUTHZ_REGISTRY=snapshot`` mode reads, and no more: the streamed
snapshot (``application/x-ndjson``: a header line, the entry lines of a file written by
``write_entries``, a trailer line), with its ``ETag``; an empty change log; and a change
stream that only keeps the connection open. Publishing another snapshot prunes the change log:
followers get 410 and load the new snapshot, as after a registry's pruning. Writing a million
entries to a file takes seconds, where the reference registry would take a million inserts.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.e2e import harness

NDJSON = "application/x-ndjson"
TOKEN = "stand-in-service-token-0000"
KEYS_PER_CLIENT = 5
ROLE_SETS = (("reader",), ("reader", "writer"), ("billing", "reader"), ("admin", "ops", "reader"))
VALID_UNTIL = "2031-01-01T00:00:00+00:00"
_CHUNK = 1 << 20
_HEARTBEAT_SECONDS = 5.0


def key(index: int) -> str:
    """The index-th API key of the generated snapshots (keys not written are unknown keys)."""
    return f"bench-key-{index:010d}"


def client_id(number: int) -> str:
    return "cl_" + hashlib.sha256(b"%d" % number).hexdigest()[:16]


def client_of(index: int, clients: int) -> int:
    """Which client the index-th key belongs to: keys of a client are spread over the file."""
    return index % clients


def write_entries(path: Path, first: int, count: int) -> int:
    """Writes the entry lines of keys ``first`` to ``first + count - 1`` in the contract's form:
    five keys per client (``count // 5`` clients, as ids ``cl_`` + 16 hex), 1-3 roles from a
    small set, 1% of keys with a ``valid_until``. Returns the number of entries written."""
    clients = max(1, count // KEYS_PER_CLIENT)
    identities = [
        json.dumps(
            {
                "client_id": client_id(number),
                "client_name": f"Client number {number:06d}",
                "roles": list(ROLE_SETS[number % len(ROLE_SETS)]),
                "status": "active",
            }
        )
        for number in range(clients)
    ]
    with path.open("w") as out:
        for index in range(first, first + count):
            key_hash = hashlib.sha256(key(index).encode()).hexdigest()
            valid_until = f'"{VALID_UNTIL}"' if index % 100 == 0 else "null"
            out.write(
                f'{{"key_hash": "{key_hash}", "key_id": "{key_hash[:12]}",'
                f' "valid_until": {valid_until},'
                f' "client": {identities[client_of(index - first, clients)]}}}\n'
            )
    return count


@dataclass(frozen=True)
class Snapshot:
    """A snapshot to serve: its version and the file of its entry lines."""

    version: int
    entries: Path
    count: int
    cut_short: bool = False  # sent without its trailer line, as by a connection that broke


class StandInRegistry:
    def __init__(self) -> None:
        self.url = ""
        self.snapshot_requests = 0
        self._snapshot: Snapshot | None = None
        self._changed = threading.Condition()

    def publish(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on; the change log before it is gone (410), and the
        open change streams end, so that followers load it."""
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def current(self) -> Snapshot:
        with self._changed:
            if self._snapshot is None:
                raise RuntimeError("no snapshot published yet")
            return self._snapshot

    def wait_for_change(self, snapshot: Snapshot, seconds: float) -> bool:
        """True once another snapshot than ``snapshot`` is published (within ``seconds``)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._snapshot is not snapshot, seconds)


@contextmanager
def stand_in_registry() -> Iterator[StandInRegistry]:
    """A ``StandInRegistry`` serving on a free loopback port, until the block ends."""
    registry = StandInRegistry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._status(401)
                return
            url = urlsplit(self.path)
            snapshot = registry.current()
            try:
                if url.path == "/v1/snapshot":
                    self._snapshot(snapshot)
                elif url.path == "/v1/changes":
                    since = parse_qs(url.query).get("since", [str(snapshot.version)])[0]
                    self._changes(snapshot, since)
                elif url.path == "/v1/changes/stream":
                    self._stream(snapshot, self.headers.get("Last-Event-ID", ""))
                else:
                    self._status(404)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the replica went away (stopped, or gave up on a snapshot)

        def _snapshot(self, snapshot: Snapshot) -> None:
            registry.snapshot_requests += 1
            etag = f'"v{snapshot.version}"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            header = json.dumps({"version": snapshot.version}).encode() + b"\n"
            trailer = json.dumps({"end": True, "count": snapshot.count}).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Type", NDJSON)
            self.send_header("ETag", etag)
            if not snapshot.cut_short:
                size = len(header) + snapshot.entries.stat().st_size + len(trailer)
                self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(header)
            with snapshot.entries.open("rb") as entries:
                while chunk := entries.read(_CHUNK):
                    self.wfile.write(chunk)
            if not snapshot.cut_short:
                self.wfile.write(trailer)

        def _changes(self, snapshot: Snapshot, since: str) -> None:
            if since != str(snapshot.version):
                self._status(410)  # pruned, or from another snapshot: load the snapshot
                return
            version = snapshot.version
            body = {"version": version, "current_version": version, "changes": []}
            self._json(200, body)

        def _stream(self, snapshot: Snapshot, last_event_id: str) -> None:
            if last_event_id != str(snapshot.version):
                self._status(410)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": connected\n\n")
            while not registry.wait_for_change(snapshot, _HEARTBEAT_SECONDS):
                self.wfile.write(b": heartbeat\n\n")

        def _status(self, status: int) -> None:
            self._json(status, {"error": "stand_in", "message": f"HTTP {status}"})

        def _json(self, status: int, body: object) -> None:
            text = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with harness.serving(server) as port:
        registry.url = f"http://127.0.0.1:{port}"
        yield registry
