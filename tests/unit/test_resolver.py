"""The caching resolver: fast hits, one call per cold key, honest answers during outages, and no
answer ever cached or served after a change that overtook it."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz_service import apikeys
from authz_service.changes import RecentChanges
from authz_service.contract import Answer, Change, Entry
from authz_service.model import ApiKey, Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import Known, RegistryBusyError, RegistryError
from authz_service.resolver import CachingResolver, ResolverSettings
from tests.fakes import FakeVerifier

KEY = "azk_hot"
OTHER = "azk_other_key_of_c1"
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
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, digest[:6].hex())


async def resolve(resolver: CachingResolver, key: str = KEY) -> Known:
    """As the check does: the answer in memory, or else await the lookup on the loop."""
    found = resolver.lookup(credential(key))
    return found if isinstance(found, Client | Reason) else await found


def cached(resolver: CachingResolver, key: str = KEY) -> Known | None:
    """The answer in memory, or None when the registry would be asked."""
    found = resolver.lookup(credential(key))
    if isinstance(found, Client | Reason):
        return found
    found.close()
    return None


def delete(key: str, version: int, reason: Reason = Reason.KEY_REVOKED) -> Change:
    return Change(version, "delete", apikeys.digest(key), "c-1", reason=reason)


def upsert(key: str, version: int, client: Client = CLIENT) -> Change:
    digest = apikeys.digest(key)
    return Change(version, "upsert", digest, client.client_id, Entry(digest, client, None))


@pytest.fixture
def backend() -> FakeVerifier:
    return FakeVerifier({KEY: CLIENT, OTHER: CLIENT})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def resolver(backend: FakeVerifier, clock: Clock) -> CachingResolver:
    return CachingResolver(
        backend,
        SETTINGS,
        asyncio.get_running_loop(),
        RecentChanges(retention=600, clock=clock),
        clock=clock,
        rand=lambda: 0.5,
    )


async def test_a_resolved_key_is_then_answered_from_memory(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """After one registry call, hits need no waiting and no call."""
    assert cached(resolver) is None
    assert await resolve(resolver) == CLIENT
    assert cached(resolver) == CLIENT
    assert backend.calls == 1
    assert resolver.lookups["hit"] == 1


async def test_concurrent_checks_of_one_cold_key_make_exactly_one_registry_call(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """Single-flight: waiters join the call in flight, and checks that looked before the
    answer was stored but join after it find the stored answer, never a second call."""
    release = backend.hold()
    early = [resolver.lookup(credential()) for _ in range(500)]  # all miss, before any call
    tasks = [
        asyncio.ensure_future(lookup) for lookup in early if not isinstance(lookup, Client | Reason)
    ]
    await backend.started.wait()
    release.set()
    late = [asyncio.ensure_future(resolve(resolver)) for _ in range(500)]
    assert set(await asyncio.gather(*tasks, *late)) == {CLIENT}
    assert backend.calls == 1


async def test_a_check_that_gives_up_does_not_cancel_the_call_for_the_others(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """One waiter's deadline leaves the shared registry call running."""
    release = backend.hold()
    impatient = asyncio.ensure_future(resolve(resolver))
    patient = asyncio.ensure_future(resolve(resolver))
    await backend.started.wait()
    impatient.cancel()
    release.set()
    assert await patient == CLIENT
    assert backend.calls == 1


async def test_negative_answers_are_cached_for_the_shorter_ttl(
    resolver: CachingResolver, backend: FakeVerifier, clock: Clock
) -> None:
    """A refusal is remembered, but not for as long as an allow."""
    assert await resolve(resolver, "azk_unknown") is Reason.UNKNOWN_KEY
    assert cached(resolver, "azk_unknown") is Reason.UNKNOWN_KEY
    clock.now += 2
    assert cached(resolver, "azk_unknown") is None


async def test_a_hit_late_in_its_ttl_refreshes_once_in_the_background(
    resolver: CachingResolver, backend: FakeVerifier, clock: Clock
) -> None:
    """Stale-while-revalidate: the hit is served, one refresh runs, the TTL starts again."""
    await resolve(resolver)
    clock.now += 8.5
    for _ in range(10):
        assert cached(resolver) == CLIENT
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert backend.calls == 2
    clock.now += 9
    assert cached(resolver) == CLIENT


