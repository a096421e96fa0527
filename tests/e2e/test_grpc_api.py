"""The gRPC surface as operators and Envoy use it: grpcurl, health, deadlines, bad input, drain."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_service import apikeys, app
from authz_service.model import Client
from authz_service.settings import Settings
from tests.e2e import harness
from tests.e2e.conftest import Keys
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.e2e

CHECK = "envoy.service.auth.v3.Authorization/Check"  # grpcurl's spelling
CHECK_PATH = "/" + CHECK  # gRPC's


def grpcurl(service: harness.Service, *command: str, data: str | None = None) -> str:
    return harness.grpcurl(service.grpc_target, *command, data=data)


def check_json(authorization: str | None) -> str:
    headers = {"authorization": authorization} if authorization else {}
    return json.dumps(
        {
            "attributes": {
                "request": {
                    "http": {"method": "GET", "host": "api", "path": "/x", "headers": headers}
                }
            }
        }
    )


def test_reflection_lists_every_service(service: harness.Service) -> None:
    """`grpcurl list` works without any .proto file, on the check port and the access-log port."""
    assert grpcurl(service, "list").split() == [
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    access_log_target = f"127.0.0.1:{service.access_log_port}"
    assert harness.grpcurl(access_log_target, "list").split() == [
        "envoy.service.accesslog.v3.AccessLogService",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_reflection_describes_the_authorization_service(service: harness.Service) -> None:
    """`grpcurl describe` shows the Check method and its types."""
    text = grpcurl(service, "describe", "envoy.service.auth.v3.Authorization")
    assert "rpc Check ( .envoy.service.auth.v3.CheckRequest )" in text


def test_grpcurl_check_with_a_valid_key_is_allowed(service: harness.Service, keys: Keys) -> None:
    """A JSON CheckRequest through grpcurl gets an OK status and identity headers."""
    reply = json.loads(grpcurl(service, CHECK, data=check_json(f"ApiKey {keys.acme}")))
    assert reply["status"].get("code", 0) == 0
    headers = {h["header"]["key"]: h["header"]["value"] for h in reply["ok_response"]["headers"]}
    assert headers["x-client-id"] == "acme"
    assert reply["dynamic_metadata"] == {
        "client_id": "acme",
        "client_name": "Acme Corp",
        "key_id": apikeys.hash_key(keys.acme)[:12],
    }


def test_grpcurl_check_with_an_unknown_key_is_denied(service: harness.Service) -> None:
    """The denial is an OK RPC carrying UNAUTHENTICATED and an explicit 401."""
    reply = json.loads(grpcurl(service, CHECK, data=check_json("ApiKey azk_nope")))
    assert reply["status"] == {"code": 16, "message": "unknown_key"}
    assert reply["denied_response"]["status"]["code"] == "Unauthorized"


def test_a_check_without_http_attributes_is_denied_deliberately(service: harness.Service) -> None:
    """A network-filter check (no request.http) gets PERMISSION_DENIED, not an error."""
    reply = json.loads(grpcurl(service, CHECK, data="{}"))
    assert reply["status"] == {"code": 7, "message": "non_http_request"}


@pytest.mark.parametrize("name", ["", "envoy.service.auth.v3.Authorization", "liveness"])
def test_health_reports_serving(service: harness.Service, name: str) -> None:
    """Overall and per-service health are SERVING once ready; "liveness" while running."""
    reply = json.loads(
        grpcurl(service, "grpc.health.v1.Health/Check", data=json.dumps({"service": name}))
    )
    assert reply == {"status": "SERVING"}


def test_http_probes_answer(service: harness.Service) -> None:
    """/healthz and /readyz answer 200 on the HTTP port."""
    assert harness.send(service.http_port, "/healthz").status == 200
    assert harness.send(service.http_port, "/readyz").status == 200


# --- in-process server with an injected registry, for faults --------------------------------

KEY = "azk_inprocess"


def settings(**overrides: Any) -> Settings:
    return Settings(
        grpc_address=f"127.0.0.1:{harness.free_port()}",
        http_address=f"127.0.0.1:{harness.free_port()}",
        admin_address="",
        access_log_address="",
        http_check_address="",
        keys_file=Path("unused"),
        **overrides,
    )


async def readyz(config: Settings) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{config.http_address}/readyz") as reply,
    ):
        return reply.status


async def start(
    config: Settings, registry: FakeRegistry
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(config, stop, registry))
    for _ in range(200):
        try:
            if await readyz(config) == 200:
                return stop, task
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.02)
    raise TimeoutError("in-process server not ready")


def request(key: str = KEY) -> CheckRequest:
    http = AttributeContext.HttpRequest(
        method="GET", path="/", headers={"authorization": f"ApiKey {key}"}
    )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


def check_stub(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        CHECK_PATH,
        request_serializer=CheckRequest.SerializeToString,
        response_deserializer=CheckResponse.FromString,
    )


async def test_a_slow_registry_is_denied_before_envoys_deadline() -> None:
    """The answer is a 503 CheckResponse inside the caller's deadline, not a gRPC error."""
    registry = FakeRegistry({KEY: Client("c", "C")}, delay=5)
    config = settings(check_timeout=10)
    stop, task = await start(config, registry)
    try:
        async with grpc.aio.insecure_channel(config.grpc_address) as channel:
            reply = await check_stub(channel)(request(), timeout=0.2)
        assert reply.status.code == 14
        assert reply.denied_response.status.code == 503
        assert reply.status.message == "deadline_exceeded"
    finally:
        stop.set()
        await task


async def test_unparsable_request_bytes_are_denied_not_errored() -> None:
    """Garbage on the wire gets an explicit 400 deny, never a gRPC error for failure_mode_allow."""
    config = settings()
    stop, task = await start(config, FakeRegistry({}))
    try:
        async with grpc.aio.insecure_channel(config.grpc_address) as channel:
            raw: Any = channel.unary_unary(
                CHECK_PATH, response_deserializer=CheckResponse.FromString
            )
            reply = await raw(b"\xff\xff\xff\xff", timeout=5)
        assert reply.status.message == "request_unparsable"
        assert reply.denied_response.status.code == 400
    finally:
        stop.set()
        await task


async def test_shutdown_reports_not_serving_then_finishes_in_flight_checks() -> None:
    """On stop: NOT_SERVING and /readyz 503 during the drain; the in-flight check completes."""
    registry = FakeRegistry({KEY: Client("c", "C")}, delay=0.6)
    config = settings(drain_delay=0.3, shutdown_grace=5, check_timeout=5)
    stop, task = await start(config, registry)
    async with grpc.aio.insecure_channel(config.grpc_address) as channel:
        in_flight = asyncio.ensure_future(check_stub(channel)(request(), timeout=5))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.sleep(0.1)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await readyz(config) == 503
        reply = await in_flight
        assert reply.status.code == 0
    await asyncio.wait_for(task, 10)
