"""Tracing of checks: each check's span continues the caller's W3C trace (an invalid one starts a
new trace, never an error), carries how the check was decided and never the key, and the I/O a
check waits for is its child. The OTEL_* variables turn it on; nothing else does.

Spans are read from the SDK's in-memory exporter; the OTLP export is tested end to end
(tests/e2e/test_tracing.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz_service import apikeys, app, config, settings, tracing
from authz_service.answers import AnswerSettings
from authz_service.changes import RecentChanges
from authz_service.contract import Answer
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.envoy_codec import Encoder
from authz_service.grpc_server import AuthorizationServicer
from authz_service.model import Authorization, Client, Credential, Decision, Request
from authz_service.policy import parse
from authz_service.reasons import Reason
from authz_service.registry import Registry, RegistryError
from authz_service.resolver import CachingResolver, ResolverSettings
from tests.fakes import FakeRegistry, FakeVerifier

KEY = "azk_traced_key"
CLIENT = Client("c-1", "One", ("reader",))
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
REGISTRY_URL = "http://user:secret@registry.test:8081/v1/keys/verify"
POLICY = parse(
    """
version: 1
default: deny
rules:
  - id: orders-read
    methods: [GET]
    paths: [{prefix: /orders}]
    allow: {roles: [reader]}
""",
    "policy.yaml",
)

Decide = Callable[[Checker, Request], Awaitable[Decision]]


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traces(exported: InMemorySpanExporter) -> Iterator[tracing.Tracing]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    yield tracing.Tracing(provider)
    provider.shutdown()


class TracedVerifier(FakeVerifier):
    """The registry's validation endpoint, making its call in a span as HttpRegistry does."""

    def __init__(self, traces: tracing.Tracing) -> None:
        super().__init__({KEY: CLIENT})
        self.traces = traces

    async def verify(self, credential: Credential) -> Answer:
        return await self.traces.registry_call(super().verify(credential), REGISTRY_URL)


def checker(registry: Registry, traces: tracing.Tracing) -> Checker:
    return Checker(
        registry,
        CheckSettings(CredentialRules(), check_timeout=1.0),
        asyncio.get_running_loop(),
        policy=lambda: POLICY,
        tracing=traces,
    )


def resolver(verifier: FakeVerifier) -> CachingResolver:
    return CachingResolver(
        verifier, ResolverSettings(), asyncio.get_running_loop(), RecentChanges(retention=60)
    )


def request(key: str = KEY, traceparent: str = TRACEPARENT, tracestate: str = "") -> Request:
    return Request(
        is_http=True,
        authorization=Authorization((f"ApiKey {key}",)),
        method="GET",
        path="/orders/1",
        request_id="req-1",
        traceparent=traceparent,
        tracestate=tracestate,
    )


@pytest.fixture(params=["worker thread", "event loop"])
def decide(request: pytest.FixtureRequest) -> Decide:
    """How a transport calls the core: ``check`` on a thread, or ``check_on_loop``."""

    async def on_thread(core: Checker, checked: Request) -> Decision:
        return await asyncio.to_thread(core.check, checked)

    async def on_loop(core: Checker, checked: Request) -> Decision:
        outcome = core.check_on_loop(checked)
        return outcome if isinstance(outcome, Decision) else await outcome

    return on_thread if request.param == "worker thread" else on_loop


def by_name(exported: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exported.get_finished_spans()
    found = {span.name: span for span in spans}
    assert len(found) == len(spans), [span.name for span in spans]
    return found


async def test_a_check_continues_the_callers_trace(
    traces: tracing.Tracing, exported: InMemorySpanExporter, decide: Decide
) -> None:
    """The check's span has the caller's trace id, the caller's span as parent, and its
    tracestate."""
    registry = FakeRegistry({KEY: CLIENT}, in_memory=True)
    await decide(checker(registry, traces), request(tracestate="vendor=abc"))
    span = by_name(exported)[tracing.CHECK_SPAN]
    assert span.kind is SpanKind.SERVER
    assert span.context is not None
    assert span.parent is not None
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.parent.is_remote
    assert dict(span.context.trace_state) == {"vendor": "abc"}


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has no more fields
        "00-" + "a" * 600,
    ],
)
async def test_a_missing_or_invalid_traceparent_starts_a_new_trace_and_never_fails_the_check(
    traces: tracing.Tracing, exported: InMemorySpanExporter, traceparent: str
) -> None:
    registry = FakeRegistry({KEY: CLIENT}, in_memory=True)
    decision = checker(registry, traces).check(request(traceparent=traceparent))
    assert decision.allowed
    span = by_name(exported)[tracing.CHECK_SPAN]
    assert span.parent is None
    assert span.context is not None
    assert span.context.trace_id != int(TRACE_ID, 16)


