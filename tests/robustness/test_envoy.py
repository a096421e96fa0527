"""Through a real Envoy: no client-supplied identity ever reaches the upstream, however it is
spelled, and an oversized request is an explicit 413 even where Envoy would fail open."""

from __future__ import annotations

import http.client
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authz_service.registry.static_file import add_key
from tests.e2e import harness

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Keys:
    acme: str  # roles reader and writer
    plain: str  # no roles


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    acme = add_key(path, "acme", "Acme Corp", ("reader", "writer"))
    return path, Keys(acme, add_key(path, "plain", "Plain Client"))


@pytest.fixture(scope="module")
def keys(keys_file: tuple[Path, Keys]) -> Keys:
    return keys_file[1]


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, keys_file: tuple[Path, Keys]
) -> Iterator[harness.Service]:
    with harness.authz_service(tmp_path_factory.mktemp("authz"), keys_file[0]) as running:
        yield running


@pytest.fixture(scope="module")
def upstream() -> Iterator[harness.Upstream]:
    with harness.echo_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def front_proxy(
    tmp_path_factory: pytest.TempPathFactory, service: harness.Service, upstream: harness.Upstream
) -> Iterator[harness.Envoy]:
    """envoy/front-proxy.yaml as it is, on other ports."""
    config = harness.render_front_proxy(
        harness.free_port(), harness.free_port(), service, upstream.port
    )
    with harness.envoy(tmp_path_factory.mktemp("envoy"), config) as running:
        yield running


IDENTITY = ("x-client-id", "x-client-name", "x-client-roles")
OURS = {  # what the upstream must see for client "acme"
    "x-client-id": "acme",
    "x-client-name": "Acme Corp",
    "x-client-roles": "reader,writer",
}


def as_wsgi(name: str) -> str:
    """The name a WSGI or CGI application reads a header by (HTTP_X_CLIENT_ID)."""
    return "HTTP_" + name.upper().replace("-", "_")


def spellings(name: str) -> list[str]:
    """``name`` in every casing, with hyphens, and with hyphens and underscores mixed."""
    words = name.split("-")
    return [
        name,
        name.upper(),
        "-".join(w.capitalize() for w in words),
        "-".join(w.upper() if n % 2 else w for n, w in enumerate(words)),
    ]


def identity_seen(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Every value of an identity header among ``headers``, by the name WSGI reads it by."""
    wanted = {as_wsgi(name): name for name in IDENTITY}
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        if as_wsgi(name) in wanted:
            seen.setdefault(wanted[as_wsgi(name)], []).append(value)
    return seen


def spoofed(names: Sequence[str]) -> list[tuple[str, str]]:
    """Each spelling, sent twice, with different values."""
    return [(name, f"spoofed-{n}") for name in names for n in (1, 2)]


HYPHENATED = [s for name in IDENTITY for s in spellings(name)]


@dataclass(frozen=True)
class Route:
    path: str
    client: str | None  # whose key the request carries (None: no key)
    expected: dict[str, str]  # the identity headers the upstream must see, exactly


ROUTES = [
    pytest.param(Route("/orders", "acme", OURS), id="checked-route"),
    pytest.param(
        Route("/orders", "plain", {"x-client-id": "plain", "x-client-name": "Plain Client"}),
        id="client-without-roles",
    ),
    pytest.param(Route("/healthz", None, {}), id="unchecked-route"),
]


@pytest.mark.parametrize("route", ROUTES)
def test_spoofed_identity_headers_in_every_casing_never_reach_the_upstream(
    front_proxy: harness.Envoy, upstream: harness.Upstream, keys: Keys, route: Route
) -> None:
    """Identity headers sent by the client, in every casing and repeated, are gone or
    replaced by ours before the upstream sees the request."""
    headers = spoofed(HYPHENATED)
    if route.client is not None:
        headers.append(("Authorization", f"ApiKey {getattr(keys, route.client)}"))
    before = len(upstream.seen)
    reply = harness.send(front_proxy.port, route.path, headers)
    assert reply.status == 200, reply.body
    assert len(upstream.seen) == before + 1
    seen = identity_seen(upstream.seen[-1])
    assert seen == {name: [value] for name, value in route.expected.items()}
    assert upstream.values(-1, "authorization") == []


def test_spoofed_identity_on_a_denied_request_never_reaches_the_upstream(
    front_proxy: harness.Envoy, upstream: harness.Upstream, keys: Keys
) -> None:
    """A client without the route's roles (/billing) is refused; nothing reaches upstream."""
    before = len(upstream.seen)
    headers = [*spoofed(HYPHENATED), ("Authorization", f"ApiKey {keys.acme}")]
    reply = harness.send(front_proxy.port, "/billing/invoices", headers)
    assert reply.status == 403
    assert len(upstream.seen) == before


# --- an oversized request where Envoy fails open ------------------------------------------------

MAX_REQUEST_BYTES = 8 << 20
BODY_BYTES = 2 << 20


def failing_open(config: dict[str, Any]) -> dict[str, Any]:
    """The front proxy with the request body sent to the check (up to 8 MB) and Envoy failing
    open: if the check ever ended in a gRPC error, the request would reach the upstream."""
    (listener,) = config["static_resources"]["listeners"]
    listener["per_connection_buffer_limit_bytes"] = MAX_REQUEST_BYTES * 2
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_authz,) = [
        f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"
    ]
    ext_authz["typed_config"].update(
        failure_mode_allow=True,
        with_request_body={"max_request_bytes": MAX_REQUEST_BYTES, "allow_partial_message": False},
    )
    ext_authz["typed_config"]["grpc_service"]["timeout"] = "5s"
    for cluster in config["static_resources"]["clusters"]:
        cluster["per_connection_buffer_limit_bytes"] = MAX_REQUEST_BYTES * 2
    return config


