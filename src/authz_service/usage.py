"""The usage ledger: what each API key did, per minute, sent to the registry for billing.

Per key (its ``key_id``, with its client) and per minute (UTC, the minute in which this
replica counted it): checks allowed, checks denied by reason, upstream responses by status
class, and request and response body bytes (the last three from Envoy's access logs, under
the key and client that our own Check put in their metadata).

Only checks of a known client are counted per key. A denial before the client is known (no
key, an unknown, disabled, expired or revoked key, a suspended client, the registry
unreachable) has nobody to bill: it is counted in ``authz_checks_total{client_id="none"}``
only.

- **Recording** is a dictionary update under one short lock (checks arrive from the check
  server's worker threads and from the event loop).
- **Flushing** (``Flusher.run``, a supervised task): every interval, the minutes that have
  ended are taken whole (one dictionary per minute) and sealed into batches of at most 10,000
  entries and 1 MiB, each with its own id, encoded on the event loop a thousand entries at a
  time, with its other work in between (a 100,000-entry minute no longer stops it for a
  second), and sent in order (``POST /v1/usage``, the registry's service token). A batch that fails
  (unreachable, a timeout, a 5xx) is sent again later, with backoff, under the same id, so
  the registry counts it once however often it arrives. A batch the registry refuses as
  malformed (400, 413, 415, 422) is dropped, counted and logged: sending it again cannot help.
- **Bounded**: at most ``max_entries`` key-minutes are held (open, or sealed and waiting).
  A check or an upstream response that would need one more is not counted; it is counted as
  dropped instead, and logged.
- **Shutdown**: once the servers have stopped answering, ``Flusher.finish`` seals every
  minute, the current one included, and sends what is left, within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import aiohttp

from authz_service import logs
from authz_service.contract import CLIENT_ID_PATTERN
from authz_service.envoy_codec import UpstreamRecord
from authz_service.model import Decision

log = logging.getLogger(__name__)

MAX_BATCH_ENTRIES = 10_000  # the contract's bound on one batch
MAX_BATCH_BYTES = (1 << 20) - 1024  # the contract's 1 MiB, less the batch's own fields
ENCODE_SLICE = 1000  # entries encoded between two turns of the event loop's other work
MAX_BACKOFF = 4  # after failures, the wait grows to at most this many flush intervals
SEND_TIMEOUT = 10.0  # seconds one POST may take
FINAL_FLUSH_SECONDS = 3.0  # at shutdown: within the 5 s the chart leaves after the grace period
# Statuses that say the batch itself is at fault: sending it again cannot help. Anything else
# (a 5xx, 401/403 while a token is being rotated, 404 while the registry is upgraded, 429)
# is the registry's or the configuration's, and may mend: the batch waits and is retried.
REJECTED = frozenset({400, 413, 415, 422})
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_MAX_SOURCE = 128

Owner = tuple[str, str]  # (key_id, client_id)


class _Tally:
    """One key's figures for one minute."""

    __slots__ = ("allowed", "denied", "request_bytes", "response_bytes", "upstream")

    def __init__(self) -> None:
        self.allowed = 0
        self.denied: dict[str, int] = {}
        self.upstream: dict[str, int] = {}
        self.request_bytes = 0
        self.response_bytes = 0

    @property
    def records(self) -> int:
        """The checks and upstream responses it counts."""
        return self.allowed + sum(self.denied.values()) + sum(self.upstream.values())


class Batch(NamedTuple):
    """A sealed batch: its body is final, so a retry sends exactly the same batch."""

    batch_id: str
    body: bytes
    entries: int
    records: int