async def test_during_an_outage_valid_keys_work_until_max_stale_then_503(
    resolver: CachingResolver, backend: FakeVerifier, clock: Clock
) -> None:
    """Stale-if-error is bounded by max_stale; unknown keys get an error (503) at once."""
    await resolve(resolver)
    backend.error = RegistryError("registry down")
    clock.now += 10 + 59
    assert await resolve(resolver) == CLIENT
    assert resolver.lookups["stale_served"] == 1
    with pytest.raises(RegistryError):
        await resolve(resolver, "azk_never_seen")
    clock.now += 1
    with pytest.raises(RegistryError):
        await resolve(resolver)


async def test_a_registry_refusal_replaces_a_cached_client(
    resolver: CachingResolver, backend: FakeVerifier, clock: Clock
) -> None:
    """A revoked answer wins over the stale entry: no stale allow after a refusal."""
    await resolve(resolver)
    backend.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED)
    clock.now += 10
    assert await resolve(resolver) is Reason.KEY_REVOKED
    backend.error = RegistryError("down")
    assert cached(resolver) is Reason.KEY_REVOKED


async def test_errors_are_never_cached(resolver: CachingResolver, backend: FakeVerifier) -> None:
    """After a failed call, the next lookup asks again."""
    backend.error = RegistryError("blip")
    with pytest.raises(RegistryError):
        await resolve(resolver)
    backend.error = None
    assert cached(resolver) is None
    assert await resolve(resolver) == CLIENT


