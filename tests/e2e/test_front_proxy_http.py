"""envoy/front-proxy-http.yaml through a real Envoy.

First Envoy's side of the HTTP wire contract, against a stand-in check server that records each
check and answers whatever status the key names: what a check carries, and what Envoy does with
each kind of answer, including some authz-service never gives. Then authz-service's own HTTP
check server behind the sample: what an allow passes upstream, keep-alive, request bodies, and
Envoy's timeout as the check's deadline. That both transports answer alike is
test_transport_parity.py's table.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e
MAX_MESSAGE_BYTES = 16384  # AUTHZ_MAX_MESSAGE_BYTES of this module's service
ALLOW = [
    ("x-client-id", "acme"),
    ("x-client-name", "Acme Corp"),
    ("x-client-roles", "reader"),
    ("x-envoy-auth-headers-to-remove", "authorization"),
    ("x-authz-client-id", "acme"),
    ("x-authz-client-name", "Acme Corp"),
    ("x-authz-key-id", "0123abcd"),
    ("x-unlisted", "never forwarded"),
]
DENY = [
    ("www-authenticate", 'ApiKey realm="authz-service"'),
    ("retry-after", "1"),
    ("x-ext-authz-reason", "some_reason"),
    ("x-ext-authz-rule", "some-rule"),
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
    ("ratelimit", "limit=10, remaining=0, reset=1"),
    ("ratelimit-policy", "10;w=1"),
    ("x-unlisted", "never forwarded"),
]
DENY_BODY = b'{"error": "denied", "reason": "some_reason"}'


@dataclass
class CheckServer:
    """Answers `Authorization: ApiKey allow` with an allow, `ApiKey <status>` with that deny;
    records every check request it gets."""

    port: int = 0
    checks: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def check_server() -> Iterator[CheckServer]:
    stub = CheckServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as in the harness's echo upstream

        def answer(self) -> None:
            stub.checks.append((self.command, self.path, list(self.headers.items())))
            key = self.headers.get("authorization", "").removeprefix("ApiKey ")
            status, headers, body = (
                (200, ALLOW, b"") if key == "allow" else (int(key), DENY, DENY_BODY)
            )
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self.answer()

        def do_POST(self) -> None:
            self.answer()

        def log_message(self, *args: object) -> None:
            pass

    with harness.serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as stub.port:
        yield stub


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[harness.Service]:
    with harness.authz_service(
        tmp_path_factory.mktemp("authz-http"), keys.path, max_message_bytes=str(MAX_MESSAGE_BYTES)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    check_server: CheckServer,
    authz: harness.Service,
    upstream: harness.Upstream,
) -> Iterator[harness.Envoy]:
    """The sample, checking with the stand-in; access logs go to a real authz-service."""
    endpoints = {
        "authz_http": check_server.port,
        "authz_access_log": authz.access_log_port,
        "upstream": upstream.port,
    }
    config = harness.render(harness.FRONT_PROXY_HTTP, 0, 0, endpoints)
    with harness.envoy(tmp_path_factory.mktemp("envoy-http"), config) as running:
        yield running


SPOOFED = [
    ("X-Client-Id", "evil"),
    ("x-client-id", "evil-2"),
    ("x-client-roles", "admin"),
    ("x-authz-route-required-roles", "none"),
    ("x-authz-client-id", "evil"),
    ("cookie", "session=secret"),
]


def test_an_answer_header_that_is_not_listed_never_reaches_the_upstream(
    proxy: harness.Envoy, upstream: harness.Upstream
) -> None:
    reply = harness.send(proxy.port, "/orders", [("Authorization", "ApiKey allow"), *SPOOFED])
    assert reply.status == 200
    assert upstream.values(-1, "x-client-id") == ["acme"]
    assert upstream.values(-1, "x-unlisted") == []


def test_the_check_carries_method_path_query_host_and_the_listed_headers_only(
    proxy: harness.Envoy, check_server: CheckServer
) -> None:
    """No body, no cookie, no client copy of a route header; the filter's timeout in ms."""
    harness.send(
        proxy.port,
        "/orders/1?page=2",
        [
            ("Authorization", "ApiKey 401"),
            ("x-request-id", "r-1"),
            ("traceparent", "00-1-2-01"),
            *SPOOFED,
        ],
        method="POST",
    )
    method, path, headers = check_server.checks[-1]
    assert (method, path) == ("POST", "/orders/1?page=2")
    assert dict(headers) == {
        "host": f"127.0.0.1:{proxy.port}",
        "content-length": "0",
        "authorization": "ApiKey 401",
        "x-request-id": "r-1",
        "traceparent": "00-1-2-01",
        "x-envoy-internal": "true",
        "x-envoy-expected-rq-timeout-ms": "250",
    }


