"""The HTTP check server, spoken to over a real socket: Envoy's http_service contract, answers
in order on kept-alive connections, and an explicit answer to every request, even one that
cannot be read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from authz_service import apikeys
from authz_service.answers import AnswerSettings
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.http_check import MAX_HEADERS, HttpCheckServer, HttpCheckSettings
from authz_service.limits import LocalBuckets, RateLimiter
from authz_service.metrics import Metrics
from authz_service.model import Client, RateLimit
from authz_service.policy import parse
from tests.fakes import FakeRegistry

KEY = "azk_http_key"
CLIENT = Client("c-1", "One", ("reader",))
POLICY = parse(
    "default: allow\nrules: [{id: admin, paths: [{prefix: /admin}], allow: {roles: [admin]}}]",
    "p",
)


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = [
        (name.lower(), value) for name, _, value in (line.partition(": ") for line in head[1:-2])
    ]
    length = int(next(v for k, v in headers if k == "content-length"))
    return Answer(status, headers, await reader.readexactly(length))


def request(path: str = "/orders/1?x=2", *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: api.example.com", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def keyed(path: str = "/orders/1", *headers: str) -> bytes:
    return request(path, f"authorization: ApiKey {KEY}", *headers)


Serve = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    started: list[HttpCheckServer] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(
        registry: FakeRegistry | None = None,
        metrics: Metrics | None = None,
        limits: RateLimiter | None = None,
        quota_headers_on_allow: bool = True,
        **settings: object,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        checker = Checker(
            registry or FakeRegistry({KEY: CLIENT}, in_memory=True),
            CheckSettings(CredentialRules(), check_timeout=1.0),
            asyncio.get_running_loop(),
            metrics,
            policy=lambda: POLICY,
            limits=limits,
        )
        http = HttpCheckServer(
            checker,
            AnswerSettings(),
            HttpCheckSettings(**settings),  # type: ignore[arg-type]
            quota_headers_on_allow,
        )
        port = await http.start("127.0.0.1:0")
        started.append(http)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield start
    for writer in writers:
        writer.close()
        await writer.wait_closed()
    for http in started:
        await http.stop(0)


async def test_an_allow_is_a_200_with_the_identity_to_copy_upstream(server: Serve) -> None:
    """Identity headers, metadata headers for the access log, and the key removed upstream."""
    reader, writer = await server()
    writer.write(keyed())
    answer = await read_answer(reader)
    assert answer.status == 200
    assert answer.header("x-client-id") == "c-1"
    assert answer.header("x-client-roles") == "reader"
    assert answer.header("x-authz-client-id") == "c-1"
    assert answer.header("x-authz-key-id") == apikeys.digest(KEY)[:6].hex()
    assert answer.header("x-envoy-auth-headers-to-remove") == "authorization"
    assert answer.body == b""


async def test_an_identity_header_with_no_value_is_removed_upstream(server: Serve) -> None:
    """A client without roles: its own x-client-roles must not reach the upstream."""
    reader, writer = await server(FakeRegistry({KEY: Client("c-2", "Two")}, in_memory=True))
    writer.write(keyed())
    answer = await read_answer(reader)
    assert answer.header("x-client-roles") is None
    assert answer.header("x-envoy-auth-headers-to-remove") == "x-client-roles,authorization"


async def test_a_deny_carries_the_status_headers_and_body_of_the_grpc_path(
    server: Serve,
) -> None:
    """401 with the challenge; 403 naming the rule; the same JSON body."""
    reader, writer = await server()
    writer.write(request("/orders/1"))
    missing = await read_answer(reader)
    assert missing.status == 401
    assert missing.header("www-authenticate") == 'ApiKey realm="authz-service"'
    assert missing.header("x-ext-authz-reason") == "missing_credential"
    assert json.loads(missing.body)["reason"] == "missing_credential"
    writer.write(keyed("/admin/users"))
    forbidden = await read_answer(reader)
    assert forbidden.status == 403
    assert forbidden.header("x-ext-authz-rule") == "admin"
    assert json.loads(forbidden.body)["rule"] == "admin"


async def test_a_rate_limited_client_gets_its_quota_then_a_429(server: Serve) -> None:
    """Allowed answers carry RateLimit headers (Envoy's allowed_client_headers_on_success
    passes them to the client); over the limit, 429 with retry-after and the same headers."""
    limited = Client("c-5", "Limited", (), RateLimit(2, "minute"))
    reader, writer = await server(
        FakeRegistry({KEY: limited}, in_memory=True), limits=RateLimiter(LocalBuckets())
    )
    answers = []
    for _ in range(3):
        writer.write(keyed())
        answers.append(await read_answer(reader))
    assert [a.status for a in answers] == [200, 200, 429]
    assert answers[0].header("ratelimit-policy") == '"client";q=2;w=60'
    assert answers[0].header("ratelimit") == '"client";r=1;t=30'
    assert answers[0].header("x-client-id") == "c-5"
    over = answers[2]
    assert over.header("x-ext-authz-reason") == "rate_limited"
    assert over.header("retry-after") == over.header("ratelimit").rpartition("t=")[2]  # type: ignore[union-attr]
    assert json.loads(over.body)["reason"] == "rate_limited"


async def test_quota_headers_on_allowed_answers_can_be_turned_off(server: Serve) -> None:
    limited = Client("c-5", "Limited", (), RateLimit(2, "minute"))
    reader, writer = await server(
        FakeRegistry({KEY: limited}, in_memory=True),
        limits=RateLimiter(LocalBuckets()),
        quota_headers_on_allow=False,
    )
    writer.write(keyed())
    answer = await read_answer(reader)
    assert answer.status == 200
    assert answer.header("ratelimit") is None


async def test_answers_come_in_order_on_a_kept_alive_connection(server: Serve) -> None:
    """Requests sent back to back (even pipelined, and with a registry lookup among them) are
    answered in the order they came."""
    registry = FakeRegistry({KEY: CLIENT}, delay=0.05)
    reader, writer = await server(registry)
    writer.write(keyed() + request("/x") + keyed())
    statuses = [(await read_answer(reader)).status for _ in range(3)]
    assert statuses == [200, 401, 200]


async def test_the_path_prefix_is_removed_before_the_policy_sees_the_path(
    server: Serve,
) -> None:
    """Envoy puts path_prefix before the original path; the policy matches the original."""
    reader, writer = await server(path_prefix="/check")
    writer.write(keyed("/check/admin/users"))
    assert (await read_answer(reader)).header("x-ext-authz-rule") == "admin"
    writer.write(keyed("/admin/users"))  # no prefix: not a check request Envoy would send
    answer = await read_answer(reader)
    assert (answer.status, answer.header("x-ext-authz-reason")) == (400, "request_unparsable")


async def test_route_requirements_from_headers_restrict(server: Serve) -> None:
    """x-authz-route-required-roles (from the route's headers_to_add) must admit the client;
    a repeated route header closes the route rather than pick one."""
    reader, writer = await server()
    writer.write(keyed("/billing", "x-authz-route-required-roles: billing"))
    assert (await read_answer(reader)).status == 403
    writer.write(keyed("/billing", "x-authz-route-required-roles: reader"))
    assert (await read_answer(reader)).status == 200
    writer.write(
        keyed(
            "/billing",
            "x-authz-route-required-roles: billing",
            "x-authz-route-required-roles: reader",
        )
    )
    closed = await read_answer(reader)
    assert closed.header("x-ext-authz-reason") == "invalid_route_policy"


async def test_a_route_header_cannot_switch_on_dry_run(server: Serve) -> None:
    """Per-route dry-run would relax a route: over HTTP it is never honoured."""
    reader, writer = await server()
    writer.write(
        keyed("/billing", "x-authz-route-required-roles: billing", "x-authz-route-dry-run: true")
    )
    assert (await read_answer(reader)).status == 403


async def test_envoys_timeout_header_bounds_the_check(server: Serve) -> None:
    """x-envoy-expected-rq-timeout-ms is the check's deadline: a slower lookup is a 503."""
    reader, writer = await server(FakeRegistry({KEY: CLIENT}, delay=5))
    writer.write(keyed("/x", "x-envoy-expected-rq-timeout-ms: 60"))
    answer = await read_answer(reader)
    assert (answer.status, answer.header("x-ext-authz-reason")) == (503, "deadline_exceeded")


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "request_unparsable"),
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", 400, "request_unparsable"),
        (
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"x-%d: 1\r\n" % n for n in range(MAX_HEADERS + 1))
            + b"\r\n",
            413,
            "request_too_large",
        ),
        (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 413, "request_too_large"),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 2000\r\n\r\n" + b"a" * 2000,
            413,
            "request_too_large",
        ),
    ],
    ids=["garbage", "bad header", "too many headers", "huge header", "body over the limit"],
)
async def test_a_request_that_cannot_be_read_gets_an_explicit_answer_then_close(
    server: Serve, raw: bytes, status: int, reason: str
) -> None:
    """Never a dropped connection (Envoy's failure_mode_allow would decide): an answer, then
    the connection is closed. Each is counted like any check."""
    metrics = Metrics()
    reader, writer = await server(metrics=metrics, max_body_bytes=1000)
    writer.write(raw)
    answer = await read_answer(reader)
    assert (answer.status, answer.header("x-ext-authz-reason")) == (status, reason)
    assert await reader.read() == b""  # closed
    labels = {"client_id": "none", "decision": "deny", "reason": reason}
    assert metrics.registry.get_sample_value("authz_checks_total", labels) == 1