@pytest.mark.parametrize("step", ["start", "end"])
async def test_a_failure_of_tracing_never_fails_a_check(
    traces: tracing.Tracing,
    decide: Decide,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    step: str,
) -> None:
    """Whether the span cannot start or cannot end, the check is decided as without tracing."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("broken tracer")

    if step == "start":
        monkeypatch.setattr(traces._tracer, "start_span", broken)
    else:
        monkeypatch.setattr(tracing, "_attributes", broken)
    registry = FakeRegistry({KEY: CLIENT}, in_memory=True)
    with caplog.at_level(logging.ERROR):
        decision = await decide(checker(registry, traces), request())
    assert decision.allowed
    assert [r.fields["event"] for r in caplog.records if hasattr(r, "fields")] == ["tracing_error"]


async def test_malformed_trace_context_is_never_quoted_in_our_logs(
    traces: tracing.Tracing, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK warns about a bad tracestate, quoting it; a client could fill our logs so."""
    registry = FakeRegistry({KEY: CLIENT}, in_memory=True)
    with caplog.at_level(logging.WARNING):
        checker(registry, traces).check(request(tracestate="=bad,also bad,=,x=" + "y" * 300))
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


async def test_the_span_carries_how_the_check_was_decided_and_never_the_key(
    traces: tracing.Tracing, exported: InMemorySpanExporter, decide: Decide
) -> None:
    registry = FakeRegistry({KEY: CLIENT}, in_memory=True)
    await decide(checker(registry, traces), request())
    span = by_name(exported)[tracing.CHECK_SPAN]
    assert dict(span.attributes or {}) == {
        "authz.request_id": "req-1",
        "authz.decision": "allow",
        "authz.reason": "allowed",
        "authz.client_id": "c-1",
        "authz.key_id": apikeys.digest(KEY)[:6].hex(),
        "authz.resolution": "memory",
        "authz.rule": "orders-read",
        "authz.policy_path": "/orders/1",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert KEY not in span.to_json()
    assert apikeys.digest(KEY).hex() not in span.to_json()


async def test_a_deny_of_ours_marks_the_span_as_an_error_and_a_clients_deny_does_not(
    traces: tracing.Tracing, exported: InMemorySpanExporter
) -> None:
    """A 503 (the registry is down) is our failure; a 401 (an unknown key) is the client's."""
    failing = FakeRegistry({}, error=RegistryError("down"))
    await asyncio.to_thread(checker(failing, traces).check, request())
    checker(FakeRegistry({}, in_memory=True), traces).check(request(key="azk_unknown"))
    ours, clients = exported.get_finished_spans()
    assert (ours.status.status_code, ours.status.description) == (
        StatusCode.ERROR,
        "registry_unavailable",
    )
    assert dict(clients.attributes or {})["authz.reason"] == "unknown_key"
    assert clients.status.status_code is StatusCode.UNSET


async def test_over_grpc_envoys_span_for_the_call_is_the_parent_rather_than_the_clients(
    traces: tracing.Tracing, exported: InMemorySpanExporter
) -> None:
    """Envoy's tracer sends its span's context as the call's metadata; the request's headers
    still carry the client's, the grandparent."""
    envoys_span = "00f067aa0ba902b7"
    servicer = AuthorizationServicer(
        checker(FakeRegistry({KEY: CLIENT}, in_memory=True), traces),
        Encoder(AnswerSettings()),
        max_message_bytes=65536,
    )
    headers = {"authorization": f"ApiKey {KEY}", "traceparent": TRACEPARENT}
    raw = CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(
                http=AttributeContext.HttpRequest(method="GET", path="/orders", headers=headers)
            )
        )
    ).SerializeToString()
    context: Any = CallContext(
        (("traceparent", f"00-{TRACE_ID}-{envoys_span}-01"), ("tracestate", "envoy=1"))
    )
    answer = await asyncio.to_thread(servicer.check, raw, context)
    assert CheckResponse.FromString(answer).status.code == 0
    span = by_name(exported)[tracing.CHECK_SPAN]
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == envoys_span
    assert span.context is not None
    assert dict(span.context.trace_state) == {"envoy": "1"}


