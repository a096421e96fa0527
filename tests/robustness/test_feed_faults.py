"""The change feed against a registry whose stream misbehaves: poisoned events, a refused
stream, a change log that no longer reaches back (410), a stream that keeps ending. The feed
survives each, and revocations keep arriving.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import harness
from tests.robustness.conftest import (
    Metrics,
    accounted,
    in_front_of,
    resynced_then_revoked,
    scrape,
    until_allowed,
    until_applied,
    until_denied,
    until_metric,
)
from tests.robustness.faulty_registry import FaultyRegistry, key_hash

pytestmark = pytest.mark.e2e

POLL_INTERVAL = 0.1  # seconds between delta polls while the stream is down


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, faulty: FaultyRegistry
) -> Iterator[harness.Service]:
    """A long cache TTL: only the feed can make a revocation take effect within a second."""
    with in_front_of(
        tmp_path_factory.mktemp("authz"),
        faulty,
        cache_ttl="3600",
        snapshot_poll_interval=str(POLL_INTERVAL),
        registry_breaker_failures="1000",
    ) as running:
        yield running


def feed_mode(metrics: Metrics) -> str | None:
    modes = ("streaming", "polling", "connecting")
    return next((m for m in modes if metrics.value("authz_feed_mode", mode=m) == 1), None)


HASH = key_hash("azk_poison")
POISON = [
    pytest.param(
        json.dumps({"version": None, "op": "delete", "key_hash": HASH}), id="version-null"
    ),
    pytest.param('{"version": 3, "op": "del', id="bad-json"),
    pytest.param(json.dumps({"version": 3, "op": "explode", "key_hash": HASH}), id="unknown-op"),
    pytest.param(json.dumps({"version": 3, "op": "delete"}), id="missing-key-hash"),
    pytest.param(json.dumps({"version": 3, "op": "upsert", "key_hash": HASH}), id="missing-entry"),
    pytest.param(json.dumps({"version": 3, "op": "delete", "key_hash": 42}), id="key-hash-number"),
    pytest.param(json.dumps([1, "two"]), id="not-an-object"),
    pytest.param("[" * 5000 + "]" * 5000, id="nested-json"),
]


@pytest.mark.parametrize("data", POISON)
async def test_a_malformed_event_is_counted_and_the_next_revocation_still_arrives_within_1s(
    service: harness.Service, registry: FaultyRegistry, data: str
) -> None:
    """A poisoned event is counted (authz_feed_malformed_events_total) and answered by a
    resync; the feed keeps streaming, and the next revocation takes effect within a second."""
    key = await registry.add_key("poisoned")
    before, after = await resynced_then_revoked(
        service, registry, key, lambda: registry.event(data), "the resync for the malformed event"
    )
    assert after.value("authz_feed_malformed_events_total") == (
        before.value("authz_feed_malformed_events_total") + 1
    )
    assert after.value("authz_feed_resyncs_total") == before.value("authz_feed_resyncs_total") + 1
    assert feed_mode(after) == "streaming"
    assert after.value("authz_background_task_restarts_total", task="change-feed") == 0


async def test_an_event_over_the_size_limit_ends_only_that_stream(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """An oversized event line is refused unread; the feed follows by polling meanwhile and
    streams again, so the next revocation still arrives within a second."""
    key = await registry.add_key("oversized")
    opened = (await registry.state())["streams_opened"]
    async with accounted(service) as checks:
        await until_allowed(checks, key)
        await registry.event(json.dumps({"version": 3, "padding": "x" * 100_000}))
        await registry.revoke(key)
        await until_denied(checks, key)
    await registry.wait_for(lambda s: s["streams_opened"] > opened, "a new stream")


async def test_a_refused_stream_is_followed_by_polling_and_revocations_still_arrive(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """503 with Retry-After (the registry's subscriber limit): the feed says it is polling,
    revocations arrive by polling within a second, and it streams again once allowed."""
    key = await registry.add_key("refused-stream")
    await registry.faults(stream="refuse", retry_after=1)
    await registry.end_streams()
    await registry.wait_for(lambda s: s["streams_refused"] > 0, "a refused stream")
    await until_metric(service, lambda m: feed_mode(m) == "polling", "polling mode")
    async with accounted(service) as checks:
        await until_allowed(checks, key)
        await registry.revoke(key)
        await until_denied(checks, key)
    await registry.faults()
    await until_metric(service, lambda m: feed_mode(m) == "streaming", "streaming again")


async def test_a_malformed_change_met_while_polling_makes_the_feed_resync_and_go_on(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """Polling (the stream refused), the change log serves an entry the contract refuses: it
    is counted and answered by a resync, rather than by asking for the same page again and
    again, and the next revocation still arrives."""
    key = await registry.add_key("poisoned-poll")
    await registry.faults(stream="refuse", retry_after=1)
    await registry.end_streams()
    await until_metric(service, lambda m: feed_mode(m) == "polling", "polling mode")
    before, after = await resynced_then_revoked(
        service,
        registry,
        key,
        lambda: registry.poison_log({"op": "explode", "key_hash": HASH}),
        "the resync for the malformed change",
    )
    assert after.value("authz_feed_malformed_events_total") == (
        before.value("authz_feed_malformed_events_total") + 1
    )
    await registry.faults()
    await until_metric(service, lambda m: feed_mode(m) == "streaming", "streaming again")


async def test_a_change_log_that_no_longer_reaches_back_makes_the_feed_resync(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """A revocation lost to the change log (pruned): the resumed stream gets 410, the feed
    resyncs, the cache is dropped, the key is denied; the feed then streams again from the
    registry's current version, without resyncing over and over."""
    key = await registry.add_key("pruned")
    before = await scrape(service)
    async with accounted(service) as checks:
        await until_allowed(checks, key)
        await registry.revoke(key, silent=True)
        gone = (await registry.state())["gone"]
        await registry.end_streams()
        await until_denied(checks, key)
    state = await registry.wait_for(lambda s: s["streams_open"] == 1, "a stream again")
    after = await until_metric(service, lambda m: feed_mode(m) == "streaming", "streaming")
    assert after.value("authz_feed_resyncs_total") == before.value("authz_feed_resyncs_total") + 1
    assert state["gone"] == gone + 1
    assert state["last_event_ids"][-1] == str(state["version"])


async def test_a_stream_that_keeps_ending_is_resumed_each_time_from_the_last_event_id(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """Ended three times in a row, the stream is open again within two seconds each time,
    resumed with Last-Event-ID at the last change the service saw."""
    for n in range(3):
        sent_at = time.time()
        await registry.add_key(f"resumed-{n}")
        await until_applied(service, sent_at)
        before = await registry.state()
        await registry.end_streams()

        def reopened(state: dict[str, Any], opened: int = before["streams_opened"]) -> bool:
            return bool(state["streams_opened"] > opened and state["streams_open"] == 1)

        state = await registry.wait_for(reopened, f"stream {n + 2}", within=2.0)
        assert state["last_event_ids"][-1] == str(before["version"])
