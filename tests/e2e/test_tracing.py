"""Tracing end to end: a real `authz-service serve` exports its spans over OTLP/gRPC to a real
TraceService receiver (built from opentelemetry-proto) started here, with the real registry and a
real Redis behind it, so that the registry call and the Redis lookups have spans of their own.
Spans continue the caller's trace, carry how the check was decided and no key material; Envoy's
own tracer (the front-proxy sample's example) joins them; with tracing off, nothing is exported
and OpenTelemetry is never imported."""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from authz_service import apikeys, tracing
from tests.e2e import harness
from tests.e2e.conftest import Keys
from tests.e2e.test_shared_cache import redis_server

pytestmark = pytest.mark.e2e
WAIT = 20  # seconds to wait for spans to arrive
POLICY = """
version: 1
default: deny
rules:
  - id: orders-read
    methods: [GET]
    paths: [{prefix: /orders}]
    allow: {roles: [reader]}
"""
ENVOY_CHECK_SPAN = "async envoy.service.auth.v3.Authorization.Check egress"


@dataclass
class Exported:
    """One span as the receiver got it, with the resource that sent it."""

    span: Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return values(self.span.attributes)


def values(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, str(kv.value.WhichOneof("value"))) for kv in pairs}


@dataclass
class Receiver:
    """An OTLP/gRPC trace receiver: the TraceService that a collector serves."""

    port: int = 0
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Exported]:
        with self.arrived:
            requests = list(self.requests)
        return [
            Exported(span, values(resource_spans.resource.attributes))
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def wait_for(self, found: Callable[[list[Exported]], bool], what: str) -> list[Exported]:
        """Every span so far, once ``found`` holds for them."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: found(self.spans()), WAIT):
                raise TimeoutError(f"no {what} after {WAIT}s: got {self.spans()}")
        return self.spans()

    def trace(self, trace_id: str, names: set[str]) -> dict[str, Exported]:
        """The spans of one trace, by name, once those named have all arrived."""

        def complete(spans: list[Exported]) -> bool:
            return names <= {s.name for s in spans if s.trace_id == trace_id}

        spans = self.wait_for(complete, f"spans {sorted(names)} of trace {trace_id}")
        return {s.name: s for s in spans if s.trace_id == trace_id}

    def exported_bytes(self) -> bytes:
        with self.arrived:
            return b"".join(request.SerializeToString() for request in self.requests)


@contextmanager
def receiver() -> Iterator[Receiver]:
    received = Receiver()

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(  # noqa: N802 (the gRPC method name)
            self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            with received.arrived:
                received.requests.append(request)
                received.arrived.notify_all()
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # The generated gRPC module has no type annotations.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        TraceService(), server
    )
    received.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield received
    finally:
        server.stop(None)


def tracing_env(where: Receiver, **more: str) -> dict[str, str]:
    """Tracing on, as an operator turns it on: an OTLP endpoint. Spans are sent within 50 ms
    rather than the SDK's default 5 s, so that tests do not wait."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": where.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", **more}


def new_trace() -> tuple[str, str, str]:
    """A caller's trace id, span id, and the traceparent that names them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def check_grpc(
    service: harness.Service, headers: Mapping[str, str], path: str = "/orders/1"
) -> int:
    """One Check over gRPC, as Envoy sends it; the CheckResponse's status code."""
    request = CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(
                http=AttributeContext.HttpRequest(
                    id="7", method="GET", host="api.example.com", path=path, headers=headers
                )
            )
        )
    )
    with grpc.insecure_channel(service.grpc_target) as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    return int(reply.status.code)