async def test_lookups_of_never_seen_keys_are_rate_limited(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """A random-key flood is cut at the burst; cached keys are not affected."""
    await resolve(resolver)
    refused = 0
    for n in range(20):
        try:
            await resolve(resolver, f"azk_random_{n}")
        except RegistryBusyError:
            refused += 1
    assert backend.calls == 5  # a burst of 5: the hot key and four random ones
    assert refused == 16
    assert cached(resolver) == CLIENT


async def test_past_the_rate_limit_a_new_key_is_refused_without_the_event_loop(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """Once the cold-lookup bucket is empty, lookup refuses on the caller's thread: no
    coroutine is handed to the loop, so junk never queues in front of answers from memory."""
    for n in range(5):
        await resolve(resolver, f"azk_burst_{n}")
    with pytest.raises(RegistryBusyError):
        resolver.lookup(credential("azk_one_too_many"))
    assert backend.calls == 5


async def test_a_key_is_never_served_past_its_valid_until(
    resolver: CachingResolver, backend: FakeVerifier, clock: Clock
) -> None:
    """A grace period caps the TTL and stale-if-error alike."""
    backend.answers[apikeys.digest(KEY)] = Answer(CLIENT, valid_until=time.time() + 3)
    await resolve(resolver)
    clock.now += 2.9
    assert cached(resolver) == CLIENT
    clock.now += 0.2
    assert cached(resolver) is None  # the TTL was 10 s, the key ended at 3 s
    backend.error = RegistryError("down")
    with pytest.raises(RegistryError):  # and no stale allow past its end either
        await resolve(resolver)


async def test_each_client_is_held_once_however_many_of_its_keys_are_cached(
    resolver: CachingResolver, backend: FakeVerifier
) -> None:
    """Equal answers for two keys share one Client object."""
    backend.answers[apikeys.digest(OTHER)] = Answer(Client("c-1", "One"))
    first, second = await resolve(resolver), await resolve(resolver, OTHER)
    assert first is second


class TestChanges:
    """The change feed evicts at once, and no answer older than a change survives it."""

    async def test_a_change_evicts_the_key_and_its_clients_other_keys(
        self, resolver: CachingResolver
    ) -> None:
        """A change names a key and a client; both stop being served from memory."""
        await resolve(resolver)
        await resolve(resolver, OTHER)
        resolver.apply(delete(KEY, 7))
        assert cached(resolver) is None
        assert cached(resolver, OTHER) is None

    async def test_a_revocation_during_a_lookup_is_not_overtaken_by_its_late_answer(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """The registry read "valid", then the key was revoked and the feed said so, then the
        answer arrived: it is neither served nor cached (issue: allowed for ~25 s)."""
        release = backend.hold()
        lookup = asyncio.ensure_future(resolve(resolver))
        await backend.started.wait()  # the registry has read the key as valid
        resolver.apply(delete(KEY, 8))  # the revocation arrives first; nothing to evict
        backend.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED)
        release.set()
        assert await lookup is Reason.KEY_REVOKED
        assert cached(resolver) is Reason.KEY_REVOKED

    async def test_a_lagging_replicas_valid_answer_never_readmits_a_revoked_key(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """After the feed's delete, an answer made before it (an older version) is refused."""
        resolver.apply(delete(KEY, 8))
        backend.answers[apikeys.digest(KEY)] = Answer(CLIENT, version=5)
        assert await resolve(resolver) is Reason.KEY_REVOKED
        assert cached(resolver) is Reason.KEY_REVOKED

    async def test_without_versions_a_tombstone_holds_until_an_upsert_lifts_it(
        self, resolver: CachingResolver, backend: FakeVerifier, clock: Clock
    ) -> None:
        """A registry that sends no versions cannot show its answer is newer than the delete,
        so the delete stands; an upsert for the key lifts it."""
        resolver.apply(delete(KEY, 8, Reason.CLIENT_SUSPENDED))
        assert await resolve(resolver) is Reason.CLIENT_SUSPENDED
        clock.now += 2  # past the negative TTL
        resolver.apply(upsert(KEY, 9))
        assert await resolve(resolver) == CLIENT

    async def test_an_answer_newer_than_the_delete_is_accepted(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """A key re-validated after its delete (its upsert not delivered yet) works."""
        resolver.apply(delete(KEY, 8))
        backend.answers[apikeys.digest(KEY)] = Answer(CLIENT, version=9)
        assert await resolve(resolver) == CLIENT

    async def test_an_update_during_a_lookup_makes_it_ask_again(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """New roles arrive while the old ones are in flight: the old answer is dropped and the
        registry asked again."""
        release = backend.hold()
        lookup = asyncio.ensure_future(resolve(resolver))
        await backend.started.wait()
        promoted = Client("c-1", "One", ("admin",))
        resolver.apply(upsert(KEY, 8, promoted))
        backend.answers[apikeys.digest(KEY)] = Answer(promoted)
        release.set()
        assert await lookup == promoted
        assert backend.calls == 2

    async def test_a_suspension_during_a_background_refresh_is_not_overtaken(
        self, resolver: CachingResolver, backend: FakeVerifier, clock: Clock
    ) -> None:
        """The same race, for a stale-while-revalidate refresh."""
        await resolve(resolver)
        clock.now += 8.5
        release = backend.hold()
        backend.started.clear()
        assert cached(resolver) == CLIENT  # starts the refresh
        await backend.started.wait()
        resolver.apply(delete(KEY, 9, Reason.CLIENT_SUSPENDED))
        release.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert cached(resolver) is Reason.CLIENT_SUSPENDED

    async def test_a_change_for_the_client_during_a_lookup_of_another_key(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """An answer that predates a change to its client is not cached either."""
        release = backend.hold()
        lookup = asyncio.ensure_future(resolve(resolver, OTHER))
        await backend.started.wait()
        resolver.apply(delete(KEY, 8, Reason.CLIENT_SUSPENDED))
        backend.answers[apikeys.digest(OTHER)] = Answer(Reason.CLIENT_SUSPENDED)
        release.set()
        assert await lookup is Reason.CLIENT_SUSPENDED

    async def test_a_resync_forgets_every_answer(self, resolver: CachingResolver) -> None:
        """After changes may have been missed, nothing cached is trusted."""
        await resolve(resolver)
        await resolver.resync()
        assert cached(resolver) is None

    async def test_after_a_resync_known_keys_are_asked_again_past_the_cold_lookup_limit(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """The registry's answer decides again, and a key already known is not refused as if
        it had never been seen, however many new keys took the cold-lookup burst."""
        await resolve(resolver)
        for n in range(4):  # the rest of the burst of 5
            await resolve(resolver, f"azk_burst_{n}")
        await resolver.resync()
        backend.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED)
        assert await resolve(resolver) is Reason.KEY_REVOKED
        with pytest.raises(RegistryBusyError):
            resolver.lookup(credential("azk_never_seen"))

    async def test_an_answer_in_flight_across_a_resync_is_asked_again(
        self, resolver: CachingResolver, backend: FakeVerifier
    ) -> None:
        """Changes missed before a resync cannot be judged: the answer that overlapped it is
        not trusted, and the registry is asked once more."""
        release = backend.hold()
        lookup = asyncio.ensure_future(resolve(resolver))
        await backend.started.wait()
        await resolver.resync()
        backend.answers[apikeys.digest(KEY)] = Answer(Reason.KEY_REVOKED)
        release.set()
        assert await lookup is Reason.KEY_REVOKED
        assert backend.calls == 2
