"""Key -> client through a cache, in front of the registry's validation endpoint. Implements
``Registry``, so the check cannot tell it from a source that holds every key in memory.

- A fresh answer in the cache is returned at once, from any thread; negative answers too (with
  a shorter TTL). For any other key, ``lookup`` returns a coroutine that asks the registry, which
  the check awaits on the event loop.
- One registry call per key however many checks wait for it (single-flight). The call runs on
  its own, so a check that gives up does not cancel it for the others.
- A hit late in its TTL starts a background refresh (stale-while-revalidate).
- When the registry fails, a previously valid key keeps working until ``max_stale`` after its
  TTL (stale-if-error); unknown keys and everything past ``max_stale`` are denied (503).
- Every answer is judged against the change feed before it is cached or served
  (``changes.RecentChanges``): an answer older than a change to its key or client never is, and
  a "valid" never overrides a revocation or suspension the feed reported.
- Lookups of keys the cache has never seen are rate-limited, on the caller's thread, so a flood
  of random keys can become neither a flood of registry calls nor a queue for the event loop.
- With a shared tier (Redis), a miss asks it before the registry and every registry answer is
  written to it, so a fleet makes one registry call per key per TTL.

Entries are keyed by the SHA-256 digest of the key, never the key, and each client is held once
however many of its keys are cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from authz_service.cache import Entry, TtlCache
from authz_service.changes import STALE, RecentChanges
from authz_service.contract import Answer, Change
from authz_service.model import Client, Credential
from authz_service.registry import Known, Lookup, RegistryBusyError, RegistryError
from authz_service.shared_cache import SharedCache

log = logging.getLogger(__name__)

_ASKS = 3  # registry calls for one lookup while its answers keep predating changes


class Verifier(Protocol):
    """The registry's validation endpoint (``registry.http.HttpRegistry``)."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def verify(self, credential: Credential) -> Answer: ...


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    positive_ttl: float = 30.0
    negative_ttl: float = 5.0
    jitter: float = 0.1  # TTLs vary by up to this fraction, so entries do not expire together
    refresh_ahead: float = 0.8  # a hit past this fraction of its TTL refreshes in the background
    max_stale: float = 300.0
    max_entries: int = 100_000
    cold_lookups_per_second: float = 200.0
    cold_lookup_burst: int = 400