def test_the_billing_route_adds_its_requirements_to_the_check_once(
    proxy: harness.Envoy, check_server: CheckServer
) -> None:
    harness.send(proxy.port, "/billing/invoices", [("Authorization", "ApiKey 403"), *SPOOFED])
    _, path, headers = check_server.checks[-1]
    assert path == "/billing/invoices"
    route = [(k, v) for k, v in headers if k.startswith("x-authz-route-")]
    assert route == [
        ("x-authz-route-required-roles", "billing,admin"),
        ("x-authz-route-rule-id", "billing-route"),
    ]
    assert ("authorization", "ApiKey 403") in headers


@pytest.mark.parametrize("status", [400, 401, 403, 413, 429])
def test_a_deny_reaches_the_client_with_its_status_body_and_listed_headers(
    proxy: harness.Envoy, upstream: harness.Upstream, status: int
) -> None:
    before = len(upstream.seen)
    reply = harness.send(proxy.port, "/orders", [("Authorization", f"ApiKey {status}")])
    assert reply.status == status
    assert reply.body == DENY_BODY
    for name, value in DENY:
        assert reply.header(name) == (None if name == "x-unlisted" else value)
    assert len(upstream.seen) == before


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_answer_is_a_failed_check_to_envoy_and_loses_its_body_and_headers(
    proxy: harness.Envoy, upstream: harness.Upstream, status: int
) -> None:
    """Envoy's http_service treats any 5xx as an error, not a deny: status_on_error (503)
    applies, with Envoy's empty body, and failure_mode_allow: true would let it through."""
    before = len(upstream.seen)
    reply = harness.send(proxy.port, "/orders", [("Authorization", f"ApiKey {status}")])
    assert (reply.status, reply.body, reply.header("x-ext-authz-reason")) == (503, b"", None)
    assert len(upstream.seen) == before


def test_the_health_route_skips_the_check_and_strips_identity(
    proxy: harness.Envoy, upstream: harness.Upstream, check_server: CheckServer
) -> None:
    checks = len(check_server.checks)
    reply = harness.send(proxy.port, "/healthz", [("x-client-id", "evil")])
    assert reply.status == 200
    assert upstream.values(-1, "x-client-id") == []
    assert len(check_server.checks) == checks
    assert harness.send(proxy.port, "/healthz", [("x_client_id", "evil")]).status == 400


def test_with_failure_mode_allow_a_5xx_answer_would_let_the_request_in(
    tmp_path: Path,
    check_server: CheckServer,
    authz: harness.Service,
    upstream: harness.Upstream,
) -> None:
    """Why the sample (and Istio's failOpen) must stay fail-closed in HTTP mode: a 503 deny
    becomes an allow, key included."""
    endpoints = {
        "authz_http": check_server.port,
        "authz_access_log": authz.access_log_port,
        "upstream": upstream.port,
    }
    config = harness.render(harness.FRONT_PROXY_HTTP, 0, 0, endpoints)
    ext_authz_filter(config)["failure_mode_allow"] = True
    with harness.envoy(tmp_path, config) as fail_open:
        reply = harness.send(fail_open.port, "/orders", [("Authorization", "ApiKey 503")])
        assert reply.status == 200
        assert upstream.values(-1, "authorization") == ["ApiKey 503"]


