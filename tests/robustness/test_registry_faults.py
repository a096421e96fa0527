"""authz-service (``AUTHZ_REGISTRY=http``) in front of a registry that fails in every way it can:
each fault ends in an explicit deny for a key it must not admit, and races with revocations
never re-admit a revoked key.

Every check goes through ``accounted``: a CheckResponse with an explicit decision, counted once,
logged once, no key in the output.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from authz_service import apikeys
from tests.e2e import harness
from tests.robustness.conftest import (
    accounted,
    all_denied,
    decisions,
    in_front_of,
    scrape,
    until_allowed,
    until_applied,
    until_denied,
)
from tests.robustness.faulty_registry import ECHOES, WRONG_TYPES, FaultyRegistry

pytestmark = pytest.mark.e2e

REGISTRY_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, faulty: FaultyRegistry
) -> Iterator[harness.Service]:
    """The breaker never opens here, so that every check meets the fault in force; refusals
    are cached briefly, so that repeated checks ask the registry again."""
    with in_front_of(
        tmp_path_factory.mktemp("authz"),
        faulty,
        registry_timeout=str(REGISTRY_TIMEOUT),
        check_timeout="1.0",
        registry_breaker_failures="1000",
        cache_negative_ttl="0.1",
    ) as running:
        yield running


FAULTS: list[Any] = [
    pytest.param({"verify": "slow", "delay": REGISTRY_TIMEOUT + 0.2}, id="slow"),
    pytest.param({"verify": "hang"}, id="hang"),
    pytest.param({"verify": "reset"}, id="connection-reset"),
    pytest.param({"verify": "error", "status": 500}, id="http-500"),
    pytest.param({"verify": "error", "status": 404}, id="http-404"),
    pytest.param({"verify": "garbage"}, id="garbage"),
    pytest.param({"verify": "nested"}, id="nested-json"),
    pytest.param({"verify": "huge"}, id="huge-json"),
    *(
        pytest.param({"verify": "wrong_types", "variant": name}, id=f"wrong-type-{name}")
        for name in WRONG_TYPES
    ),
    *(
        pytest.param({"verify": "echo", "variant": where}, id=f"key-echoed-in-{where}")
        for where in ECHOES
    ),
]


@pytest.mark.parametrize("faults", FAULTS)
async def test_a_faulty_answer_for_an_unknown_key_is_an_explicit_503(
    service: harness.Service, registry: FaultyRegistry, faults: dict[str, Any]
) -> None:
    """Whatever the registry does instead of answering, the key is denied with 503
    registry_unavailable, the failure is logged, and nothing it sent (the key) is."""
    await registry.faults(**faults)
    asked = (await registry.state())["verify_calls"]
    async with accounted(service) as checks:
        reply = await checks.check(apikeys.generate())
    assert (reply.status.message, reply.denied_response.status.code) == (
        "registry_unavailable",
        503,
    )
    assert (await registry.state())["verify_calls"] > asked, "the registry was asked"
    assert '"event": "registry_error"' in service.logs()


async def test_a_valid_answer_whose_valid_until_has_passed_is_denied(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """A "valid" verdict that ends in the past is an expired key."""
    key = await registry.add_key("expiring")
    await registry.faults(verify="expired")
    async with accounted(service) as checks:
        reply = await checks.check(key)
    assert reply.status.message == "key_expired"


async def test_a_check_without_a_grpc_deadline_on_a_cold_key_is_allowed(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """No deadline (grpcurl's default) means our own check timeout, not an instant deny."""
    key = await registry.add_key("no-deadline")
    async with accounted(service) as checks:
        reply = await checks.check(key, deadline=None)
    assert reply.status.code == 0, reply.status.message


async def test_grpcurl_on_a_cold_key_is_allowed(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """The README's debugging path, with the real grpcurl binary, which sends no deadline."""
    key = await registry.add_key("grpcurl")
    request_id = f"grpcurl-{uuid.uuid4().hex}"
    data = json.dumps(
        {
            "attributes": {
                "request": {
                    "http": {
                        "method": "GET",
                        "host": "api",
                        "path": "/",
                        "headers": {"authorization": f"ApiKey {key}", "x-request-id": request_id},
                    }
                }
            }
        }
    )
    async with accounted(service) as checks:
        output = await asyncio.to_thread(
            harness.grpcurl,
            service.grpc_target,
            "envoy.service.auth.v3.Authorization/Check",
            data=data,
        )
        checks.external(request_id, key)
    reply = json.loads(output)
    assert reply["status"].get("code", 0) == 0, reply


async def test_garbage_bytes_are_denied_counted_and_logged_once(
    service: harness.Service,
) -> None:
    """Bytes that are no CheckRequest: a 400 each, one count and one log line each."""
    garbage = [b"\xff\xff\xff\xff", b"\x0a\x05\x12\x03", b"\x00" * 3 + b"\xff" * 61]
    unparsable = sum(1 for r in decisions(service) if r["reason"] == "request_unparsable")
    before = await scrape(service)
    async with accounted(service) as checks:
        for data in garbage:
            reply = await checks.raw(data)
            assert (reply.status.message, reply.denied_response.status.code) == (
                "request_unparsable",
                400,
            )
    after = await scrape(service)
    counted = after.value("authz_checks_total", reason="request_unparsable") - before.value(
        "authz_checks_total", reason="request_unparsable"
    )
    assert counted == len(garbage)
    logged = sum(1 for r in decisions(service) if r["reason"] == "request_unparsable")
    assert logged - unparsable == len(garbage)


# --- races with the change feed ----------------------------------------------------------------


async def _denied_throughout(
    checks: Any, key: str, seconds: float, registry: FaultyRegistry
) -> list[Any]:
    """Check ``key`` for ``seconds`` (past several negative TTLs, so the registry is asked
    again meanwhile); return every reply."""
    asked = (await registry.state())["verify_calls"]
    replies = []
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        replies.append(await checks.check(key))
        await asyncio.sleep(0.02)
    assert (await registry.state())["verify_calls"] > asked, "the registry was asked again"
    return replies


@pytest.mark.parametrize("versions", [True, False], ids=["versioned", "unversioned"])
async def test_an_answer_in_flight_when_its_key_is_revoked_is_never_served_or_cached(
    service: harness.Service, registry: FaultyRegistry, versions: bool
) -> None:
    """A lookup is on its way with "valid" while the key is revoked and the feed has applied
    the revocation: that answer is refused, and the key stays denied."""
    key = await registry.add_key(f"race-{versions}")
    await registry.faults(verify="hold", versions=versions)
    async with accounted(service) as checks:
        in_flight = asyncio.create_task(checks.check(key))
        await registry.wait_for(lambda s: s["held"] == 1, "a held lookup")
        sent_at = time.time()
        await registry.revoke(key)
        await until_applied(service, sent_at)
        await registry.faults(versions=versions)  # releases the held "valid"
        reply = await in_flight
        assert reply.status.message == "key_revoked"
        assert all_denied(await _denied_throughout(checks, key, 1.0, registry))


@pytest.mark.parametrize("versions", [True, False], ids=["versioned", "unversioned"])
async def test_a_lagging_replica_never_readmits_a_revoked_key_and_an_upsert_lifts_it(
    service: harness.Service, registry: FaultyRegistry, versions: bool
) -> None:
    """After the feed's delete, a replica still answering "valid" (with its older version, or
    none) is refused every time it is asked; an upsert of the key admits it again."""
    key = await registry.add_key(f"lagging-{versions}")
    async with accounted(service) as checks:
        assert (await checks.check(key)).status.code == 0
        await registry.faults(lag=True, versions=versions)
        await registry.revoke(key)
        await until_denied(checks, key)
        replies = await _denied_throughout(checks, key, 1.0, registry)
        assert {r.status.message for r in replies} == {"key_revoked"}
        await registry.faults(versions=versions)  # the replica catches up
        await registry.restore(key)
        await until_allowed(checks, key)


async def test_a_replica_naming_a_suspended_client_for_another_key_is_refused(
    service: harness.Service, registry: FaultyRegistry
) -> None:
    """Once the feed says a client is suspended, a "valid" answer naming that client, for a
    key the feed never mentioned, does not admit it."""
    known = await registry.add_key("suspended-client")
    async with accounted(service) as checks:
        assert (await checks.check(known)).status.code == 0
        await registry.suspend("suspended-client")
        await until_denied(checks, known)
        await registry.faults(verify="other_client", client_id="suspended-client")
        reply = await checks.check(apikeys.generate())
        assert reply.status.message == "client_suspended"
