"""What every robustness test shares: the faulty registry, authz-service in front of it, and
checks that are accounted for.

``accounted`` is the suite's common assertion. Every check made through it must come back as a
CheckResponse (a gRPC error fails the test at once) carrying an explicit decision, and on leaving
the block every check must have been counted once in ``authz_checks_total`` and logged once
(by its x-request-id), and no key presented may appear anywhere in the service's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import harness
from tests.robustness.faulty_registry import FaultyRegistry, faulty_registry, poll

CHECK = "/envoy.service.auth.v3.Authorization/Check"
DENY_STATUSES = frozenset({400, 401, 403, 413, 429, 503})


def check_request(authorization: str | None, request_id: str) -> CheckRequest:
    """A CheckRequest as Envoy sends it for ``GET /``."""
    headers = {"x-request-id": request_id}
    if authorization is not None:
        headers["authorization"] = authorization
    http = AttributeContext.HttpRequest(
        method="GET", host="api.example.com", path="/", headers=headers
    )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


def is_explicit(reply: CheckResponse) -> bool:
    """An allow, or a deny with its HTTP status set (Envoy would otherwise pick 403 itself)."""
    return reply.status.code == 0 or reply.denied_response.status.code in DENY_STATUSES


@dataclass
class Checks:
    """Checks over one grpc.aio channel, as Envoy sends them; each gets its own x-request-id."""

    channel: grpc.aio.Channel
    request_ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    raw_checks: int = 0

    async def check(
        self, key: str | None, *, deadline: float | None = 5.0, authorization: str | None = None
    ) -> CheckResponse:
        """Check a request carrying ``key`` (or the Authorization value given), with a gRPC
        deadline of ``deadline`` seconds (None: none, as grpcurl sends by default)."""
        request_id = f"robust-{uuid.uuid4().hex}"
        self.request_ids.append(request_id)
        if key is not None:
            self.keys.append(key)
            authorization = f"ApiKey {key}"
        request = check_request(authorization, request_id)
        return await self.send(request.SerializeToString(), deadline)

    async def send(self, data: bytes, deadline: float | None = 5.0) -> CheckResponse:
        call: Any = self.channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        reply: CheckResponse = await call(data, timeout=deadline)
        assert is_explicit(reply), reply
        return reply

    def external(self, request_id: str, key: str) -> None:
        """Account for a check made by other means (grpcurl)."""
        self.request_ids.append(request_id)
        self.keys.append(key)

    async def raw(self, data: bytes) -> CheckResponse:
        """Bytes as they are, whatever they are (not logged by request id: they have none)."""
        self.raw_checks += 1
        return await self.send(data)

    @property
    def made(self) -> int:
        return len(self.request_ids) + self.raw_checks


@dataclass
class Metrics:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, got), v in self.samples.items() if n == name and wanted <= got)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


async def scrape(service: harness.Service) -> Metrics:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}/metrics") as reply,
    ):
        text = await reply.text()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Metrics(samples)


async def readyz(service: harness.Service) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{service.http_port}/readyz") as reply,
    ):
        return reply.status, await reply.json()


async def until_metric(
    service: harness.Service, condition: Callable[[Metrics], bool], what: str, within: float = 5.0
) -> Metrics:
    """Scrape until ``condition(metrics)`` holds."""
    metrics: Metrics = await poll(lambda: scrape(service), condition, what, within)
    return metrics


async def until_applied(service: harness.Service, sent_at: float) -> None:
    """Until the service has applied a change event that arrived after ``sent_at`` (wall
    clock): the feed's last event is younger than the time since then."""

    async def age_and_when() -> tuple[float | None, float]:
        asked = time.time()
        metrics = await scrape(service)
        age = metrics.value("authz_feed_last_event_age_seconds")
        return (age if metrics.has("authz_feed_last_event_age_seconds") else None), asked

    await poll(
        age_and_when,
        lambda seen: seen[0] is not None and seen[1] - seen[0] > sent_at,
        "the change event applied",
        within=5,
    )


