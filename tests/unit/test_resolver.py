"""The caching resolver: fast hits, one call per cold key, honest answers during outages."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz_service import apikeys
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryBusyError, RegistryError
from authz_service.resolver import CachingResolver, ResolverSettings
from tests.fakes import FakeRegistry

KEY = "azk_hot"
CLIENT = Client("c-1", "One")
SETTINGS = ResolverSettings(
    positive_ttl=10,
    negative_ttl=2,
    jitter=0,
    refresh_ahead=0.8,
    max_stale=60,
    cold_lookups_per_second=1,
    cold_lookup_burst=5,
)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def credential(key: str = KEY) -> Credential:
    return Credential(key=key, key_hash=apikeys.hash_key(key))


@pytest.fixture
def backend() -> FakeRegistry:
    return FakeRegistry({apikeys.hash_key(KEY): CLIENT})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resolver(backend: FakeRegistry, clock: Clock) -> CachingResolver:
    return CachingResolver(backend, SETTINGS, clock=clock, rand=lambda: 0.5)


async def test_a_resolved_key_is_then_answered_from_memory(
    resolver: CachingResolver, backend: FakeRegistry
) -> None:
    """After one registry call, hits need no waiting and no call."""
    assert resolver.lookup_now(credential()) is None
    assert await resolver.lookup(credential()) == CLIENT
    assert resolver.lookup_now(credential()) == CLIENT
    assert backend.lookups == 1


async def test_concurrent_checks_of_one_cold_key_make_one_registry_call(
    resolver: CachingResolver, backend: FakeRegistry
) -> None:
    """Single-flight: 1000 concurrent lookups, 1 call."""
    backend.delay = 0.05
    answers = await asyncio.gather(*(resolver.lookup(credential()) for _ in range(1000)))
    assert set(answers) == {CLIENT}
    assert backend.lookups == 1


async def test_a_check_that_gives_up_does_not_cancel_the_call_for_the_others(
    resolver: CachingResolver, backend: FakeRegistry
) -> None:
    """The shared call outlives a cancelled waiter."""
    backend.delay = 0.05
    first = asyncio.create_task(resolver.lookup(credential()))
    second = asyncio.create_task(resolver.lookup(credential()))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == CLIENT
    assert backend.lookups == 1


async def test_negative_answers_are_cached_for_the_shorter_ttl(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """Unknown keys are remembered for negative_ttl, then asked again."""
    unknown = credential("azk_unknown")
    assert await resolver.lookup(unknown) is Reason.UNKNOWN_KEY
    clock.now += 1.9
    assert resolver.lookup_now(unknown) is Reason.UNKNOWN_KEY
    clock.now += 0.2
    assert resolver.lookup_now(unknown) is None
    assert backend.lookups == 1


async def test_an_expired_entry_is_asked_again(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """Past positive_ttl, a hit is a miss."""
    await resolver.lookup(credential())
    clock.now += 10
    assert resolver.lookup_now(credential()) is None
    assert await resolver.lookup(credential()) == CLIENT
    assert backend.lookups == 2


async def test_a_hit_late_in_its_ttl_refreshes_once_in_the_background(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """Stale-while-revalidate: the hit is served, one refresh runs, the TTL starts again."""
    await resolver.lookup(credential())
    clock.now += 8.5
    for _ in range(10):
        assert resolver.lookup_now(credential()) == CLIENT
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert backend.lookups == 2
    clock.now += 9
    assert resolver.lookup_now(credential()) == CLIENT


async def test_during_an_outage_valid_keys_work_until_max_stale_then_503(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """Stale-if-error is bounded by max_stale; unknown keys get an error (503) at once."""
    await resolver.lookup(credential())
    backend.error = RegistryError("registry down")
    clock.now += 10 + 59
    assert await resolver.lookup(credential()) == CLIENT
    assert resolver.lookups["stale_served"] == 1
    with pytest.raises(RegistryError):
        await resolver.lookup(credential("azk_never_seen"))
    clock.now += 1
    with pytest.raises(RegistryError):
        await resolver.lookup(credential())


async def test_a_registry_refusal_replaces_a_cached_client(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """A revoked answer wins over the stale entry: no stale allow after a refusal."""
    await resolver.lookup(credential())
    backend.answers[apikeys.hash_key(KEY)] = Reason.KEY_REVOKED
    clock.now += 10
    assert await resolver.lookup(credential()) is Reason.KEY_REVOKED
    backend.error = RegistryError("down")
    assert resolver.lookup_now(credential()) is Reason.KEY_REVOKED


async def test_errors_are_never_cached(resolver: CachingResolver, backend: FakeRegistry) -> None:
    """After a failed call, the next lookup asks again."""
    backend.error = RegistryError("blip")
    with pytest.raises(RegistryError):
        await resolver.lookup(credential())
    backend.error = None
    assert resolver.lookup_now(credential()) is None
    assert await resolver.lookup(credential()) == CLIENT


async def test_lookups_of_never_seen_keys_are_rate_limited(
    resolver: CachingResolver, backend: FakeRegistry
) -> None:
    """A random-key flood is cut at the burst; cached keys are not affected."""
    await resolver.lookup(credential())
    refused = 0
    for n in range(20):
        try:
            await resolver.lookup(credential(f"azk_random_{n}"))
        except RegistryBusyError:
            refused += 1
    assert backend.lookups == 5  # a burst of 5: the hot key and four random ones
    assert refused == 16
    assert resolver.lookup_now(credential()) == CLIENT


async def test_a_registry_change_evicts_the_key_and_its_clients_other_keys(
    resolver: CachingResolver, backend: FakeRegistry
) -> None:
    """A change event names a key and a client; both stop being served from memory."""
    other = "azk_other_key_of_c1"
    backend.answers[apikeys.hash_key(other)] = CLIENT
    await resolver.lookup(credential())
    await resolver.lookup(credential(other))
    resolver.apply_change({"op": "delete", "key_hash": apikeys.hash_key(KEY), "client_id": "c-1"})
    assert resolver.lookup_now(credential()) is None
    assert resolver.lookup_now(credential(other)) is None


async def test_a_key_is_never_served_past_its_valid_until(
    resolver: CachingResolver, backend: FakeRegistry, clock: Clock
) -> None:
    """A grace period caps the TTL and stale-if-error alike."""
    ending = Client("c-1", "One", valid_until=time.time() + 3)
    backend.answers[apikeys.hash_key(KEY)] = ending
    await resolver.lookup(credential())
    clock.now += 2.9
    assert resolver.lookup_now(credential()) == ending
    clock.now += 0.2
    assert resolver.lookup_now(credential()) is None  # TTL was 10 s, the key ended at 3 s
    backend.error = RegistryError("down")
    with pytest.raises(RegistryError):  # and no stale allow past its end either
        await resolver.lookup(credential())
