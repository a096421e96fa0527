"""``AUTHZ_REGISTRY=snapshot`` against a registry whose feed and snapshot misbehave: the copy in
memory keeps answering, and revocations keep arriving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e import harness
from tests.robustness.conftest import (
    accounted,
    in_front_of,
    resynced_then_revoked,
    scrape,
    until_allowed,
    until_denied,
    until_metric,
)
from tests.robustness.faulty_registry import FaultyRegistry, poll

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, faulty: FaultyRegistry
) -> Iterator[harness.Service]:
    with in_front_of(
        tmp_path_factory.mktemp("authz"),
        faulty,
        registry="snapshot",
        snapshot_poll_interval="0.1",
    ) as running:
        yield running


async def test_a_malformed_event_reloads_the_snapshot_and_revocations_still_arrive(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """A poisoned event is counted and the copy is reloaded; the next revocation takes
    effect within a second."""
    key = await registry.add_key("snapshot-poisoned")
    before, _ = await resynced_then_revoked(
        service,
        registry,
        key,
        lambda: registry.event(json.dumps({"version": None, "op": "delete"})),
        "the resync",
    )
    after = await scrape(service)
    assert after.value("authz_feed_malformed_events_total") == (
        before.value("authz_feed_malformed_events_total") + 1
    )
    assert (await registry.state())["snapshot_calls"] >= 2


async def test_a_snapshot_cut_short_is_refused_and_the_copy_in_use_keeps_answering(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """A resync meets an NDJSON snapshot without its trailer: it is not taken in (the copy in
    use keeps answering, as it was), and the next whole snapshot is, with the change the
    resync was for."""
    kept, lost = await registry.add_key("snapshot-kept"), await registry.add_key("snapshot-lost")
    async with accounted(service) as checks:
        await until_allowed(checks, kept)
        await until_allowed(checks, lost)
        await registry.faults(snapshot="cut")
        await registry.revoke(lost, silent=True)  # only a new snapshot can tell
        await registry.event("not json")
        await _until_logged(service, '"event": "feed_resync_failed"')
        assert (await checks.check(kept)).status.code == 0
        assert (await checks.check(lost)).status.code == 0
        await registry.faults()
        await until_denied(checks, lost, within=5.0)
        assert (await checks.check(kept)).status.code == 0


async def _until_logged(service: harness.Service, text: str) -> None:
    async def logs() -> str:
        return service.logs()

    await poll(logs, lambda found: text in found, text, within=5)


async def test_a_change_log_that_no_longer_reaches_back_reloads_the_snapshot(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """A revocation lost to the change log: 410 on the resumed stream, the snapshot is
    reloaded, and the key is refused."""
    key = await registry.add_key("snapshot-pruned")
    async with accounted(service) as checks:
        await until_allowed(checks, key)
        await registry.revoke(key, silent=True)
        await registry.end_streams()
        await until_denied(checks, key, within=3.0)
    await until_metric(
        service, lambda m: m.value("authz_feed_mode", mode="streaming") == 1, "streaming again"
    )
