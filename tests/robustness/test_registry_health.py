"""The registry client's own health: the circuit breaker never sticks, whatever its trial call
meets, and a registry that rejects the service token is reported on /readyz until it accepts
it again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authz_service import apikeys
from tests.e2e import harness
from tests.robustness.conftest import accounted, in_front_of, readyz, scrape, until_metric
from tests.robustness.faulty_registry import FaultyRegistry, poll

pytestmark = pytest.mark.e2e

FAILURES = 5
CLOSED, OPEN, HALF_OPEN = 0, 1, 2


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, faulty: FaultyRegistry
) -> Iterator[harness.Service]:
    with in_front_of(
        tmp_path_factory.mktemp("authz"),
        faulty,
        registry_breaker_failures=str(FAILURES),
        registry_breaker_cooldown="0.3",
        snapshot_poll_interval="0.1",
    ) as running:
        yield running


async def until_breaker(service: harness.Service, state: int) -> None:
    await until_metric(
        service, lambda m: m.value("authz_registry_circuit_state") == state, f"breaker {state}"
    )


async def test_the_breaker_recovers_after_a_trial_that_got_nested_json(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """Opened by failures; its half-open trial meets an answer nested thousands deep, which
    re-opens it; once the registry is healthy the next trial closes it, and keys work."""
    valid = await registry.add_key("after-the-outage")
    await registry.faults(verify="error", status=500)
    async with accounted(service) as checks:
        for _ in range(FAILURES):
            await checks.check(apikeys.generate())
        await until_breaker(service, OPEN)
        refused = await checks.check(apikeys.generate())
        assert refused.status.message == "registry_unavailable"
        await registry.faults(verify="nested")
        await until_breaker(service, HALF_OPEN)
        trial = await checks.check(apikeys.generate())
        assert trial.status.message == "registry_unavailable"
        await until_breaker(service, OPEN)
        await registry.faults()
        await until_breaker(service, HALF_OPEN)
        assert (await checks.check(valid)).status.code == 0
        await until_breaker(service, CLOSED)
        unknown = await checks.check(apikeys.generate())
        assert unknown.status.message == "unknown_key"
    metrics = await scrape(service)
    assert metrics.value("authz_registry_calls_total", outcome="circuit_open") >= 1


REJECTED = "the registry rejected AUTHZ_REGISTRY_TOKEN"


@pytest.mark.parametrize("status", ["401", "403"])
async def test_a_rejected_token_is_on_readyz_counted_and_cleared_once_accepted(
    service: harness.Service, registry: FaultyRegistry, status: str
) -> None:
    """The registry starts refusing our token: /readyz says so in words and checks of new
    keys are denied (counted as token_rejected); once it accepts the token again the replica
    is ready without a restart, and keys resolve."""
    key = await registry.add_key("token-rotation")
    before = await scrape(service)
    await registry.faults(token=status)
    _, body = await poll(lambda: readyz(service), lambda r: r[0] == 503, "/readyz 503", within=5)
    assert any(f"{REJECTED} (HTTP {status})" in reason for reason in body["reasons"]), body
    async with accounted(service) as checks:
        reply = await checks.check(key)
        assert (reply.status.message, reply.denied_response.status.code) == (
            "registry_unavailable",
            503,
        )
    during = await scrape(service)
    assert during.value("authz_problem", component="registry") == 1
    rejected = during.value("authz_registry_calls_total", outcome="token_rejected")
    assert rejected == before.value("authz_registry_calls_total", outcome="token_rejected") + 1
    await registry.faults()
    await poll(lambda: readyz(service), lambda r: r[0] == 200, "/readyz 200", within=5)
    async with accounted(service) as checks:
        assert (await checks.check(key)).status.code == 0
    assert (await scrape(service)).value("authz_problem", component="registry") == 0


async def test_readiness_comes_back_once_the_token_is_accepted_even_with_no_check_to_try_it(
    tmp_path_factory: pytest.TempPathFactory, registry: FaultyRegistry
) -> None:
    """Without the change feed (which would notice), only checks talk to the registry, and an
    unready replica gets none: the registry client asks on its own, with backoff, until the
    token is accepted, and /readyz clears without a restart."""
    key = await registry.add_key("token-probe")
    with in_front_of(tmp_path_factory.mktemp("authz"), registry, registry_feed="false") as alone:
        await registry.faults(token="403")
        async with accounted(alone) as checks:
            assert (await checks.check(key)).status.message == "registry_unavailable"
        await poll(lambda: readyz(alone), lambda r: r[0] == 503, "/readyz 503", within=5)
        await registry.faults()
        await poll(lambda: readyz(alone), lambda r: r[0] == 200, "/readyz 200", within=10)
