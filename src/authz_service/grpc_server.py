"""The gRPC face of the service: Envoy's Authorization API with standard health and reflection
(a thread-pool server), Envoy's access-log service (grpc.aio), and the admin API (grpc.aio).

The Authorization handler only translates: decode -> pipeline -> encode. It never returns a gRPC
error for a check, because Envoy would then apply ``failure_mode_allow``; every outcome,
including a request we cannot parse and our own failures, is an explicit CheckResponse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent import futures

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_service import envoy_codec
from authz_service.admin.servicer import ADMIN_SERVICE, AdminServicer
from authz_service.admin.v1 import admin_pb2_grpc
from authz_service.metrics import Metrics
from authz_service.model import Decision
from authz_service.pipeline import Pending, Pipeline
from authz_service.reasons import Reason

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ACCESS_LOG_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
# How much longer than a check's own deadline a worker waits for the event loop's decision.
_LOOP_BACKSTOP_SLACK = 0.05


class AuthorizationServicer:
    """envoy.service.auth.v3.Authorization, on gRPC's thread-pool server.

    A worker thread decides every check whose answer is in memory (the keys file, a cache hit,
    the snapshot) by itself. Only a check that must ask the registry is handed to the event
    loop, and the worker waits for its decision. It takes the raw request bytes so that parsing
    them is inside our fail-closed handling rather than in gRPC's, which would answer with an
    error.
    """

    def __init__(
        self, pipeline: Pipeline, encoder: envoy_codec.Encoder, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._pipeline = pipeline
        self._encoder = encoder
        self._loop = loop

    def check(self, raw: bytes, context: grpc.ServicerContext) -> CheckResponse:
        try:
            request = envoy_codec.decode(CheckRequest.FromString(raw))
        except Exception:
            log.exception(
                "undecodable CheckRequest; denying",
                extra={"fields": {"event": "decode_error", "bytes": len(raw)}},
            )
            return self._encoder.encode(Decision.deny(Reason.INTERNAL_ERROR))
        outcome = self._pipeline.check_now(request)
        if isinstance(outcome, Pending):
            outcome = self._finish_on_loop(outcome, context.time_remaining())
        return self._encoder.encode(outcome)

    def _finish_on_loop(self, pending: Pending, time_remaining: float | None) -> Decision:
        """Await the registry on the event loop. The pipeline keeps the check's deadline and
        never raises; the wait here is only a backstop should the loop be stuck or closed."""
        future = asyncio.run_coroutine_threadsafe(
            self._pipeline.finish(pending, time_remaining), self._loop
        )
        backstop = self._pipeline.timeout if time_remaining is None else time_remaining
        try:
            return future.result(timeout=backstop + _LOOP_BACKSTOP_SLACK)
        except Exception as exc:
            future.cancel()
            log.error(
                "no decision from the event loop in time; denying",
                extra={"fields": {"event": "loop_backstop", "error": type(exc).__name__}},
            )
            return Decision.deny(Reason.DEADLINE_EXCEEDED)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, CheckResponse]]:
        return {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.check, response_serializer=CheckResponse.SerializeToString
            ),
        }


class AccessLogServicer:
    """envoy.service.accesslog.v3.AccessLogService: Envoy's HTTP gRPC access logger streams each
    finished request here; each is counted for its client."""

    def __init__(self, metrics: Metrics, client_header: str | None) -> None:
        self._metrics = metrics
        self._client_header = client_header

    async def StreamAccessLogs(  # noqa: N802 (the gRPC method name)
        self, messages: AsyncIterator[StreamAccessLogsMessage], context: object
    ) -> StreamAccessLogsResponse:
        async for message in messages:
            for record in envoy_codec.decode_access_logs(message, self._client_header):
                self._metrics.upstream(
                    record.client_id, record.status, record.request_bytes, record.response_bytes
                )
        return StreamAccessLogsResponse()


def build_server(
    servicer: AuthorizationServicer,
    health_servicer: health.HealthServicer,
    workers: int,
    max_message_bytes: int,
) -> grpc.Server:
    """The check server: gRPC's thread-pool server, which costs about half the CPU per call of
    grpc.aio (see the README's Performance section)."""
    # No maximum_concurrent_rpcs: its refusal is a gRPC error (RESOURCE_EXHAUSTED), which
    # Envoy's failure_mode_allow could turn into an allow. Waiting checks are bounded by the
    # pipeline (an explicit 503) and by the workers.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check"),
        options=_options(max_message_bytes),
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
