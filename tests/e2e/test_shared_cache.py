"""The shared cache tier against a real Redis: replicas share answers, a change removes the
shared entry, and Redis being down degrades to the in-process tier, never to a deny."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest

from authz_service import apikeys
from authz_service.breaker import CircuitBreaker
from authz_service.changes import RecentChanges
from authz_service.contract import Answer, Change
from authz_service.model import ApiKey, Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import Known
from authz_service.resolver import CachingResolver, ResolverSettings
from authz_service.shared_cache import SharedCache
from tests.e2e import harness
from tests.fakes import FakeVerifier

pytestmark = pytest.mark.e2e
KEY = "azk_shared_key"
CLIENT = Client("c-1", "One", ("reader",))


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port (or REDIS_TEST_URL when set)."""
    if os.environ.get("REDIS_TEST_URL"):
        yield os.environ["REDIS_TEST_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: run scripts/test (Debian: "
            "redis-server) or set REDIS_TEST_URL"
        )
    port = harness.free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        harness.wait_until(lambda: _ping(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _ping(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def credential(key: str = KEY) -> Credential:
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, digest[:6].hex())


class Replica:
    """One authz-service replica's resolution: its own registry client, change feed records
    and in-process cache."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.registry = FakeVerifier({KEY: CLIENT})
        self.shared = SharedCache(
            redis_url, namespace, timeout=0.2, breaker=CircuitBreaker(2, cooldown=60)
        )
        self.resolver = CachingResolver(
            self.registry,
            ResolverSettings(jitter=0),
            asyncio.get_running_loop(),
            RecentChanges(retention=600),
            shared=self.shared,
        )

    async def resolve(self, key: str = KEY) -> Known:
        found = self.resolver.lookup(credential(key))
        return found if isinstance(found, Client | Reason) else await found


@pytest.fixture
async def replicas(
    redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Replica, Replica]]:
    namespace = f"test{abs(hash(request.node.name))}"
    pair = (Replica(redis_url, namespace), Replica(redis_url, namespace))
    yield pair
    for replica in pair:
        await replica.resolver.close()


async def settle() -> None:
    """Let background writes to Redis finish."""
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_a_key_resolved_by_one_replica_costs_the_other_no_registry_call(
    replicas: tuple[Replica, Replica],
) -> None:
    """A fleet makes one registry call per key per TTL, not one per replica."""
    first, second = replicas
    assert await first.resolve() == CLIENT
    await settle()
    assert await second.resolve() == CLIENT
    assert (first.registry.calls, second.registry.calls) == (1, 0)


async def test_negative_answers_are_shared_too(replicas: tuple[Replica, Replica]) -> None:
    """An unknown key asked on one replica is known unknown on the other."""
    first, second = replicas
    assert await first.resolve("azk_unknown_shared") is Reason.UNKNOWN_KEY
    await settle()
    assert await second.resolve("azk_unknown_shared") is Reason.UNKNOWN_KEY
    assert second.registry.calls == 0


async def test_a_registry_change_removes_the_shared_entry(
    replicas: tuple[Replica, Replica],
) -> None:
    """After a revocation event, no replica can refill its cache from Redis."""
    first, second = replicas
    await first.resolve()
    await settle()
    first.resolver.apply(revocation(version=8))
    await settle()
    second.registry.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED)
    assert await second.resolve() is Reason.KEY_REVOKED
    assert second.registry.calls == 1


async def test_a_stale_shared_answer_never_readmits_a_key_its_reader_saw_revoked(
    replicas: tuple[Replica, Replica],
) -> None:
    """A replica that had not seen the revocation yet wrote "valid" (version 5) to Redis; a
    replica that has seen it (version 8) does not take that answer."""
    first, second = replicas
    first.registry.answers[apikeys.digest(KEY)] = Answer(CLIENT, version=5)
    await first.resolve()
    await settle()
    shared = await second.shared.get(apikeys.digest(KEY))
    assert shared is not None
    assert shared[0] == Answer(CLIENT, version=5)
    second.resolver.apply(revocation(version=8))  # the feed reached the second replica only
    second.registry.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED, version=8)
    assert await second.resolve() is Reason.KEY_REVOKED


async def test_redis_down_degrades_to_the_in_process_tier() -> None:
    """Cached keys keep working and new keys go to the registry; nothing is denied for it."""
    with redis_server() as url:
        replica = Replica(url, "down")
        assert await replica.resolve() == CLIENT
        await settle()
    try:
        assert await replica.resolve() == CLIENT
        replica.registry.answers[apikeys.digest("azk_other")] = Answer(CLIENT)
        for _ in range(3):  # the breaker opens; lookups keep working through the registry
            await replica.resolver.resync()
            assert await replica.resolve("azk_other") == CLIENT
    finally:
        await replica.resolver.close()


def revocation(version: int) -> Change:
    return Change(version, "delete", apikeys.digest(KEY), "c-1", reason=Reason.KEY_REVOKED)
