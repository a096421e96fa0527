"""The optional second cache tier, shared by every replica through Redis (via aiocache), so that
a fleet makes one registry call per key per TTL rather than one per replica.

It never decides anything on its own: a Redis failure, a timeout or an entry it cannot read is
a miss, and a circuit breaker stops paying the timeout while Redis is down. Entries carry their
expiry (wall clock), so every replica honours the same TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from authz_service import contract, logs
from authz_service.breaker import CircuitBreaker
from authz_service.contract import Answer

if TYPE_CHECKING:
    from authz_service.tracing import Tracing

log = logging.getLogger(__name__)
# The Redis command that each aiocache operation used here makes, for tracing.
_COMMANDS = {"get": "GET", "raw": "SET", "delete": "DEL"}


class SharedCache:
    def __init__(
        self,
        url: str,
        namespace: str,
        timeout: float,
        breaker: CircuitBreaker,
        tracing: Tracing | None = None,
    ) -> None:
        try:  # only needed with AUTHZ_REDIS_URL set: an optional extra
            from aiocache import RedisCache  # noqa: PLC0415
            from aiocache.serializers import StringSerializer  # noqa: PLC0415
        except ImportError:
            raise RuntimeError(
                "AUTHZ_REDIS_URL (redis_url) needs the redis extra: "
                "pip install 'authz-service[redis]'"
            ) from None

        parts = urlsplit(url)
        self._cache: Any = RedisCache(
            endpoint=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(parts.path.strip("/") or 0),
            password=parts.password,
            namespace=f"{namespace}:",
            serializer=StringSerializer(),
            timeout=timeout,
        )
        self._breaker = breaker
        self._tracing = tracing
        self._url = url

    async def get(self, digest: bytes) -> tuple[Answer, float] | None:
        """The shared answer and the seconds it stays fresh, or None."""
        text = await self._guarded("get", digest.hex())
        if not isinstance(text, str):
            return None
        try:
            entry = json.loads(text)
            remaining = float(entry["until"]) - time.time()
            answer = contract.parse_answer(entry["answer"])
        except (ValueError, KeyError, TypeError, RecursionError):  # ContractError is a ValueError
            log.warning(
                "unreadable shared cache entry ignored",
                extra={"fields": {"event": "shared_cache_invalid"}},
            )
            return None
        return (answer, remaining) if remaining > 0 else None

    async def set(self, digest: bytes, answer: Answer, ttl: float) -> None:
        """Share an answer (in the contract's own form, with the version it reflects)."""
        body = {"answer": contract.answer_document(answer), "until": time.time() + ttl}
        # SET ... EX through aiocache's raw passthrough: its own set() uses SETEX, which
        # redis-py 5+ deprecates.
        await self._guarded(
            "raw",
            "set",
            self._cache.build_key(digest.hex()),
            json.dumps(body),
            ex=max(1, round(ttl)),
        )

    async def delete(self, digest: bytes) -> None:
        await self._guarded("delete", digest.hex())

    async def close(self) -> None:
        await self._cache.client.aclose()  # aiocache's close() calls the deprecated close()

    async def _guarded(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        if not self._breaker.allow():
            return None
        try:
            work = getattr(self._cache, operation)(*args, **kwargs)
            if self._tracing is not None:
                work = self._tracing.redis_call(work, _COMMANDS[operation], self._url)
            result = await work
        except asyncio.CancelledError:
            self._breaker.abandoned()
            raise
        except Exception as exc:  # any Redis trouble degrades to the in-process tier
            self._breaker.failed()
            logs.failure(
                log,
                "shared cache unavailable; using the in-process cache only",
                "shared_cache_error",
                exc,
                operation=operation,
                breaker=self._breaker.state.value,
            )
            return None
        self._breaker.succeeded()
        return result