@dataclass
class Stack:
    receiver: Receiver
    registry: harness.RegistryProcess
    service: harness.Service

    def new_key(self) -> tuple[str, str]:
        """A key the service has never seen (its check waits for Redis and the registry), and
        its client's id."""
        created = self.registry.create_client("Traced client", roles=["reader"])
        return str(created["api_key"]), str(created["client_id"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("tracing")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    with (
        receiver() as received,
        redis_server() as redis_url,
        harness.registry_process(workdir) as registry,
        harness.authz_service(
            workdir,
            env=tracing_env(received, OTEL_SERVICE_NAME="authz-e2e"),
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            redis_url=redis_url,
            policy_file=str(policy),
        ) as service,
    ):
        yield Stack(received, registry, service)


def key_id(key: str) -> str:
    return apikeys.digest(key)[:6].hex()


def test_a_check_continues_the_callers_trace_with_the_redis_and_registry_calls_as_children(
    stack: Stack,
) -> None:
    """A key seen for the first time: the check asks Redis (a miss), then the registry, then
    shares the answer in Redis; all under the check's span, itself under the caller's."""
    key, client_id = stack.new_key()
    trace_id, caller_span, traceparent = new_trace()
    headers = {
        "authorization": f"ApiKey {key}",
        "traceparent": traceparent,
        "tracestate": "vendor=abc",
        "x-request-id": "req-traced",
    }
    assert check_grpc(stack.service, headers) == 0

    names = {tracing.CHECK_SPAN, "redis GET", tracing.REGISTRY_SPAN, "redis SET"}
    spans = stack.receiver.trace(trace_id, names)
    check = spans[tracing.CHECK_SPAN]
    assert check.parent_id == caller_span
    assert check.span.trace_state == "vendor=abc"
    assert check.span.kind == Span.SPAN_KIND_SERVER
    assert check.attributes == {
        "authz.request_id": "req-traced",
        "authz.decision": "allow",
        "authz.reason": "allowed",
        "authz.client_id": client_id,
        "authz.key_id": key_id(key),
        "authz.resolution": "registry",
        "authz.rule": "orders-read",
        "authz.policy_path": "/orders/1",
    }
    assert check.resource["service.name"] == "authz-e2e"
    for name in names - {tracing.CHECK_SPAN}:
        assert spans[name].parent_id == check.span_id, name
        assert spans[name].span.kind == Span.SPAN_KIND_CLIENT
    assert spans["redis GET"].attributes["db.system.name"] == "redis"
    assert spans[tracing.REGISTRY_SPAN].attributes["server.address"] == "127.0.0.1"


def test_a_check_answered_from_memory_has_no_children(stack: Stack) -> None:
    key, _ = stack.new_key()
    first_trace, _, first = new_trace()
    assert check_grpc(stack.service, {"authorization": f"ApiKey {key}", "traceparent": first}) == 0
    stack.receiver.trace(first_trace, {tracing.CHECK_SPAN, tracing.REGISTRY_SPAN})

    trace_id, _, traceparent = new_trace()
    headers = {"authorization": f"ApiKey {key}", "traceparent": traceparent}
    assert check_grpc(stack.service, headers) == 0
    check = stack.receiver.trace(trace_id, {tracing.CHECK_SPAN})[tracing.CHECK_SPAN]
    assert check.attributes["authz.resolution"] == "memory"
    assert [s.name for s in stack.receiver.spans() if s.trace_id == trace_id] == [
        tracing.CHECK_SPAN
    ]


def test_an_http_check_continues_the_callers_trace_too(stack: Stack) -> None:
    """The HTTP transport (Envoy's http_service), whose checks wait as tasks on the loop."""
    key, client_id = stack.new_key()
    trace_id, caller_span, traceparent = new_trace()
    reply = harness.send(
        stack.service.http_check_port,
        "/orders/2",
        [("authorization", f"ApiKey {key}"), ("traceparent", traceparent)],
    )
    assert reply.status == 200
    spans = stack.receiver.trace(trace_id, {tracing.CHECK_SPAN, tracing.REGISTRY_SPAN})
    check = spans[tracing.CHECK_SPAN]
    assert check.parent_id == caller_span
    assert check.attributes["authz.client_id"] == client_id
    assert spans[tracing.REGISTRY_SPAN].parent_id == check.span_id


def test_an_invalid_traceparent_starts_a_new_trace_and_the_check_goes_on(stack: Stack) -> None:
    key, _ = stack.new_key()
    request_id = f"req-{secrets.token_hex(4)}"
    headers = {
        "authorization": f"ApiKey {key}",
        "traceparent": "00-not-a-trace-01",
        "x-request-id": request_id,
    }
    assert check_grpc(stack.service, headers) == 0

    def checked(spans: list[Exported]) -> bool:
        return any(s.attributes.get("authz.request_id") == request_id for s in spans)

    spans = stack.receiver.wait_for(checked, "the check's span")
    (check,) = [s for s in spans if s.attributes.get("authz.request_id") == request_id]
    assert check.parent_id == ""
    assert re.fullmatch("[0-9a-f]{32}", check.trace_id)
    assert check.trace_id != "0" * 32
    assert check.attributes["authz.decision"] == "allow"


def test_a_deny_is_traced_with_its_reason_and_no_span_carries_key_material(
    stack: Stack,
) -> None:
    """Denied and allowed keys alike: neither a key, nor its full hash, nor the registry's
    token appears in anything exported so far."""
    known, _ = stack.new_key()
    unknown = "azk_" + secrets.token_hex(20)
    allowed_trace, _, allowed = new_trace()
    denied_trace, _, denied = new_trace()
    assert (
        check_grpc(stack.service, {"authorization": f"ApiKey {known}", "traceparent": allowed}) == 0
    )
    assert (
        check_grpc(stack.service, {"authorization": f"ApiKey {unknown}", "traceparent": denied})
        == 16
    )
    stack.receiver.trace(allowed_trace, {tracing.CHECK_SPAN, tracing.REGISTRY_SPAN})
    check = stack.receiver.trace(denied_trace, {tracing.CHECK_SPAN, tracing.REGISTRY_SPAN})[
        tracing.CHECK_SPAN
    ]
    assert check.attributes["authz.decision"] == "deny"
    assert check.attributes["authz.reason"] == "unknown_key"
    assert check.attributes["authz.key_id"] == key_id(unknown)
    assert check.span.status.code == check.span.status.STATUS_CODE_UNSET

    exported = stack.receiver.exported_bytes()
    for secret in (known, unknown, stack.registry.service_token()):
        assert secret.encode() not in exported
    for key in (known, unknown):
        assert apikeys.digest(key).hex().encode() not in exported
        assert apikeys.digest(key) not in exported


@pytest.mark.parametrize(
    "off",
    [
        pytest.param({}, id="no OTEL variables"),
        pytest.param({"OTEL_SDK_DISABLED": "true"}, id="OTEL_SDK_DISABLED"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, id="OTEL_TRACES_EXPORTER=none"),
    ],
)
def test_with_tracing_off_nothing_is_exported_and_opentelemetry_is_never_imported(
    tmp_path: Path, keys: Keys, off: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interpreter's import log (PYTHONPROFILEIMPORTTIME) lists every module it loads."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)  # "no OTEL variables" means none
    with receiver() as received:
        endpoint = tracing_env(received) if off else {}
        env = {**endpoint, **off, "PYTHONPROFILEIMPORTTIME": "1"}
        with harness.authz_service(tmp_path, keys.path, env=env) as service:
            _, _, traceparent = new_trace()
            assert (
                check_grpc(
                    service, {"authorization": f"ApiKey {keys.acme}", "traceparent": traceparent}
                )
                == 0
            )
            reply = harness.send(
                service.http_check_port, "/", [("authorization", f"ApiKey {keys.acme}")]
            )
            assert reply.status == 200
            assert service.terminate() == 0  # a tracing SDK would flush what it holds now
        logs = service.logs()
        assert "authz_service.core" in logs  # the import log is there...
        assert "opentelemetry" not in logs  # ...and OpenTelemetry is not in it
        assert received.requests == []


def uncommented(text: str, starts: Sequence[str]) -> str:
    """``text`` with each commented-out YAML block that begins with one of ``starts`` (a line
    ``# <start>``, then lines at the same comment column, indented further) uncommented."""
    lines, column = [], None
    for line in text.splitlines():
        prefix, mark, rest = line.partition("# ")
        commented = bool(mark) and not prefix.strip()
        if commented and rest in starts:
            column = prefix
        elif not (commented and prefix == column and rest.startswith(" ")):
            column = None
        lines.append(prefix + rest if column is not None else line)
    return "\n".join(lines) + "\n"


def front_proxy_with_tracing(tmp_path: Path) -> Path:
    """envoy/front-proxy.yaml with its tracing example uncommented, as the sample says."""
    text = uncommented(harness.FRONT_PROXY.read_text(), ["tracing:", "- name: otel_collector"])
    path = tmp_path / "front-proxy-tracing.yaml"
    path.write_text(text)
    return path


def test_the_front_proxy_tracing_example_is_a_valid_envoy_config(tmp_path: Path) -> None:
    config = front_proxy_with_tracing(tmp_path)
    text = config.read_text()
    assert "\n          tracing:\n" in text
    assert "\n  - name: otel_collector\n" in text
    result = harness.envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated field" not in result.stdout + result.stderr


@pytest.mark.parametrize("sample", ["front-proxy.yaml", "sidecar.yaml"])
def test_the_grpc_samples_send_the_callers_trace_context_with_the_check(sample: str) -> None:
    text = (harness.ROOT / "envoy" / sample).read_text()
    patterns = text.partition("allowed_headers:")[2].partition("- name:")[0]
    assert {"authorization", "traceparent", "tracestate"} <= set(
        re.findall(r"- exact: (\S+)", patterns)
    )


def test_envoys_spans_and_ours_join_in_one_trace(
    tmp_path: Path, keys: Keys, upstream: harness.Upstream
) -> None:
    """With the front-proxy sample's tracing example on, Envoy starts the trace of a request
    that has none, and our check's span is a child of Envoy's span for the check."""
    with (
        receiver() as received,
        harness.authz_service(tmp_path, keys.path, env=tracing_env(received)) as service,
    ):
        endpoints = {
            "authz": service.grpc_port,
            "authz_access_log": service.access_log_port,
            "upstream": upstream.port,
            "otel_collector": received.port,
        }
        config = harness.render(
            front_proxy_with_tracing(tmp_path), 0, 0, endpoints, service.access_log_token
        )
        # Envoy sends its spans every 5 s by default: sooner here, so that the test does not wait.
        config["layered_runtime"] = {
            "layers": [
                {
                    "name": "test",
                    "static_layer": {
                        "tracing.opentelemetry.flush_interval_ms": 50,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                }
            ]
        }
        with harness.envoy(tmp_path, config) as proxy:
            reply = harness.send(proxy.port, "/joined", [("authorization", f"ApiKey {keys.acme}")])
            assert reply.status == 200

            spans = received.wait_for(joined, "our span and Envoy's two in one trace")
    (ours,) = [s for s in spans if s.name == tracing.CHECK_SPAN]
    trace = [s for s in spans if s.trace_id == ours.trace_id]
    (envoys_check,) = [s for s in trace if s.name == ENVOY_CHECK_SPAN]
    (envoys_root,) = [s for s in trace if not s.parent_id]
    assert ours.parent_id == envoys_check.span_id
    assert envoys_check.parent_id == envoys_root.span_id
    assert envoys_root.resource["service.name"] == "front-proxy"
    assert ours.resource["service.name"] == tracing.SERVICE_NAME


def joined(spans: list[Exported]) -> bool:
    """Our check's span, Envoy's span for the check, and Envoy's root span for the request have
    all arrived, in one trace."""
    ours = [s for s in spans if s.name == tracing.CHECK_SPAN]
    if not ours:
        return False
    trace = [s for s in spans if s.trace_id == ours[0].trace_id]
    return any(s.name == ENVOY_CHECK_SPAN for s in trace) and any(not s.parent_id for s in trace)
