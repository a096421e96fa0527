"""OpenTelemetry tracing of checks: one span per check, continuing the caller's trace, with child
spans for the registry call and the Redis lookups it waits for. The only module that knows
OpenTelemetry.

Off by default. ``from_environment`` turns it on when ``OTEL_TRACES_EXPORTER`` names an exporter,
or, with that unset, when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` and
``OTEL_TRACES_EXPORTER=none`` keep it off. The SDK reads every other standard variable itself
(service name and resource, sampler, exporter endpoint, headers and timeout, batching, limits).
Off, it returns None: OpenTelemetry is never imported, and a check pays an ``is None`` test.

The caller's trace context is W3C trace context (``traceparent``, ``tracestate``); one that is
invalid starts a new trace. Spans carry the decision, the reason, the client's id, the key's id
(a fingerprint) and how the check was resolved and decided, never key material.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from authz_service import __version__
from authz_service.reasons import OUTCOMES

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

    from authz_service.model import Decision, Request, Trace

log = logging.getLogger(__name__)
T = TypeVar("T")

EXTRA = "pip install 'authz-service[tracing]'"
SERVICE_NAME = "authz-service"  # the resource's service.name unless OTEL_SERVICE_NAME is set
CHECK_SPAN = "authz check"
REGISTRY_SPAN = "registry verify"
# The SDK's entry points for span exporters; "otlp" is one of them by the OTLP protocol asked for.
_EXPORTERS = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
_MAX_VALUE_LENGTH = 512  # request-supplied strings are cut, as in the decision log
# They warn about malformed trace context, quoting it: a client must not be able to fill our logs.
_QUOTING_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")


def exporters_asked_for(environ: Mapping[str, str]) -> list[str]:
    """The span exporters (entry-point names) that the OTEL_* variables ask for; none: off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    if names.lower() == "none":
        return []
    return [_entry_point(name.strip(), environ) for name in names.split(",") if name.strip()]


def _entry_point(name: str, environ: Mapping[str, str]) -> str:
    if name != "otlp":
        return name
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    if not environ.get(variable):
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, "").strip() or "grpc"
    if protocol not in _OTLP_BY_PROTOCOL:
        raise RuntimeError(
            f"{variable}: {protocol!r} is not an OTLP protocol "
            f"(expected {' or '.join(_OTLP_BY_PROTOCOL)})"
        )
    return _OTLP_BY_PROTOCOL[protocol]


def from_environment() -> Tracing | None:
    """Tracing as the OTEL_* variables ask for it, or None when they do not (the default).
    Raises RuntimeError, naming what to install or set, when it cannot be set up."""
    names = exporters_asked_for(os.environ)
    if not names:
        return None
    try:  # only needed with tracing on: an optional extra
        from opentelemetry.sdk.resources import (  # noqa: PLC0415
            SERVICE_NAME as SERVICE_NAME_KEY,
        )
        from opentelemetry.sdk.resources import (  # noqa: PLC0415
            SERVICE_VERSION,
            OTELResourceDetector,
            Resource,
        )
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        raise RuntimeError(
            f"tracing (asked for by the OTEL_* variables) needs the tracing extra: {EXTRA}"
        ) from None

    exporters = [_exporter(name) for name in names]
    # Our service name and version, under whatever OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say.
    resource = Resource.create({SERVICE_NAME_KEY: SERVICE_NAME, SERVICE_VERSION: __version__})
    resource = resource.merge(OTELResourceDetector().detect())
    # The sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG) and the span limits come from
    # the environment here; the batching (OTEL_BSP_*, a bounded queue) in BatchSpanProcessor.
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info(
        "tracing on",
        extra={
            "fields": {
                "event": "tracing",
                "exporters": names,
                "service_name": resource.attributes.get(SERVICE_NAME_KEY),
                "sampler": os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            }
        },
    )
    return Tracing(provider)