def decisions(service: harness.Service) -> list[dict[str, Any]]:
    """The service's decision log lines so far."""
    found = []
    for line in service.logs().split("\n"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "decision":
                found.append(record)
    return found


async def settled_logs(service: harness.Service, channel: grpc.aio.Channel) -> str:
    """The log once every check answered so far is in it: the records are queued before the
    answer is sent, so once a later check's line is written, theirs are too."""
    fence = f"fence-{uuid.uuid4().hex}"
    checks = Checks(channel)
    await checks.send(check_request(None, fence).SerializeToString())

    async def read() -> str:
        return service.logs()

    logs: str = await poll(read, lambda text: fence in text, "the fence", 5)
    return logs


@contextlib.asynccontextmanager
async def accounted(service: harness.Service) -> AsyncIterator[Checks]:
    """Checks that must each be decided explicitly, counted once and logged once, with no key
    in the service's output (see the module docstring)."""
    before = await scrape(service)
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        checks = Checks(channel)
        yield checks
        after = await scrape(service)
        counted = after.value("authz_checks_total") - before.value("authz_checks_total")
        assert counted == checks.made, f"{checks.made} checks made, {counted} counted"
        logs = await settled_logs(service, channel)
    logged: dict[str, int] = {}
    for record in decisions(service):
        request_id = record.get("request_id")
        if request_id in checks.request_ids:
            logged[request_id] = logged.get(request_id, 0) + 1
    assert logged == dict.fromkeys(checks.request_ids, 1), "each check logged exactly once"
    for key in checks.keys:
        assert key not in logs, "a key reached the service's output"


def in_front_of(
    tmp_path: Path, registry: FaultyRegistry, /, **settings: str
) -> contextlib.AbstractContextManager[harness.Service]:
    """authz-service resolving keys through ``registry`` (``settings``: AUTHZ_ ones by name;
    the mode is http unless they say otherwise)."""
    merged: dict[str, Any] = {"registry": "http", **settings}
    return harness.authz_service(
        tmp_path, registry_url=registry.url, registry_token=registry.token, **merged
    )


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRegistry]:
    with faulty_registry(tmp_path_factory.mktemp("faulty-registry")) as running:
        yield running


@pytest.fixture
async def registry(faulty: FaultyRegistry) -> AsyncIterator[FaultyRegistry]:
    """The module's faulty registry, well-behaved at the start of each test and after it."""
    await faulty.faults()
    yield faulty
    await faulty.faults()


async def until_denied(checks: Checks, key: str, within: float = 1.0) -> None:
    """The key is denied within ``within`` seconds (the README's promise for revocations)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (await checks.check(key)).status.code == 0:
        assert loop.time() < deadline, f"still allowed after {within}s"
        await asyncio.sleep(0.01)


async def until_allowed(checks: Checks, key: str, within: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (await checks.check(key)).status.code != 0:
        assert loop.time() < deadline, f"still denied after {within}s"
        await asyncio.sleep(0.01)


async def resynced_then_revoked(
    service: harness.Service,
    registry: FaultyRegistry,
    key: str,
    poison: Callable[[], Awaitable[object]],
    what: str,
) -> tuple[Metrics, Metrics]:
    """With ``key`` allowed, ``poison`` the feed; once the feed has resynced, revoke the key,
    which must be denied within a second. The metrics before, and at the resync."""
    before = await scrape(service)
    async with accounted(service) as checks:
        await until_allowed(checks, key)
        await poison()
        after = await until_metric(
            service,
            lambda m: (
                m.value("authz_feed_resyncs_total") > before.value("authz_feed_resyncs_total")
            ),
            what,
        )
        await registry.revoke(key)
        await until_denied(checks, key)
    return before, after


def all_denied(replies: Sequence[CheckResponse]) -> bool:
    return all(reply.status.code != 0 for reply in replies)
