"""Through a real Envoy with the sample front-proxy config: who gets in, what the upstream sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e


def test_a_valid_key_reaches_the_upstream_with_our_identity_and_without_the_key(
    front_proxy: harness.Envoy, upstream: harness.Upstream, keys: Keys
) -> None:
    """200; the upstream sees exactly our x-client-* values, whatever the client sent; no key."""
    before = len(upstream.seen)
    reply = harness.send(
        front_proxy.port,
        "/orders?page=2",
        [
            ("Authorization", f"ApiKey {keys.acme}"),
            ("X-Client-Id", "attacker"),
            ("x-client-id", "attacker-2"),
            ("X-CLIENT-NAME", "Evil"),
            ("x-client-roles", "admin"),
        ],
    )
    assert reply.status == 200
    assert len(upstream.seen) == before + 1
    assert upstream.values(-1, "x-client-id") == ["acme"]
    assert upstream.values(-1, "x-client-name") == ["Acme Corp"]
    assert upstream.values(-1, "x-client-roles") == ["reader,writer"]
    assert upstream.values(-1, "authorization") == []


def test_a_client_without_roles_cannot_claim_roles(
    front_proxy: harness.Envoy, upstream: harness.Upstream, keys: Keys
) -> None:
    """An x-client-roles header sent by the client is removed when the client has no roles."""
    reply = harness.send(
        front_proxy.port,
        "/",
        [
            ("authorization", f"apikey {keys.plain}"),
            ("x-client-roles", "admin"),
        ],
    )
    assert reply.status == 200
    assert upstream.values(-1, "x-client-id") == ["plain"]
    assert upstream.values(-1, "x-client-roles") == []


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param([], "missing_credential", id="no key"),
        pytest.param([("Authorization", "Bearer abc")], "unsupported_scheme", id="bearer"),
        pytest.param(
            [("Authorization", "ApiKey azk_not_a_real_key")], "unknown_key", id="unknown key"
        ),
        pytest.param(
            [("Authorization", 'ApiKey bad"key')], "malformed_credential", id="illegal character"
        ),
        pytest.param("disabled", "key_disabled", id="disabled key"),
        pytest.param("duplicated", "multiple_credentials", id="two Authorization headers"),
        pytest.param("merged", "multiple_credentials", id="comma-merged keys"),
    ],
)
def test_requests_without_one_valid_key_get_401_and_never_reach_the_upstream(
    front_proxy: harness.Envoy,
    upstream: harness.Upstream,
    keys: Keys,
    headers: list[tuple[str, str]] | str,
    reason: str,
) -> None:
    """401 with the ApiKey challenge, the reason header and a JSON body."""
    if headers == "disabled":
        headers = [("Authorization", f"ApiKey {keys.disabled}")]
    elif headers == "duplicated":
        headers = [("Authorization", f"ApiKey {keys.acme}"), ("Authorization", "ApiKey other")]
    elif headers == "merged":
        headers = [("Authorization", f"ApiKey {keys.acme}, ApiKey {keys.plain}")]
    before = len(upstream.seen)
    reply = harness.send(front_proxy.port, "/orders", headers)  # type: ignore[arg-type]
    assert reply.status == 401
    assert reply.header("www-authenticate") == 'ApiKey realm="authz-service"'
    assert reply.header("x-ext-authz-reason") == reason
    assert reply.header("content-type") == "application/json"
    assert reply.json()["reason"] == reason
    assert reply.json()["error"] == "unauthorized"
    assert len(upstream.seen) == before


def test_a_route_that_bypasses_ext_authz_strips_identity_headers(
    front_proxy: harness.Envoy, upstream: harness.Upstream
) -> None:
    """/healthz skips the check, so the proxy itself removes client-sent x-client-* headers."""
    reply = harness.send(
        front_proxy.port,
        "/healthz",
        [
            ("x-client-id", "attacker"),
            ("x-client-roles", "admin"),
        ],
    )
    assert reply.status == 200
    assert upstream.values(-1, "x-client-id") == []
    assert upstream.values(-1, "x-client-roles") == []


def test_no_key_appears_in_the_service_logs(
    front_proxy: harness.Envoy, service: harness.Service, keys: Keys
) -> None:
    """Decision lines are written for every check, and no key appears in any of them."""
    harness.send(front_proxy.port, "/audit", [("Authorization", f"ApiKey {keys.acme}")])
    harness.send(front_proxy.port, "/audit", [("Authorization", "ApiKey azk_leaky_unknown_key")])
    harness.wait_until(lambda: service.logs().count('"path": "/audit"') >= 2, 5, "decision logs")
    logs = service.logs()
    for key in (keys.acme, keys.plain, keys.disabled, "azk_leaky_unknown_key"):
        assert key not in logs
    assert '"decision": "allow", "reason": "allowed", "client_id": "acme"' in logs


def test_envoy_fails_closed_when_the_service_is_down(
    tmp_path: Path, keys: Keys, upstream: harness.Upstream
) -> None:
    """With authz-service stopped, Envoy answers 503 and the upstream is never reached."""
    with harness.authz_service(tmp_path, keys.path) as service:
        config = harness.render_front_proxy(0, 0, service, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            authorized = [("Authorization", f"ApiKey {keys.acme}")]
            assert harness.send(proxy.port, "/", authorized).status == 200
            assert service.terminate() == 0
            before = len(upstream.seen)
            reply = harness.send(proxy.port, "/", authorized)
            assert reply.status == 503
            assert len(upstream.seen) == before