class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; safe from any thread."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if not self._refill():
                return False
            self._tokens -= 1
            return True

    def available(self) -> bool:
        """Is there a token to take now? (Without taking it.)"""
        with self._lock:
            return self._refill()

    def _refill(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return self._tokens >= 1


class CachingResolver:
    def __init__(
        self,
        backend: Verifier,
        settings: ResolverSettings,
        loop: asyncio.AbstractEventLoop,
        changes: RecentChanges,
        *,
        shared: SharedCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``loop`` is where registry calls and background refreshes run."""
        self.backend = backend
        self._settings = settings
        self._loop = loop
        self._changes = changes
        self._shared = shared
        self._clock = clock
        self._rand = rand
        self._cache: TtlCache[bytes, Known] = TtlCache(settings.max_entries)
        self._clients: dict[str, Client] = {}  # one object per client, shared by its keys
        self._inflight: dict[bytes, asyncio.Task[Known]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._cold = TokenBucket(
            settings.cold_lookups_per_second, settings.cold_lookup_burst, clock
        )
        # Read by /metrics at scrape time; counted under a lock, as lookup runs on the check
        # server's worker threads.
        self.lookups = {"hit": 0, "negative_hit": 0, "miss": 0, "stale_served": 0}
        self._count_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.backend.ready

    @property
    def entries(self) -> int:
        return len(self._cache)

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        for task in [*self._inflight.values(), *self._background]:
            task.cancel()
        await self.backend.close()
        if self._shared is not None:
            await self._shared.close()

    def lookup(self, credential: Credential) -> Lookup:
        """The cached answer if it is fresh; else a coroutine that asks for it. Any thread."""
        entry = self._cache.get(credential.digest)
        now = self._clock()
        if entry is not None and now < entry.fresh_until:
            answer = entry.value
            if not isinstance(answer, Client):
                self._count("negative_hit")
                return answer
            if not self._changes.changed_since(entry.tag, answer.client_id):
                self._count("hit")
                if now >= entry.refresh_at:
                    entry.refresh_at = float("inf")  # one refresh, however many hits see it
                    self._loop.call_soon_threadsafe(self._refresh, credential)
                return answer
        self._count("miss")
        if entry is None and credential.digest not in self._inflight and not self._cold.available():
            # Refused here, on the caller's thread: a flood of random keys past the rate limit
            # must not queue for the event loop in front of the checks it could answer. (The
            # token is taken on the loop, by the one lookup that calls the registry.)
            raise RegistryBusyError("lookups of uncached keys over the rate limit")
        return self._resolve(credential)

    def find_client(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    def invalidate(self, digest: bytes | None, client_id: str | None) -> int:
        """Forget a key's answer (here and in the shared tier) and every cached key of a
        client; return the entries dropped from this process."""
        dropped = 0
        if digest is not None:
            dropped += self._cache.pop(digest) is not None
            if self._shared is not None:  # every replica gets the change; deleting twice is fine
                self._in_background(self._shared.delete(digest))
        if client_id is not None:
            dropped += self._cache.pop_where(
                lambda v: isinstance(v, Client) and v.client_id == client_id
            )
        return dropped

    # --- the change feed (ChangeConsumer) -----------------------------------------------------
    def apply(self, change: Change) -> None:
        """A change evicts its key at once; the client's other keys are dropped lazily, on their
        next hit (``changed_since``), so that a client with many keys costs no scan."""
        self._changes.record(change)
        self.invalidate(change.digest, None)

    async def resync(self) -> None:
        """Changes may have been missed: no answer cached or in flight is trusted. A lookup in
        flight asks again once its answer arrives; a cached key is asked again on its next
        check (``changed_since``), and is never served stale meanwhile, but stays known: the
        cold-lookup limit is for keys never seen, so a resync cannot turn the checks of every
        known key into 503s. Refusals are forgotten (the key may exist now)."""
        self._changes.lost_track()
        self._cache.pop_where(lambda value: not isinstance(value, Client))

    # --- on the event loop ---------------------------------------------------------------------
    async def _resolve(self, credential: Credential) -> Known:
        digest = credential.digest
        task = self._inflight.get(digest)
        if task is None:
            # Looked again here: the answer may have arrived since the caller looked.
            entry = self._cache.get(digest)
            if entry is not None and self._clock() < entry.fresh_until:
                answer = entry.value
                if not isinstance(answer, Client) or not self._changes.changed_since(
                    entry.tag, answer.client_id
                ):
                    return answer
            if entry is None and not self._cold.take():
                raise RegistryBusyError("lookups of uncached keys over the rate limit")
            task = self._start(credential)
        # shield: a check that gives up (its deadline) must not cancel the call for the others
        return await asyncio.shield(task)

    def _refresh(self, credential: Credential) -> None:
        if credential.digest not in self._inflight:
            self._start(credential)

    def _start(self, credential: Credential) -> asyncio.Task[Known]:
        task = self._loop.create_task(self._fetch(credential))
        self._inflight[credential.digest] = task
        task.add_done_callback(_retrieve_exception)
        return task

    async def _fetch(self, credential: Credential) -> Known:
        """The one call for a key: its answer is stored before it stops being in flight, so a
        lookup arriving in between finds one or the other, never neither."""
        digest = credential.digest
        try:
            answer, ttl = await self._ask(credential)
        except Exception:
            entry = self._cache.get(digest)
            if (
                entry is not None
                and isinstance(entry.value, Client)
                and self._clock() < entry.stale_until
                and not self._changes.changed_since(entry.tag, entry.value.client_id)
            ):
                self._count("stale_served")
                return entry.value
            raise
        else:
            return self._store(digest, answer, ttl)
        finally:
            del self._inflight[digest]

    async def _ask(self, credential: Credential) -> tuple[Answer, float | None]:
        """An answer no change has overtaken, with the seconds it may stay fresh (None: our
        TTL): from the shared tier if it has one, else from the registry."""
        shared = self._shared
        for _ in range(_ASKS):
            mark = self._changes.mark()
            if shared is not None:
                found = await shared.get(credential.digest)
                if found is not None:
                    judged = self._changes.judge(credential.digest, found[0], mark)
                    if judged is not STALE:
                        return judged, found[1]
            answer = await self.backend.verify(credential)
            judged = self._changes.judge(credential.digest, answer, mark)
            if judged is STALE:
                continue
            if shared is not None and judged is answer:
                self._in_background(shared.set(credential.digest, answer, self._ttl(answer)))
            return judged, None
        raise RegistryError("the registry's answers keep predating its change feed")

    def _ttl(self, answer: Answer) -> float:
        positive = isinstance(answer.result, Client)
        ttl = self._settings.positive_ttl if positive else self._settings.negative_ttl
        return ttl * (1 + self._settings.jitter * (2 * self._rand() - 1))

    def _store(self, digest: bytes, answer: Answer, ttl: float | None) -> Known:
        """Cache an answer (for ``ttl`` seconds, default our own TTL); return what to serve."""
        result = answer.result
        if ttl is None:
            ttl = self._ttl(answer)
        now = self._clock()
        fresh_until = now + ttl
        stale_until = fresh_until
        if isinstance(result, Client):
            result = self._intern(result)
            stale_until += self._settings.max_stale
            if answer.valid_until is not None:
                # Neither the TTL nor an outage may stretch a key past its end (a grace period).
                end = now + answer.valid_until - time.time()
                fresh_until, stale_until = min(fresh_until, end), min(stale_until, end)
        refresh_at = now + (fresh_until - now) * self._settings.refresh_ahead
        self._cache.put(
            digest, Entry(result, fresh_until, stale_until, refresh_at, self._changes.mark())
        )
        return result

    def _intern(self, client: Client) -> Client:
        known = self._clients.get(client.client_id)
        if known == client:
            return known
        if len(self._clients) >= self._settings.max_entries:
            self._clients.clear()  # bounded; clients are interned again as they are seen
        self._clients[client.client_id] = client
        return client

    def _count(self, result: str) -> None:
        with self._count_lock:
            self.lookups[result] += 1

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)


def _retrieve_exception(task: asyncio.Task[Known]) -> None:
    # The callers may all have given up; the outcome is still consumed so that asyncio does not
    # report it as never retrieved.
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