def ext_authz_filter(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_authz filter's typed_config in a rendered sample."""
    (manager,) = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    found: dict[str, Any] = next(
        f["typed_config"]
        for f in manager["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    )
    return found


# --- authz-service behind the sample ----------------------------------------------------------


@pytest.fixture(scope="module")
def sample(
    tmp_path_factory: pytest.TempPathFactory, authz: harness.Service, upstream: harness.Upstream
) -> Iterator[harness.Envoy]:
    config = harness.render_front_proxy_http(0, 0, authz, upstream.port)
    with harness.envoy(tmp_path_factory.mktemp("envoy-sample"), config) as running:
        yield running


def test_an_allow_gives_the_upstream_our_identity_and_nothing_else_of_the_answer(
    sample: harness.Envoy, upstream: harness.Upstream, keys: Keys
) -> None:
    """Our identity replaces the client's; the key, the metadata headers (which only Envoy's
    access log reads) and the removal list stay out."""
    reply = harness.send(
        sample.port, "/orders", [("Authorization", f"ApiKey {keys.acme}"), *SPOOFED]
    )
    assert reply.status == 200
    assert upstream.values(-1, "x-client-id") == ["acme"]
    assert upstream.values(-1, "x-client-name") == ["Acme Corp"]
    assert upstream.values(-1, "x-client-roles") == ["reader,writer"]
    assert upstream.values(-1, "authorization") == []
    assert upstream.values(-1, "x-authz-client-id") == ["evil"]  # the client's own, not ours
    assert upstream.values(-1, "x-authz-client-name") == []
    assert upstream.values(-1, "x-authz-key-id") == []
    assert upstream.values(-1, "x-envoy-auth-headers-to-remove") == []


def test_envoy_keeps_one_connection_to_the_check_server_for_many_checks(
    sample: harness.Envoy, keys: Keys
) -> None:
    """HTTP/1.1 keep-alive: allows and denies alike leave the connection open for the next
    check, so 200 checks in a row need at most one new connection and none is closed by us."""
    allowed, denied = [("Authorization", f"ApiKey {keys.acme}")], [("Authorization", "ApiKey no")]
    before = sample.counters("cluster.authz_http.")
    for i in range(100):
        assert harness.send(sample.port, f"/many/{i}", allowed).status == 200
        assert harness.send(sample.port, f"/many/{i}", denied).status == 401
    after = sample.counters("cluster.authz_http.")

    def added(name: str) -> int:
        return after[f"cluster.authz_http.{name}"] - before[f"cluster.authz_http.{name}"]

    assert added("upstream_rq_total") == 200
    assert added("upstream_cx_total") <= 1
    assert added("upstream_cx_destroy_remote") == 0


def test_a_deny_of_a_head_request_keeps_the_connection_to_the_check_server(
    sample: harness.Envoy, keys: Keys
) -> None:
    before = sample.counters("cluster.authz_http.")
    reply = harness.send(sample.port, "/orders", [], "HEAD")
    assert (reply.status, reply.header("x-ext-authz-reason")) == (401, "missing_credential")
    allowed = [("Authorization", f"ApiKey {keys.acme}")]
    assert harness.send(sample.port, "/orders", allowed).status == 200
    after = sample.counters("cluster.authz_http.")
    for name in ("upstream_cx_protocol_error", "upstream_cx_destroy_local"):
        assert after[f"cluster.authz_http.{name}"] == before[f"cluster.authz_http.{name}"], name


def test_with_a_path_prefix_on_both_sides_the_policy_sees_the_original_path(
    tmp_path: Path, keys: Keys, upstream: harness.Upstream
) -> None:
    """http_service.path_prefix in Envoy (on the filter and on /billing's own http_service) and
    AUTHZ_HTTP_CHECK_PATH_PREFIX in the service: the prefix is removed before the policy and
    the log see the path, so /admin stays closed and /billing keeps its requirements."""
    policy = tmp_path / "policy.yaml"
    policy.write_text((harness.ROOT / "examples" / "policy.yaml").read_text())
    with harness.authz_service(
        tmp_path, keys.path, policy_file=str(policy), http_check_path_prefix="/authz"
    ) as service:
        config = harness.render_front_proxy_http(0, 0, service, upstream.port)
        ext_authz_filter(config)["http_service"]["path_prefix"] = "/authz"
        (manager,) = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        for route in manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]:
            per_route = route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz")
            if per_route and "check_settings" in per_route:
                per_route["check_settings"]["http_service"]["path_prefix"] = "/authz"
        with harness.envoy(tmp_path, config) as proxy:
            authorized = [("Authorization", f"ApiKey {keys.acme}")]
            logged = len(service.decisions())
            assert harness.send(proxy.port, "/orders?page=2", authorized).status == 200
            admin = harness.send(proxy.port, "/%61dmin/users", authorized)
            billing = harness.send(proxy.port, "/billing/invoices", authorized)
            paths = [line["path"] for line in service.decisions()[logged:]]
    assert (admin.status, admin.header("x-ext-authz-rule")) == (403, "admin-area")
    assert (billing.status, billing.header("x-ext-authz-rule")) == (403, "billing-route")
    assert paths == ["/orders", "/admin/users", "/billing/invoices"]


@pytest.fixture(scope="module")
def with_body(
    tmp_path_factory: pytest.TempPathFactory, authz: harness.Service, upstream: harness.Upstream
) -> Iterator[harness.Envoy]:
    """The sample with with_request_body: Envoy buffers the body (up to 1 MiB) into the check."""
    config = harness.render_front_proxy_http(0, 0, authz, upstream.port)
    ext_authz_filter(config)["with_request_body"] = {
        "max_request_bytes": 1 << 20,
        "allow_partial_message": False,
    }
    with harness.envoy(tmp_path_factory.mktemp("envoy-body"), config) as running:
        yield running


def test_a_body_within_the_limit_is_checked_and_reaches_the_upstream_whole(
    with_body: harness.Envoy, upstream: harness.Upstream, keys: Keys
) -> None:
    body = b"b" * MAX_MESSAGE_BYTES
    authorized = [("Authorization", f"ApiKey {keys.acme}")]
    assert harness.send(with_body.port, "/upload", authorized, "POST", body=body).status == 200
    assert upstream.bodies[-1] == body


@pytest.mark.parametrize("size", [MAX_MESSAGE_BYTES + 1, 512 * 1024])
def test_a_body_over_the_limit_is_denied_413_through_envoy(
    with_body: harness.Envoy,
    authz: harness.Service,
    upstream: harness.Upstream,
    keys: Keys,
    size: int,
) -> None:
    """Over AUTHZ_MAX_MESSAGE_BYTES: our 413 request_too_large reaches the client, and is
    logged; the check server closes that connection, and the next check gets a new one."""
    authorized = [("Authorization", f"ApiKey {keys.acme}")]
    logged, reached = len(authz.decisions()), len(upstream.seen)
    reply = harness.send(with_body.port, "/upload", authorized, "POST", body=b"b" * size)
    assert reply.status == 413
    assert reply.header("x-ext-authz-reason") == "request_too_large"
    assert reply.json()["reason"] == "request_too_large"
    assert len(upstream.seen) == reached
    (decision,) = authz.decisions()[logged:]
    assert decision["reason"] == "request_too_large"
    assert harness.send(with_body.port, "/upload", authorized, "POST", body=b"b").status == 200


def test_a_hung_registry_is_denied_within_envoys_timeout_not_ours(
    tmp_path: Path, upstream: harness.Upstream
) -> None:
    """The check's deadline is Envoy's (x-envoy-expected-rq-timeout-ms, 250 ms in the sample),
    not our much longer AUTHZ_CHECK_TIMEOUT: with the registry stopped mid-call, we answer 503
    deadline_exceeded and Envoy gets that answer rather than timing out itself. (Envoy then
    serves any 5xx as its status_on_error.)"""
    with harness.registry_process(tmp_path) as registry:
        client = registry.create_client("Waiting Client")
        with harness.authz_service(
            tmp_path,
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            check_timeout="2",
            registry_timeout="1.5",
        ) as service:
            config = harness.render_front_proxy_http(0, 0, service, upstream.port)
            with harness.envoy(tmp_path, config) as proxy:
                registry.process.send_signal(signal.SIGSTOP)
                try:
                    logged = len(service.decisions())
                    reply = harness.send(
                        proxy.port, "/orders", [("Authorization", f"ApiKey {client['api_key']}")]
                    )
                    (decision,) = service.decisions()[logged:]
                finally:
                    registry.process.send_signal(signal.SIGCONT)
                counters = proxy.counters("cluster.authz_http.upstream_rq_")
    assert reply.status == 503
    assert decision["reason"] == "deadline_exceeded"
    assert counters["cluster.authz_http.upstream_rq_503"] == 1
    assert counters["cluster.authz_http.upstream_rq_timeout"] == 0