def _exporter(name: str) -> Any:
    found = importlib.metadata.entry_points(group=_EXPORTERS, name=name)
    if not found:
        raise RuntimeError(
            f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed (the tracing extra, "
            f"{EXTRA}, has otlp over gRPC, and console)"
        )
    try:  # each exporter reads its own OTEL_EXPORTER_* variables
        return next(iter(found)).load()()
    except Exception as exc:
        problem = f"the {name} span exporter cannot start: {exc}"
        if isinstance(exc, ImportError) and "opentelemetry.proto" in str(exc):
            # xds-protos overwrites opentelemetry-proto's modules with an old copy
            problem += (
                "; reinstall opentelemetry-proto over xds-protos' old copy of its files: pip "
                "install --force-reinstall --no-deps opentelemetry-proto==<its installed version>"
            )
        raise RuntimeError(f"OTEL_* variables: {problem}") from None


class Tracing:
    """Tracing on: starts each check's span, and the spans of the I/O that a check waits for."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import context, trace  # noqa: PLC0415 (imported only when on)
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        for name in _QUOTING_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self._provider = provider
        self._tracer = provider.get_tracer("authz_service", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._context = context
        self._trace = trace

    def start(self, request: Request) -> CheckSpan | None:
        """A check's span, a child of the caller's span when the request names a valid one;
        None if it cannot be had, as tracing never fails a check."""
        try:
            parent = None
            if request.traceparent:
                carrier = {"traceparent": request.traceparent}
                if request.tracestate:
                    carrier["tracestate"] = request.tracestate
                parent = self._propagator.extract(carrier)
            attributes = {"authz.request_id": request.request_id[:_MAX_VALUE_LENGTH]}
            span = self._tracer.start_span(
                CHECK_SPAN,
                context=parent,
                kind=self._trace.SpanKind.SERVER,
                attributes=attributes if request.request_id else None,
            )
        except Exception:
            _failed("start")
            return None
        return CheckSpan(self, span)

    def registry_call(self, work: Awaitable[T], url: str) -> Coroutine[Any, Any, T]:
        """``work`` (one call of the registry's validation endpoint) in a span of its own."""
        return self._child(REGISTRY_SPAN, work, {**_server(url), "http.request.method": "POST"})

    def redis_call(self, work: Awaitable[T], command: str, url: str) -> Coroutine[Any, Any, T]:
        """``work`` (one Redis command) in a span of its own."""
        attributes = {"db.system.name": "redis", "db.operation.name": command, **_server(url)}
        return self._child(f"redis {command}", work, attributes)

    async def _child(
        self, name: str, work: Awaitable[T], attributes: Mapping[str, AttributeValue]
    ) -> T:
        """A child of the current check's span. I/O outside any check (a background refresh, a
        change from the feed), or in a check that is not sampled, gets no span at all."""
        if not self._trace.get_current_span().get_span_context().trace_flags.sampled:
            return await work
        with self._tracer.start_as_current_span(
            name,
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,  # an exception's text is not ours to export
            set_status_on_exception=False,
        ) as span:
            try:
                return await work
            except Exception as exc:
                span.set_status(self._trace.StatusCode.ERROR, type(exc).__name__)
                raise

    def close(self) -> None:
        """Export the spans still buffered (within the exporter's timeout) and stop."""
        self._provider.shutdown()

    def _enter(self, span: Span) -> Token[Context]:
        return self._context.attach(self._trace.set_span_in_context(span))

    def _leave(self, token: Token[Context]) -> None:
        self._context.detach(token)

    def _error(self, span: Span, description: str) -> None:
        span.set_status(self._trace.StatusCode.ERROR, description)


class CheckSpan:
    """One check's span: started where the check starts, ended where the check is recorded,
    and current (``async with``) while the check waits on the event loop, so that the spans of
    the I/O it starts there (in tasks, which copy the current context) are its children."""

    __slots__ = ("_span", "_token", "_tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self._span = span
        self._token: Token[Context] | None = None

    async def __aenter__(self) -> None:
        self._token = self._tracing._enter(self._span)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._token is not None:
            self._tracing._leave(self._token)

    def end(self, decision: Decision, trace: Trace) -> None:
        span = self._span
        try:
            if span.is_recording():
                span.set_attributes(_attributes(decision, trace))
                if OUTCOMES[decision.reason].status.http >= 500:  # our failure, not a client's
                    self._tracing._error(span, decision.reason.value)
            span.end()
        except Exception:  # the check is decided: tracing must not turn it into an error
            _failed("end")


def _failed(step: str) -> None:
    log.exception(
        "tracing failed; the check goes on",
        extra={"fields": {"event": "tracing_error", "step": step}},
    )


def _attributes(decision: Decision, trace: Trace) -> dict[str, AttributeValue]:
    found = {
        "authz.decision": "allow" if decision.allowed else "deny",
        "authz.reason": decision.reason.value,
        "authz.client_id": decision.client.client_id if decision.client else None,
        "authz.key_id": decision.key_id or trace.key_id,
        "authz.resolution": trace.resolution,
        "authz.rule": decision.rule,
        "authz.dry_run_rule": decision.dry_run_rule,
        "authz.policy_path": trace.policy_path and trace.policy_path[:_MAX_VALUE_LENGTH],
    }
    return {name: value for name, value in found.items() if value is not None}


@functools.lru_cache(maxsize=8)
def _server(url: str) -> dict[str, AttributeValue]:
    """Where a call goes: host and port only (a URL may carry credentials)."""
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme, 0)
    return {"server.address": parts.hostname or "", "server.port": parts.port or default_port}