@dataclass
class BodyUpstream:
    """An upstream that reads each request's body (so that a connection Envoy reuses stays in
    step) and records the size of every body it received."""

    port: int = 0
    bodies: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def body_upstream() -> Iterator[BodyUpstream]:
    upstream = BodyUpstream()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            size = int(self.headers.get("content-length", "0"))
            upstream.bodies.append(len(self.rfile.read(size)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with harness.serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as upstream.port:
        yield upstream


@pytest.fixture(scope="module")
def open_proxy(
    tmp_path_factory: pytest.TempPathFactory, service: harness.Service, body_upstream: BodyUpstream
) -> Iterator[harness.Envoy]:
    config = harness.render_front_proxy(
        harness.free_port(), harness.free_port(), service, body_upstream.port
    )
    with harness.envoy(tmp_path_factory.mktemp("envoy-open"), failing_open(config)) as running:
        yield running


def test_a_2mb_request_gets_an_explicit_413_even_with_failure_mode_allow(
    open_proxy: harness.Envoy, body_upstream: BodyUpstream, keys: Keys
) -> None:
    """The CheckRequest carrying a 2 MB body exceeds AUTHZ_MAX_MESSAGE_BYTES: the check is
    denied 413 request_too_large, which failure_mode_allow cannot turn into an allow."""
    authorized = [("Authorization", f"ApiKey {keys.acme}")]
    assert http_request(open_proxy.port, authorized, b"x" * 1000) == (200, None)
    assert body_upstream.bodies == [1000]  # the same request with a small body is allowed
    status, reason = http_request(open_proxy.port, authorized, b"x" * BODY_BYTES)
    assert body_upstream.bodies == [1000], "the oversized request reached the upstream"
    assert (status, reason) == (413, "request_too_large")


def http_request(
    port: int, headers: Sequence[tuple[str, str]], body: bytes
) -> tuple[int, str | None]:
    """A GET with a body; the status and the x-ext-authz-reason of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", "/upload", skip_accept_encoding=True)
        for name, value in [*headers, ("content-length", str(len(body)))]:
            conn.putheader(name, value)
        conn.endheaders(body)
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.getheader("x-ext-authz-reason")
    finally:
        conn.close()


UNDERSCORED = [
    variant
    for name in IDENTITY
    for variant in (
        name.replace("-", "_"),
        name.replace("-", "_").upper(),
        "_".join(w.capitalize() for w in name.split("-")),
        name.replace("-", "_", 1),  # x_client-id
        "_".join(name.rsplit("-", 1)),  # x-client_id
    )
]


@pytest.mark.parametrize("route", ROUTES)
def test_spoofed_identity_headers_with_underscores_never_reach_the_upstream(
    front_proxy: harness.Envoy, upstream: harness.Upstream, keys: Keys, route: Route
) -> None:
    """x_client_id, X_Client_Roles, x-client_id ...: a WSGI or CGI upstream reads each as
    the identity header, so Envoy must never forward them (it refuses the request, or the
    upstream sees only ours)."""
    headers = spoofed(UNDERSCORED)
    if route.client is not None:
        headers.append(("Authorization", f"ApiKey {getattr(keys, route.client)}"))
    before = len(upstream.seen)
    reply = harness.send(front_proxy.port, route.path, headers)
    if reply.status == 400:  # headers_with_underscores_action: REJECT_REQUEST
        assert len(upstream.seen) == before
        return
    assert reply.status == 200, reply.body
    seen = identity_seen(upstream.seen[-1])
    assert seen == {name: [value] for name, value in route.expected.items()}
