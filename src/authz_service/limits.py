"""Per-client rate limits: a token bucket per client, applied once a check is allowed.

A client with ``rate_limit: {requests_per_unit: N, unit: U}`` has a bucket of N requests that
refills at N per U. Each allowed check takes one; a check that finds less than one is denied
429 ``rate_limited``. The bucket's parameters come from the client of each decision, so a
changed limit (a change-feed event, a reloaded keys file) applies from the next check on, with
no TTL to wait for: what the client has used stays used, against the new quota.

- **Shared** (``AUTHZ_REDIS_URL``): every replica takes from the same bucket in Redis, with one
  atomic Lua script per check, on Redis's clock (``redis_script``). Any Redis trouble (an
  error, a timeout of ``AUTHZ_REDIS_TIMEOUT``, the circuit breaker open, or no slot left for a
  check to wait in) falls back to the local bucket: a check is never denied because of Redis.
- **Local** (no Redis, or while it is down): each replica keeps its own buckets, so N replicas
  admit up to N times the limit. They are bounded in number; a bucket that has refilled is the
  same as none, so those are dropped first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, Protocol

from authz_service import logs
from authz_service.breaker import CircuitBreaker, State
from authz_service.contract import RATE_UNITS
from authz_service.model import Decision, Quota, RateLimit
from authz_service.reasons import Reason
from authz_service.redis_script import RedisError, RedisScript, Reply

log = logging.getLogger(__name__)

MAX_BUCKETS = 100_000  # clients with a local bucket at once
_KEEP_AFTER_SWEEP = 0.9  # a full table is swept down to this fraction of MAX_BUCKETS

# Refill at the rate the bucket was kept at, then apply a changed limit: the requests used
# stay used. A key that has not been touched for a window holds a full bucket, which is the
# same as no key, so it expires then.
_SCRIPT = """
local capacity = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'capacity', 'window')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = capacity
else
  local was, was_window = tonumber(state[3]), tonumber(state[4])
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(was, tokens + elapsed * was / was_window)
  if was ~= capacity or was_window ~= window then
    tokens = math.max(0, capacity - (was - tokens))
  end
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.6f', now), 'capacity', capacity, 'window', window)
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return {allowed, string.format('%.17g', tokens)}
"""

Taken = tuple[bool, float]  # allowed, and the tokens left in the bucket


class SharedTake(NamedTuple):
    """A check's take from the shared bucket, which the check awaits on the event loop, and
    what decides instead if it may not wait."""

    work: Coroutine[Any, Any, Decision]
    locally: Callable[[], Decision]


class _Bucket:
    __slots__ = ("at", "capacity", "tokens", "window")

    def __init__(self, tokens: float, at: float, capacity: int, window: int) -> None:
        self.tokens, self.at, self.capacity, self.window = tokens, at, capacity, window

    def refill(self, now: float, capacity: int, window: int) -> None:
        elapsed = max(0.0, now - self.at)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.capacity / self.window)
        self.at = now
        if capacity != self.capacity or window != self.window:
            self.tokens = max(0.0, capacity - (self.capacity - self.tokens))
            self.capacity, self.window = capacity, window


class LocalBuckets:
    """This replica's own buckets, by client id. Any thread: one short lock per check."""

    def __init__(
        self, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max = max_buckets
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client_id: str, limit: RateLimit) -> Taken:
        capacity, window = limit.requests_per_unit, RATE_UNITS[limit.unit]
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(client_id)
            if bucket is None:
                if len(self._buckets) >= self._max:
                    self._make_room(now)
                bucket = self._buckets[client_id] = _Bucket(capacity, now, capacity, window)
            elif capacity == bucket.capacity and window == bucket.window:  # the usual case, inline
                tokens = bucket.tokens + max(0.0, now - bucket.at) * capacity / window
                bucket.tokens = capacity if tokens > capacity else tokens
                bucket.at = now
            else:
                bucket.refill(now, capacity, window)
            tokens = bucket.tokens
            if tokens < 1:
                return False, tokens
            bucket.tokens = tokens = tokens - 1
            return True, tokens

    def _make_room(self, now: float) -> None:
        """Drop the buckets that have refilled (nothing is lost), then the oldest, until the
        table is at most 90% full, so that the next sweep is far off."""
        keep = int(self._max * _KEEP_AFTER_SWEEP)
        buckets = self._buckets
        for client_id in [
            client_id
            for client_id, b in buckets.items()
            if b.tokens + max(0.0, now - b.at) * b.capacity / b.window >= b.capacity
        ]:
            del buckets[client_id]
        while len(buckets) > keep:
            del buckets[next(iter(buckets))]