class CallContext:
    """What the Authorization handler reads of a gRPC call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float:
        return 1.0


async def test_the_registry_call_is_a_child_of_the_check_that_waits_for_it(
    traces: tracing.Tracing, exported: InMemorySpanExporter, decide: Decide
) -> None:
    """The call runs in a task of its own (single-flight), started while the check's span is
    current; a second check of the key, answered from memory, makes no call and no child."""
    keys = resolver(TracedVerifier(traces))
    core = checker(keys, traces)
    first = await decide(core, request())
    spans = by_name(exported)
    check, call = spans[tracing.CHECK_SPAN], spans[tracing.REGISTRY_SPAN]
    assert first.allowed
    assert dict(check.attributes or {})["authz.resolution"] == "registry"
    assert call.kind is SpanKind.CLIENT
    assert call.parent is not None
    assert check.context is not None
    assert call.parent.span_id == check.context.span_id
    assert call.context is not None
    assert call.context.trace_id == int(TRACE_ID, 16)
    assert dict(call.attributes or {}) == {
        "server.address": "registry.test",
        "server.port": 8081,
        "http.request.method": "POST",
    }
    assert "secret" not in call.to_json()

    exported.clear()
    await decide(core, request())
    assert [span.name for span in exported.get_finished_spans()] == [tracing.CHECK_SPAN]


async def test_a_failed_call_is_an_error_span_naming_the_error_but_not_quoting_it(
    traces: tracing.Tracing, exported: InMemorySpanExporter
) -> None:
    verifier = TracedVerifier(traces)
    verifier.error = RegistryError("text that is not ours to export")
    decision = await asyncio.to_thread(checker(resolver(verifier), traces).check, request())
    assert decision.reason is Reason.REGISTRY_UNAVAILABLE
    call = by_name(exported)[tracing.REGISTRY_SPAN]
    assert (call.status.status_code, call.status.description) == (
        StatusCode.ERROR,
        "RegistryError",
    )
    assert "not ours" not in call.to_json()


async def test_io_outside_any_check_makes_no_span(
    traces: tracing.Tracing, exported: InMemorySpanExporter
) -> None:
    """A background refresh or a change from the feed is part of no check."""

    async def call() -> str:
        return "answered"

    assert await traces.redis_call(call(), "GET", "redis://127.0.0.1:6379/0") == "answered"
    assert exported.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "authz", "OTEL_TRACES_SAMPLER": "always_on"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp_proto_grpc"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ["otlp_proto_grpc"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ["otlp_proto_http"],
        ),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp_proto_grpc"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
    ],
)
def test_tracing_is_on_when_an_exporter_or_an_otlp_endpoint_is_set(
    environ: dict[str, str], exporters: list[str]
) -> None:
    assert tracing.exporters_asked_for(environ) == exporters


def test_an_unknown_otlp_protocol_is_refused_by_name() -> None:
    with pytest.raises(
        RuntimeError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json' is not an OTLP"
    ):
        tracing.exporters_asked_for(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}
        )


def test_an_exporter_that_is_not_installed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(RuntimeError, match="no span exporter 'zipkin' is installed"):
        tracing.from_environment()


def test_without_otel_variables_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert tracing.from_environment() is None


async def test_tracing_asked_for_without_the_extra_stops_the_start_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    loaded = settings.Settings(keys_file=tmp_path / "keys.yaml")
    with pytest.raises(app.StartupError, match=r"pip install 'authz-service\[tracing\]'"):
        await app.serve(loaded, asyncio.Event())


def test_otel_variables_are_not_warned_about_as_unknown_settings() -> None:
    environ = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_SERVICE_NAME": "authz",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_SDK_DISABLED": "false",
    }
    assert config.unknown_variables(settings.Settings, settings.ENV_PREFIX, environ) == []
