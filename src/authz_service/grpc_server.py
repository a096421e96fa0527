"""The gRPC face of the service: Envoy's Authorization API with standard health and reflection
(a thread-pool server), Envoy's access-log service (grpc.aio), and the admin API (grpc.aio).

The Authorization handler only translates: decode -> check -> encode. It never returns a gRPC
error for a check, because Envoy would then apply ``failure_mode_allow``; every outcome,
including a request we cannot parse and our own failures, is an explicit CheckResponse.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent import futures

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_service import envoy_codec
from authz_service.admin.servicer import ADMIN_SERVICE, AdminServicer
from authz_service.admin.v1 import admin_pb2_grpc
from authz_service.core import Checker
from authz_service.metrics import Metrics
from authz_service.model import Request
from authz_service.usage import UsageLedger

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ACCESS_LOG_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
# gRPC's own limit on a request is set far above ours (AUTHZ_MAX_MESSAGE_BYTES), so that a
# request over ours reaches the servicer and is denied explicitly (413), never refused with a
# gRPC error that Envoy's failure_mode_allow could turn into an allow.
_TRANSPORT_MAX_BYTES = 2**31 - 1


class AuthorizationServicer:
    """envoy.service.auth.v3.Authorization, on gRPC's thread-pool server: decode -> check ->
    encode, on the worker thread that received the call. It takes the raw request bytes, so
    that reading them (too large, unparsable) is inside the check's fail-closed handling
    rather than in gRPC's, which would answer with an error."""

    def __init__(
        self, checker: Checker, encoder: envoy_codec.Encoder, max_message_bytes: int
    ) -> None:
        self._checker = checker
        self._encoder = encoder
        self._max_bytes = max_message_bytes
        self._traced = checker.traced

    def check(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        """The serialised CheckResponse (gRPC sends bytes as they are)."""
        request = envoy_codec.decode(raw, self._max_bytes)
        if self._traced:
            request = _with_callers_trace(request, context.invocation_metadata())
        return self._encoder.encode(self._checker.check(request, context.time_remaining()))

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        return {"Check": grpc.unary_unary_rpc_method_handler(self.check)}


def _with_callers_trace(
    request: Request, metadata: Sequence[tuple[str, str | bytes]] | None
) -> Request:
    """Envoy's own tracer sends the context of its span for this call as the call's metadata,
    while the request's headers carry the client's: our span is a child of Envoy's."""
    sent = dict(metadata or ())
    traceparent = sent.get("traceparent")
    if not isinstance(traceparent, str) or not traceparent:
        return request
    tracestate = sent.get("tracestate")
    return request._replace(
        traceparent=traceparent, tracestate=tracestate if isinstance(tracestate, str) else ""
    )


class AccessLogServicer:
    """envoy.service.accesslog.v3.AccessLogService: Envoy's HTTP gRPC access logger streams each
    finished request here; each is counted for its client (and, with a usage ledger, for its
    key). With a token, a stream must carry it (``authorization: Bearer <token>`` metadata,
    which Envoy sends through the gRPC service's ``initial_metadata``), or it is refused before
    any entry is read."""

    def __init__(
        self,
        metrics: Metrics,
        client_header: str | None,
        token: str = "",
        usage: UsageLedger | None = None,
    ) -> None:
        self._metrics = metrics
        self._client_header = client_header
        self._expected = f"Bearer {token}".encode() if token else None
        self._usage = usage

    async def StreamAccessLogs(  # noqa: N802 (the gRPC method name)
        self,
        messages: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        if self._expected is not None:
            sent = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(str(sent).encode(), self._expected):
                self._metrics.access_log_streams_refused += 1
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "access-log streams need the token"
                )
        async for message in messages:
            for record in envoy_codec.decode_access_logs(message, self._client_header):
                self._metrics.upstream(
                    record.client_id, record.status, record.request_bytes, record.response_bytes
                )
                if self._usage is not None:
                    self._usage.upstream(record)
        return StreamAccessLogsResponse()


def build_server(
    servicer: AuthorizationServicer, health_servicer: health.HealthServicer, workers: int
) -> grpc.Server:
    """The check server: gRPC's thread-pool server, which costs about half the CPU per call of
    grpc.aio (see the README's Performance section)."""
    # No maximum_concurrent_rpcs: its refusal is a gRPC error (RESOURCE_EXHAUSTED), which
    # Envoy's failure_mode_allow could turn into an allow. Waiting checks are bounded by the
    # pipeline (an explicit 503) and by the workers.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check"),
        options=_options(_TRANSPORT_MAX_BYTES),
    )
    # Check is the only *registered* method (gRPC's fast path for a known method); health and
    # reflection are served as generic handlers, found by a lookup per call. (On grpc.aio, each
    # registered method was measured to cost every call.)
    server.add_registered_method_handlers(AUTHORIZATION_SERVICE, servicer.method_handlers())
    generic_only = _GenericHandlersOnly(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic_only)
    reflection.enable_server_reflection(
        (AUTHORIZATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), generic_only
    )
    return server


def build_access_log_server(servicer: AccessLogServicer, max_message_bytes: int) -> grpc.aio.Server:
    """Envoy's access-log streams, on grpc.aio: each Envoy keeps streams open for as long as it
    runs, which on the thread-pool server would hold a worker thread each."""
    server = grpc.aio.server(options=_options(max_message_bytes))
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    reflection.enable_server_reflection((ACCESS_LOG_SERVICE, reflection.SERVICE_NAME), server)
    return server


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def build_admin_server(servicer: AdminServicer) -> grpc.aio.Server:
    """The admin API's own server, on its own (private) address, with reflection for grpcurl."""
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), server)
    return server


class _GenericHandlersOnly:
    """Lets generated ``add_*_to_server`` functions add their generic handlers but not their
    registered ones (the generic handler serves the same methods)."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        pass