async def test_a_request_that_never_finishes_arriving_is_answered_and_closed(
    server: Serve,
) -> None:
    """A request that has begun must arrive within read_timeout."""
    reader, writer = await server(read_timeout=0.2)
    writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n")  # and nothing more
    answer = await read_answer(reader)
    assert (answer.status, answer.header("x-ext-authz-reason")) == (400, "request_unparsable")
    assert await reader.read() == b""


async def test_an_idle_connection_is_closed_after_its_timeout(server: Serve) -> None:
    """Kept-alive connections do not pile up forever."""
    reader, writer = await server(idle_timeout=0.2)
    writer.write(keyed())
    await read_answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_the_server_listens_on_a_unix_socket(tmp_path: Path) -> None:
    """unix:/path addresses, as for the gRPC ports."""
    checker = Checker(
        FakeRegistry({KEY: CLIENT}, in_memory=True),
        CheckSettings(CredentialRules(), check_timeout=1.0),
        asyncio.get_running_loop(),
    )
    http = HttpCheckServer(checker, AnswerSettings(), HttpCheckSettings())
    socket_path = tmp_path / "check.sock"
    await http.start(f"unix:{socket_path}")
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(keyed())
        assert (await read_answer(reader)).status == 200
        writer.close()
        await writer.wait_closed()
    finally:
        await http.stop(0)


async def test_a_deny_of_a_head_request_has_no_body(server: Serve) -> None:
    """RFC 9110: an answer to HEAD has none; Envoy would read a body as the next answer."""
    reader, writer = await server()
    writer.write(request("/x", method="HEAD") + keyed())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    assert head.startswith("HTTP/1.1 401 ")
    assert (await read_answer(reader)).status == 200  # the next answer follows at once
