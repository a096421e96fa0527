"""Key -> client through the cache, in front of a registry backend. Implements ``Registry``, so
the pipeline cannot tell it from the backend it wraps.

- Hits are answered without waiting (``lookup_now``), negative answers too (shorter TTL).
- Misses make one registry call per key however many checks wait for it (single-flight); the
  call runs on its own, so a check that gives up does not cancel it for the others.
- A hit late in its TTL starts a background refresh (stale-while-revalidate).
- When the registry fails, a previously valid key keeps working until ``max_stale`` after its
  TTL (stale-if-error); unknown keys and everything past ``max_stale`` are denied (503).
- A registry answer (revoked, unknown, suspended, ...) always replaces what was cached; errors
  are never cached.
- Lookups of keys the cache has never seen are rate-limited, so a flood of random keys cannot
  become a flood of registry calls.
- With a shared tier (Redis), a miss asks it before the registry and every registry answer is
  written to it, so a fleet makes one registry call per key per TTL.

Entries are keyed by the SHA-256 of the key, never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from authz_service.cache import Entry, TtlCache
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import Registry, RegistryBusyError
from authz_service.shared_cache import SharedCache

log = logging.getLogger(__name__)

Answer = Client | Reason


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
    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class CachingResolver:
    def __init__(
        self,
        backend: Registry,
        settings: ResolverSettings,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        shared: SharedCache | None = None,
    ) -> None:
        self._backend = backend
        self._shared = shared
        self._background: set[asyncio.Task[None]] = set()
        self._settings = settings
        self._clock = clock
        self._rand = rand
        self._cache: TtlCache[str, Answer] = TtlCache(settings.max_entries)
        self._inflight: dict[str, asyncio.Task[Answer]] = {}
        self._cold = TokenBucket(
            settings.cold_lookups_per_second, settings.cold_lookup_burst, clock
        )
        # Read by /metrics at scrape time. Counted under a lock: lookup_now runs on the check
        # server's worker threads.
        self.lookups = {"hit": 0, "negative_hit": 0, "miss": 0, "stale_served": 0}
        self._count_lock = threading.Lock()
        # Where registry calls run; known once the first one is made (before any entry exists).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        return self._backend.ready

    async def start(self) -> None:
        await self._backend.start()

    async def close(self) -> None:
        for task in [*self._inflight.values(), *self._background]:
            task.cancel()
        await self._backend.close()
        if self._shared is not None:
            await self._shared.close()

    @property
    def backend(self) -> Registry:
        return self._backend

    @property
    def entries(self) -> int:
        return len(self._cache)

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    def lookup_now(self, credential: Credential) -> Answer | None:
        """The cached answer, if fresh; from any thread."""
        entry = self._cache.get(credential.key_hash)
        now = self._clock()
        if entry is None or now >= entry.fresh_until:
            self._count("miss")
            return None
        positive = isinstance(entry.value, Client)
        self._count("hit" if positive else "negative_hit")
        refresh_at = entry.stored_at + (entry.fresh_until - entry.stored_at) * (
            self._settings.refresh_ahead
        )
        if positive and now >= refresh_at and self._loop is not None:
            # Stale-while-revalidate: this check uses the fresh entry; the refresh runs on the
            # event loop (this may be a worker thread).
            self._loop.call_soon_threadsafe(self._fetch, credential)
        return entry.value

    def _count(self, result: str) -> None:
        with self._count_lock:
            self.lookups[result] += 1

    async def lookup(self, credential: Credential) -> Answer:
        task = self._inflight.get(credential.key_hash)
        if task is None:
            if self._cache.get(credential.key_hash) is None and not self._cold.take():
                raise RegistryBusyError("lookups of uncached keys over the rate limit")
            task = self._fetch(credential)
        # shield: a check that gives up (its deadline) must not cancel the call for the others
        return await asyncio.shield(task)

    def find_client(self, client_id: str) -> Client | None:
        cached = (v for v in self._cache.values() if isinstance(v, Client))
        found = next((c for c in cached if c.client_id == client_id), None)
        return found or self._backend.find_client(client_id)

    def apply_change(self, change: Mapping[str, Any]) -> None:
        """Evict what a registry change makes stale: the key, and every key of its client."""
        client_id = change.get("client_id")
        if client_id is None and isinstance(change.get("entry"), dict):
            client_id = change["entry"].get("client", {}).get("client_id")
        self.evict(str(change.get("key_hash")), None if client_id is None else str(client_id))

    def evict(self, key_hash: str | None, client_id: str | None) -> int:
        """Forget a key's answer and every cached key of a client; return the entries dropped
        from this process (shared entries of the key are deleted too)."""
        dropped = 0
        if key_hash is not None:
            dropped += self._cache.pop(key_hash) is not None
            if self._shared is not None:  # every replica gets the event; deleting twice is fine
                self._in_background(self._shared.delete(key_hash))
        if client_id is not None:
            dropped += self._cache.pop_where(
                lambda v: isinstance(v, Client) and v.client_id == client_id
            )
        return dropped

    def clear(self) -> None:
        """Forget everything (for instance after missing changes)."""
        self._cache.pop_where(lambda _: True)

    def _fetch(self, credential: Credential) -> asyncio.Task[Answer]:
        """Start (or join) the registry call for a key; on the event loop only."""
        task = self._inflight.get(credential.key_hash)
        if task is None:
            self._loop = asyncio.get_running_loop()
            task = self._loop.create_task(self._call(credential))
            self._inflight[credential.key_hash] = task
            task.add_done_callback(_retrieve_exception)
        return task

    async def _call(self, credential: Credential) -> Answer:
        key_hash = credential.key_hash
        try:
            if self._shared is not None:
                shared = await self._shared.get(key_hash)
                if shared is not None:  # another replica asked the registry already
                    answer, remaining = shared
                    self._store(key_hash, answer, remaining)
                    return answer
            answer = await self._backend.lookup(credential)
        except Exception:
            entry = self._cache.get(key_hash)
            if (
                entry is not None
                and isinstance(entry.value, Client)
                and (self._clock() < entry.stale_until)
            ):
                self._count("stale_served")
                return entry.value
            raise
        finally:
            self._inflight.pop(key_hash, None)
        ttl = self._store(key_hash, answer)
        if self._shared is not None:
            self._in_background(self._shared.set(key_hash, answer, ttl))
        return answer

    def _store(self, key_hash: str, answer: Answer, ttl: float | None = None) -> float:
        """Cache ``answer`` for ``ttl`` seconds (default: the configured TTL, jittered)."""
        positive = isinstance(answer, Client)
        if ttl is None:
            ttl = self._settings.positive_ttl if positive else self._settings.negative_ttl
            ttl *= 1 + self._settings.jitter * (2 * self._rand() - 1)
        now = self._clock()
        fresh_until = now + ttl
        stale_until = fresh_until + (self._settings.max_stale if positive else 0)
        if isinstance(answer, Client) and answer.valid_until is not None:
            # Neither the TTL nor an outage may stretch a key past its end (a grace period).
            end = now + answer.valid_until - time.time()
            fresh_until, stale_until = min(fresh_until, end), min(stale_until, end)
            ttl = fresh_until - now
        self._cache.put(key_hash, Entry(answer, now, fresh_until, stale_until))
        return ttl

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)


def _retrieve_exception(task: asyncio.Task[Answer]) -> None:
    # The callers may all have given up; the outcome is still consumed so that asyncio does not
    # report it as never retrieved.
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