class SharedBuckets:
    """The buckets in Redis, shared by every replica. Used on the event loop only."""

    def __init__(self, url: str, namespace: str, timeout: float, breaker: CircuitBreaker) -> None:
        self._script = RedisScript(url, _SCRIPT, timeout)
        self._prefix = f"{namespace}:rate:"
        self._breaker = breaker

    @property
    def down(self) -> bool:
        """Redis is failing, and its breaker open: checks go to the local buckets at once."""
        return self._breaker.state is State.OPEN

    async def start(self) -> None:
        """Connect and load the script, so that the first checks do not pay for it (and time
        out into the local buckets). Redis being unreachable here is no reason not to start:
        the checks fall back as they go."""
        try:
            await self._script.load()
        except Exception as exc:
            logs.failure(
                log,
                "Redis unreachable at start; rate limits are local until it answers",
                "rate_limit_redis_error",
                exc,
            )

    async def take(self, client_id: str, limit: RateLimit) -> Taken | None:
        """Take one request from the client's shared bucket; None if Redis could not say."""
        if not self._breaker.allow():
            return None
        try:
            taken = _taken(
                await self._script.call(
                    [self._prefix + client_id], [limit.requests_per_unit, RATE_UNITS[limit.unit]]
                )
            )
        except asyncio.CancelledError:
            self._breaker.abandoned()
            raise
        except Exception as exc:  # any Redis trouble: this replica's own bucket decides
            self._breaker.failed()
            logs.failure(
                log,
                "rate limits unavailable in Redis; limiting locally",
                "rate_limit_redis_error",
                exc,
                breaker=self._breaker.state.value,
            )
            return None
        self._breaker.succeeded()
        return taken

    async def close(self) -> None:
        await self._script.close()


def _taken(reply: Reply) -> Taken:
    """The script's reply: [1 if allowed else 0, the tokens left]."""
    if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], bytes)):
        raise RedisError("an answer the script does not give")
    return reply[0] == 1, float(reply[1])


class Shared(Protocol):
    """The shared buckets (``SharedBuckets``)."""

    @property
    def down(self) -> bool: ...

    async def start(self) -> None: ...

    async def take(self, client_id: str, limit: RateLimit) -> Taken | None: ...

    async def close(self) -> None: ...


class RateLimiter:
    """Applies a client's rate limit to a check it is allowed: the shared bucket when there
    is one and Redis is up, else the local one."""

    def __init__(self, local: LocalBuckets, shared: Shared | None = None) -> None:
        self.local = local
        self._shared = shared

    @property
    def mode(self) -> str:
        """Where limits are counted now: ``shared`` (Redis) or ``local`` (this replica)."""
        return "shared" if self._shared is not None and not self._shared.down else "local"

    def take(self, allowed: Decision, limit: RateLimit) -> Decision | SharedTake:
        """The decision with the client's quota applied: at once from the local bucket, or
        the take from Redis that the check awaits on the event loop, in its deadline."""
        if self._shared is None or self._shared.down:
            return self._locally(allowed, limit)
        return SharedTake(
            self._shared_take(self._shared, allowed, limit),
            functools.partial(self._locally, allowed, limit),
        )

    async def _shared_take(self, shared: Shared, allowed: Decision, limit: RateLimit) -> Decision:
        client_id = allowed.client.client_id if allowed.client else ""
        taken = await shared.take(client_id, limit)
        if taken is None:
            return self._locally(allowed, limit)
        return limited(allowed, limit, taken, shared=True)

    def _locally(self, allowed: Decision, limit: RateLimit) -> Decision:
        client_id = allowed.client.client_id if allowed.client else ""
        return limited(allowed, limit, self.local.take(client_id, limit), shared=False)

    async def start(self) -> None:
        if self._shared is not None:
            await self._shared.start()

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()


def limited(allowed: Decision, limit: RateLimit, taken: Taken, *, shared: bool) -> Decision:
    """An allow with its quota, or, without a request left, the 429 in its place."""
    ok, tokens = taken
    quota = standing(limit, tokens, shared)
    if ok:  # (the constructor: several times cheaper than _replace)
        return Decision(
            True,
            allowed.reason,
            allowed.client,
            allowed.rule,
            allowed.dry_run_rule,
            allowed.key_id,
            quota,
        )
    return Decision(False, Reason.RATE_LIMITED, allowed.client, None, None, allowed.key_id, quota)


def standing(limit: RateLimit, tokens: float, shared: bool) -> Quota:
    """What a bucket holding ``tokens`` tells the client: whole requests left, and the
    seconds until one more is available (rounded up, so that a client that waits that long
    finds it; 0 when the bucket is full)."""
    capacity = limit.requests_per_unit
    if tokens >= capacity:
        return Quota(limit, capacity, 0, shared)
    remaining = int(tokens)  # never negative: whole requests
    wait = (remaining + 1 - tokens) * RATE_UNITS[limit.unit] / capacity
    return Quota(limit, remaining, max(1, math.ceil(wait)), shared)
