"""A TEST-ONLY STAND-IN for the client registry's usage endpoint, ``POST /v1/usage``.

The end-to-end tests use the reference registry (``src/client_registry``). This stand-in serves
the unit tests and benchmarks, which need the endpoint in-process, without a registry, and
made to fail on demand. It implements exactly that contract and nothing else:

- ``POST /v1/usage`` with ``Authorization: Bearer <service token>``, a JSON body of at most
  1 MiB: ``{"batch_id", "source", "usage": [entry, ...]}`` (at most 10,000 entries), each
  entry ``{"key_id", "client_id", "minute", "allowed", "denied", "upstream", "request_bytes",
  "response_bytes"}``.
- 200 ``{"accepted": <entries>, "duplicate": false}``; the same batch id again: 200
  ``{"accepted": 0, "duplicate": true}``, counting nothing. 400 (naming the field) for a
  malformed batch, 401 without the token, 413 over 1 MiB.

It keeps the totals it accepted, per key, so that tests can compare them with what they sent,
and it can be stopped and started again on the same port (a registry outage), made to fail
(5xx), or made to count a batch and then drop the connection before answering (a lost answer,
which authz-service must retry with the same batch id).
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from authz_service.contract import CLIENT_ID_PATTERN

MAX_BODY = 1 << 20
MAX_ENTRIES = 10_000
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_CLASSES = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx", "unknown"})
_FIELDS = frozenset(
    {
        "key_id",
        "client_id",
        "minute",
        "allowed",
        "denied",
        "upstream",
        "request_bytes",
        "response_bytes",
    }
)


class MalformedError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class KeyTotals:
    """Everything accepted for one key."""

    allowed: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    upstream: Counter[str] = field(default_factory=Counter)
    request_bytes: int = 0
    response_bytes: int = 0
    minutes: set[str] = field(default_factory=set)


class UsageRegistry:
    def __init__(self, token: str = "usage-service-token") -> None:  # noqa: S107 (a test token)
        self.token = token
        self.port = 0
        self.batch_ids: list[str] = []  # every batch id received, duplicates included
        self.accepted: dict[str, int] = {}  # batch id -> entries accepted
        self.totals: dict[tuple[str, str], KeyTotals] = {}  # (client_id, key_id)
        self.refusals: list[int] = []
        self.fail_with: int | None = None  # answer every batch with this status
        self.lose_answers = 0  # batches to count, then drop the connection unanswered
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.received = threading.Condition(self._lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port after ``stop``)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        """Close the port: calls are refused, as while a registry is down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def key(self, client_id: str, key_id: str) -> KeyTotals:
        with self._lock:
            return self.totals.get((client_id, key_id), KeyTotals())

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds, woken by each batch received."""
        with self.received:
            return self.received.wait_for(condition, timeout)

    # --- the endpoint ---------------------------------------------------------------------------
    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            batch = _parse(body)
        except MalformedError as exc:
            return 400, {"error": "invalid_request", "message": str(exc), "field": exc.field}
        with self._lock:
            self.batch_ids.append(batch["batch_id"])
            if batch["batch_id"] in self.accepted:
                self.received.notify_all()
                return 200, {"accepted": 0, "duplicate": True}
            for entry in batch["usage"]:
                totals = self.totals.setdefault((entry["client_id"], entry["key_id"]), KeyTotals())
                totals.allowed += entry["allowed"]
                totals.denied.update(entry["denied"])
                totals.upstream.update(entry["upstream"])
                totals.request_bytes += entry["request_bytes"]
                totals.response_bytes += entry["response_bytes"]
                totals.minutes.add(entry["minute"])
            self.accepted[batch["batch_id"]] = len(batch["usage"])
            self.received.notify_all()
        return 200, {"accepted": len(batch["usage"]), "duplicate": False}


def _handler(registry: UsageRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.path != "/v1/usage":
                return self._answer(404, {"error": "not_found", "message": "no such endpoint"})
            if self.headers.get("authorization") != f"Bearer {registry.token}":
                return self._answer(401, {"error": "unauthorized", "message": "token"})
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                return self._answer(413, {"error": "too_large", "message": "over 1 MiB"})
            body = self.rfile.read(length)
            if registry.fail_with is not None:
                return self._answer(registry.fail_with, {"error": "unavailable", "message": ""})
            status, answer = registry.receive(body)
            if status != 200:
                registry.refusals.append(status)
            if status == 200 and registry.lose_answers > 0:
                registry.lose_answers -= 1
                self.close_connection = True  # counted, but the answer never arrives
                return None
            return self._answer(status, answer)

        def _answer(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _parse(body: bytes) -> dict[str, Any]:
    try:
        batch = json.loads(body)
    except ValueError:
        raise MalformedError("", "not JSON") from None
    if not isinstance(batch, dict) or set(batch) != {"batch_id", "source", "usage"}:
        raise MalformedError("", "expected {batch_id, source, usage}")
    if not isinstance(batch["batch_id"], str) or not _BATCH_ID.fullmatch(batch["batch_id"]):
        raise MalformedError("batch_id", "1-64 of [A-Za-z0-9_-]")
    if not isinstance(batch["source"], str) or len(batch["source"]) > 128:
        raise MalformedError("source", "a string of at most 128 characters")
    usage = batch["usage"]
    if not isinstance(usage, list) or len(usage) > MAX_ENTRIES:
        raise MalformedError("usage", f"a list of at most {MAX_ENTRIES} entries")
    for index, entry in enumerate(usage):
        _check_entry(entry, f"usage[{index}]")
    return batch


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        raise MalformedError(where, f"expected exactly {sorted(_FIELDS)}")
    if not isinstance(entry["key_id"], str) or not _KEY_ID.fullmatch(entry["key_id"]):
        raise MalformedError(f"{where}.key_id", "12 lower-case hex characters")
    client_id = entry["client_id"]
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise MalformedError(f"{where}.client_id", "a client id")
    _check_minute(entry["minute"], f"{where}.minute")
    for name in ("allowed", "request_bytes", "response_bytes"):
        _count(entry[name], f"{where}.{name}")
    for name in ("denied", "upstream"):
        counts = entry[name]
        if not isinstance(counts, dict):
            raise MalformedError(f"{where}.{name}", "an object of counts")
        for label, number in counts.items():
            if name == "upstream" and label not in _CLASSES:
                raise MalformedError(f"{where}.upstream", f"{label!r} is not a status class")
            _count(number, f"{where}.{name}.{label}")


def _check_minute(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value.endswith("Z"):
        raise MalformedError(where, "ISO 8601 UTC")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedError(where, "ISO 8601 UTC") from None
    if moment.tzinfo != UTC or moment.second or moment.microsecond:
        raise MalformedError(where, "a whole minute, UTC")


def _count(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedError(where, "an integer >= 0")
