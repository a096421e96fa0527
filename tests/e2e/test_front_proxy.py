"""Through a real Envoy with the sample front-proxy config: who gets in, what the upstream sees."""

from __future__ import annotations

from collections.abc import Iterator
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


def test_access_logs_reach_a_service_that_requires_a_token(
    tmp_path: Path, keys: Keys, upstream: harness.Upstream
) -> None:
    """With AUTHZ_ACCESS_LOG_TOKEN set, the sample's access-log streams carry it (rendered
    where the sample has its placeholder), and the service counts what they report."""
    with harness.authz_service(tmp_path, keys.path, access_log_token="t0ken-for-envoy") as service:
        config = harness.render_front_proxy(0, 0, service, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            authorized = [("Authorization", f"ApiKey {keys.meter}")]
            assert harness.send(proxy.port, "/status/200/10", authorized).status == 200
            harness.wait_until(
                lambda: (
                    'authz_upstream_responses_total{client_id="meter",status_class="2xx"} 1.0'
                    in harness.send(service.http_port, "/metrics").body.decode()
                ),
                5,
                "the access log entry",
            )


@pytest.fixture(scope="module")
def wsgi_app() -> Iterator[harness.WsgiUpstream]:
    with harness.wsgi_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def wsgi_proxy(
    tmp_path_factory: pytest.TempPathFactory,
    service: harness.Service,
    wsgi_app: harness.WsgiUpstream,
) -> Iterator[harness.Envoy]:
    """envoy/front-proxy.yaml in front of a WSGI application."""
    config = harness.render_front_proxy(0, 0, service, wsgi_app.port)
    with harness.envoy(tmp_path_factory.mktemp("envoy-wsgi"), config) as running:
        yield running


def identity(environ: dict[str, str]) -> dict[str, str]:
    """What a WSGI application reads as the caller's identity."""
    return {k: v for k, v in environ.items() if k.startswith("HTTP_X_CLIENT_")}


ACME = {
    "HTTP_X_CLIENT_ID": "acme",
    "HTTP_X_CLIENT_NAME": "Acme Corp",
    "HTTP_X_CLIENT_ROLES": "reader,writer",
}
SPOOFED_IDENTITIES = [
    pytest.param([("x-client-id", "evil")], id="lower-case"),
    pytest.param([("X-Client-Id", "evil")], id="capitalised"),
    pytest.param([("X-CLIENT-ROLES", "admin")], id="upper-case"),
    pytest.param(
        [("x-client-id", "evil"), ("X-Client-Id", "evil-2"), ("x-client-name", "Evil")],
        id="duplicated",
    ),
    pytest.param([("x_client_id", "evil")], id="underscores"),
    pytest.param([("X_Client_Roles", "admin")], id="underscores capitalised"),
    pytest.param([("X_CLIENT_NAME", "Evil")], id="underscores upper-case"),
    pytest.param([("x-client_id", "evil")], id="hyphen and underscore"),
    pytest.param([("x-client-id", "evil"), ("x_client_id", "evil-2")], id="both spellings"),
]


@pytest.mark.parametrize("spoofed", SPOOFED_IDENTITIES)
@pytest.mark.parametrize(
    "path", [pytest.param("/orders", id="checked"), pytest.param("/healthz", id="unchecked")]
)
def test_no_spelling_of_a_client_sent_identity_reaches_a_wsgi_application(
    wsgi_proxy: harness.Envoy,
    wsgi_app: harness.WsgiUpstream,
    keys: Keys,
    spoofed: list[tuple[str, str]],
    path: str,
) -> None:
    """The application sees our identity (checked route) or none (unchecked), never the
    client's; a header name with an underscore gets the request refused with 400."""
    before = len(wsgi_app.seen)
    reply = harness.send(
        wsgi_proxy.port, path, [("Authorization", f"ApiKey {keys.acme}"), *spoofed]
    )
    if any("_" in name for name, _ in spoofed):
        assert reply.status == 400
        assert len(wsgi_app.seen) == before
    else:
        assert reply.status == 200
        assert len(wsgi_app.seen) == before + 1
        assert identity(wsgi_app.seen[-1]) == (ACME if path == "/orders" else {})


def test_a_client_without_roles_cannot_claim_roles_from_a_wsgi_application(
    wsgi_proxy: harness.Envoy, wsgi_app: harness.WsgiUpstream, keys: Keys
) -> None:
    reply = harness.send(
        wsgi_proxy.port,
        "/orders",
        [("Authorization", f"ApiKey {keys.plain}"), ("X-Client-Roles", "admin")],
    )
    assert reply.status == 200
    assert identity(wsgi_app.seen[-1]) == {
        "HTTP_X_CLIENT_ID": "plain",
        "HTTP_X_CLIENT_NAME": "Plain Client",
    }


def test_any_header_name_with_an_underscore_is_refused_not_only_identity_names(
    wsgi_proxy: harness.Envoy, wsgi_app: harness.WsgiUpstream, keys: Keys
) -> None:
    """The documented cost of the rule: x_trace is refused too, before any check."""
    before = len(wsgi_app.seen)
    reply = harness.send(
        wsgi_proxy.port, "/orders", [("Authorization", f"ApiKey {keys.acme}"), ("x_trace", "1")]
    )
    assert reply.status == 400
    assert len(wsgi_app.seen) == before