class UsageLedger:
    def __init__(
        self,
        max_entries: int,
        source: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``source`` names this replica in batches (default: the host name, which is the
        pod's name under Kubernetes)."""
        self._max = max_entries
        self.source = (source or socket.gethostname() or "authz-service")[:_MAX_SOURCE]
        self._clock = clock
        self._lock = threading.Lock()
        # Minute since the epoch -> its tallies: a minute that ends is taken whole.
        self._open: dict[int, dict[Owner, _Tally]] = {}
        self._open_entries = 0
        self._sealed: deque[Batch] = deque()  # oldest first; touched on the event loop only
        self._sealed_entries = 0
        # Read by /metrics.
        self.flushed_entries = 0
        self.dropped = {"buffer_full": 0, "rejected": 0, "shutdown": 0}  # records
        self.failures = {"unavailable": 0, "rejected": 0}  # flush attempts
        self._drops_logged = 0

    @property
    def buffered(self) -> int:
        """Key-minutes held: still open, or sealed and not yet acknowledged."""
        return self._open_entries + self._sealed_entries

    # --- recording: any thread ------------------------------------------------------------------
    def check(self, decision: Decision) -> None:
        """Count one check, if it is a known client's."""
        client, key_id = decision.client, decision.key_id
        if client is None or key_id is None:
            return
        with self._lock:
            tally = self._tally(key_id, client.client_id)
            if tally is None:
                return
            if decision.allowed:
                tally.allowed += 1
            else:
                reason = decision.reason.value
                tally.denied[reason] = tally.denied.get(reason, 0) + 1

    def upstream(self, record: UpstreamRecord) -> None:
        """Count one finished request from Envoy's access log, under the key and client its
        metadata names. Entries without both, or with values our Check never sets (the
        access-log port can be reached by others), are not per key."""
        key_id, client_id = record.key_id, record.client_id
        if (
            key_id is None
            or client_id is None
            or not _KEY_ID.fullmatch(key_id)
            or not CLIENT_ID_PATTERN.fullmatch(client_id)
        ):
            return
        status = record.status
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "unknown"
        with self._lock:
            tally = self._tally(key_id, client_id)
            if tally is None:
                return
            tally.upstream[status_class] = tally.upstream.get(status_class, 0) + 1
            tally.request_bytes += max(0, record.request_bytes)
            tally.response_bytes += max(0, record.response_bytes)

    def _tally(self, key_id: str, client_id: str) -> _Tally | None:
        minute = int(self._clock() // 60)
        tallies = self._open.get(minute)
        if tallies is None:
            tallies = self._open[minute] = {}
        tally = tallies.get((key_id, client_id))
        if tally is None:
            if self._open_entries + self._sealed_entries >= self._max:
                self.dropped["buffer_full"] += 1
                return None
            tally = tallies[key_id, client_id] = _Tally()
            self._open_entries += 1
        return tally

    # --- flushing: on the event loop ------------------------------------------------------------
    async def seal(self, everything: bool = False) -> None:
        """Seal the minutes that have ended (``everything``: all of them) into batches. A
        minute of 100,000 entries takes a good part of a second to encode: it is encoded in
        slices, with the event loop's other work (checks, registry lookups) in between."""
        with self._lock:
            current = int(self._clock() // 60)
            ended = sorted(minute for minute in self._open if everything or minute < current)
            taken = [(minute, self._open.pop(minute)) for minute in ended]
            count = sum(len(tallies) for _, tallies in taken)
            self._open_entries -= count
            self._sealed_entries += count
        pending = (
            (minute, owner, tally) for minute, tallies in taken for owner, tally in tallies.items()
        )
        encoded: list[tuple[str, int]] = []
        try:
            for item in pending:
                encoded.append(_entry(*item))
                if len(encoded) % ENCODE_SLICE == 0:
                    await asyncio.sleep(0)
        finally:  # cancelled (at shutdown): the rest at once, so that nothing taken is lost
            encoded += [_entry(*item) for item in pending]
            self._sealed.extend(_batches(encoded, self.source))

    def next_batch(self) -> Batch | None:
        return self._sealed[0] if self._sealed else None

    def acknowledged(self, batch: Batch) -> None:
        self._release(batch)
        self.flushed_entries += batch.entries

    def rejected(self, batch: Batch) -> None:
        self._release(batch)
        self.failures["rejected"] += 1
        self.dropped["rejected"] += batch.records

    def failed(self) -> None:
        self.failures["unavailable"] += 1

    def abandon(self) -> int:
        """Drop every sealed batch (at shutdown, when the registry cannot take them); return
        the records lost."""
        lost = sum(batch.records for batch in self._sealed)
        while self._sealed:
            self._release(self._sealed[0])
        self.dropped["shutdown"] += lost
        return lost

    def report_drops(self) -> None:
        """Log the records dropped for want of room since the last report."""
        dropped = self.dropped["buffer_full"]
        if dropped > self._drops_logged:
            log.error(
                "usage ledger full; checks and upstream responses were not counted",
                extra={
                    "fields": {
                        "event": "usage_dropped",
                        "reason": "buffer_full",
                        "records": dropped - self._drops_logged,
                        "max_entries": self._max,
                    }
                },
            )
            self._drops_logged = dropped

    def _release(self, batch: Batch) -> None:
        self._sealed.popleft()
        with self._lock:
            self._sealed_entries -= batch.entries


def _batches(encoded: list[tuple[str, int]], source: str) -> Iterable[Batch]:
    """Batches within the contract's bounds, of entries (encoded, with their records) in
    minute order."""
    head = f'{{"source":{json.dumps(source)},"usage":['
    entries: list[str] = []
    size = records = 0
    for entry, counted in encoded:
        if entries and (
            len(entries) >= MAX_BATCH_ENTRIES or size + len(entry) + 1 > MAX_BATCH_BYTES
        ):
            yield _batch(head, entries, records)
            entries, size, records = [], 0, 0
        entries.append(entry)
        size += len(entry) + 1
        records += counted
    if entries:
        yield _batch(head, entries, records)


def _batch(head: str, entries: list[str], records: int) -> Batch:
    batch_id = uuid.uuid4().hex
    body = f'{{"batch_id":"{batch_id}",{head[1:]}{",".join(entries)}]}}'
    return Batch(batch_id, body.encode(), len(entries), records)


def _entry(minute: int, owner: Owner, tally: _Tally) -> tuple[str, int]:
    """An entry of a batch, encoded, and the records it counts."""
    key_id, client_id = owner
    encoded = json.dumps(
        {
            "key_id": key_id,
            "client_id": client_id,
            "minute": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(minute * 60)),
            "allowed": tally.allowed,
            "denied": tally.denied,
            "upstream": tally.upstream,
            "request_bytes": tally.request_bytes,
            "response_bytes": tally.response_bytes,
        },
        separators=(",", ":"),
    )
    return encoded, tally.records


# --- sending -------------------------------------------------------------------------------------
class BatchRejectedError(Exception):
    """The registry refused the batch as malformed; it is dropped."""

    safe_to_log = True


class UsageUnavailableError(Exception):
    """The registry did not take the batch; it is sent again later."""

    safe_to_log = True


class UsageSink(Protocol):
    async def send(self, batch: Batch) -> bool:
        """Deliver a batch; True if the registry had it already (a duplicate). Raises
        ``BatchRejectedError`` or any other exception (retried)."""
        ...

    async def close(self) -> None: ...


class RegistryUsage:
    """The registry's ``POST /v1/usage``, with its service token."""

    def __init__(self, base_url: str, token: str, timeout: float = SEND_TIMEOUT) -> None:
        self._url = base_url.rstrip("/") + "/v1/usage"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, batch: Batch) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.post(self._url, data=batch.body, headers=self._headers) as reply:
            text = await reply.content.read(64 * 1024)  # a small answer; never echoed in logs
            if reply.status in REJECTED:
                raise BatchRejectedError(f"the registry refused the batch: HTTP {reply.status}")
            if reply.status != 200:
                raise UsageUnavailableError(f"the registry answered HTTP {reply.status}")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            return False
        return isinstance(answer, dict) and answer.get("duplicate") is True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Flusher:
    """Sends the ledger's sealed batches to the registry, every ``interval`` seconds."""

    def __init__(
        self,
        ledger: UsageLedger,
        sink: UsageSink,
        interval: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.ledger = ledger
        self._sink = sink
        self._interval = interval
        self._rand = rand
        self._failures = 0  # consecutive failed flushes
        self._wait = interval

    def delay(self) -> float:
        """The wait before the next flush: the interval, or, after failures, a growing one
        (jittered, so that a fleet does not retry in step)."""
        return self._wait

    def _failed(self) -> None:
        self._failures += 1
        factor = min(1 << min(self._failures, 16), MAX_BACKOFF)
        self._wait = self._interval * factor * (0.8 + 0.4 * self._rand())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            await self.flush()

    async def flush(self, everything: bool = False) -> bool:
        """Seal what is complete and send every sealed batch, in order; False if one could
        not be delivered (it and those after it wait for the next flush)."""
        await self.ledger.seal(everything)
        self.ledger.report_drops()
        while (batch := self.ledger.next_batch()) is not None:
            try:
                duplicate = await self._sink.send(batch)
            except BatchRejectedError as exc:
                self.ledger.rejected(batch)
                log.error(
                    "usage batch refused by the registry; dropped",
                    extra={
                        "fields": {
                            "event": "usage_batch_rejected",
                            "batch_id": batch.batch_id,
                            "entries": batch.entries,
                            "records": batch.records,
                            "detail": str(exc),
                        }
                    },
                )
                continue
            except Exception as exc:  # the registry may come back: the batch waits
                self.ledger.failed()
                self._failed()
                logs.failure(
                    log,
                    "usage flush failed; retrying later",
                    "usage_flush_failed",
                    exc,
                    batch_id=batch.batch_id,
                    buffered=self.ledger.buffered,
                    retry_in=round(self._wait, 3),
                )
                return False
            self.ledger.acknowledged(batch)
            if duplicate:
                log.info(
                    "usage batch was already recorded by the registry",
                    extra={
                        "fields": {"event": "usage_batch_duplicate", "batch_id": batch.batch_id}
                    },
                )
        self._failures, self._wait = 0, self._interval
        return True

    async def finish(self, within: float = FINAL_FLUSH_SECONDS) -> None:
        """The last flush, at shutdown: every minute, the current one included, retried
        until ``within`` seconds have passed; what is left then is lost, and logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pause = 0.1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                while not await self.flush(everything=True):
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                    pause *= 2
        lost = self.ledger.abandon()
        if lost:
            log.error(
                "usage not delivered at shutdown; lost",
                extra={"fields": {"event": "usage_lost", "records": lost}},
            )
        await self._sink.close()
