"""A client's rate limit changed in the real registry takes effect in authz-service (HTTP mode)
through the change feed, not when a cached answer expires: through the real Envoy, a burst
gets the old quota, and once the change event has arrived, the new one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.test_rate_limits import at_once, statuses

pytestmark = pytest.mark.e2e


def test_a_limit_changed_in_the_registry_applies_through_the_change_feed(tmp_path: Path) -> None:
    """Limited to 3 an hour: 3 of a burst of 6. Raised to 8 an hour in the registry: with
    answers cached for an hour, the next check is allowed within seconds, under the new
    policy, and so are 4 of a burst of 8 (the 3 used stay used: 8 - 3 - 1)."""
    with (
        harness.registry_process(tmp_path) as registry,
        harness.authz_service(
            tmp_path,
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            cache_ttl="3600",
        ) as service,
        harness.echo_upstream() as upstream,
        harness.envoy(tmp_path, harness.render_front_proxy(0, 0, service, upstream.port)) as proxy,
    ):
        created = registry.admin(
            "POST",
            "/clients",
            {
                "client_name": "Limited",
                "email": "limited@example.com",
                "rate_limit": {"requests_per_unit": 3, "unit": "hour"},
            },
        )
        authorized = [("Authorization", f"ApiKey {created['api_key']}")]

        def burst(size: int) -> list[harness.Response]:
            return at_once(size, lambda _: harness.send(proxy.port, "/orders", authorized))

        harness.wait_until(lambda: "feed_connected" in service.logs(), 5, "the change feed")
        old = burst(6)
        assert statuses(old) == [200] * 3 + [429] * 3
        assert {reply.header("ratelimit-policy") for reply in old} == {'"client";q=3;w=3600'}

        registry.admin(
            "PATCH",
            f"/clients/{created['client_id']}",
            {"rate_limit": {"requests_per_unit": 8, "unit": "hour"}},
        )
        first: list[harness.Response] = []

        def allowed_again() -> bool:
            # Denied checks take nothing from the bucket: until the change arrives, these
            # are 429s that cost the client nothing.
            first[:] = [harness.send(proxy.port, "/orders", authorized)]
            return first[0].status == 200

        harness.wait_until(allowed_again, 5, "the new limit, through the change feed")
        assert first[0].header("ratelimit-policy") == '"client";q=8;w=3600'
        assert re.fullmatch(r'"client";r=4(;t=\d+)?', first[0].header("ratelimit") or "")
        new = burst(8)
        assert statuses(new) == [200] * 4 + [429] * 4
        assert {reply.header("ratelimit-policy") for reply in new} == {'"client";q=8;w=3600'}
