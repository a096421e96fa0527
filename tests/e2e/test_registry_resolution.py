"""authz-service resolving keys through the real client registry: revocation reaches every
replica within a second through the change feed, and an outage degrades as documented."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e import harness

pytestmark = pytest.mark.e2e


def check(service: harness.Service, key: str) -> CheckResponse:
    """One Check, as Envoy would send it, straight to the replica's gRPC port."""
    http = AttributeContext.HttpRequest(
        method="GET", host="api", path="/", headers={"authorization": f"ApiKey {key}"}
    )
    request = CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))
    with grpc.insecure_channel(service.grpc_target) as channel:
        call: Any = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=CheckRequest.SerializeToString,
            response_deserializer=CheckResponse.FromString,
        )
        reply: CheckResponse = call(request, timeout=2)
        return reply


def replica(tmp_path: Path, source: harness.RegistryProcess, **settings: str) -> Any:
    """authz-service resolving keys through ``source`` (http mode unless settings say)."""
    extra: Any = {"registry": "http", **settings}  # AUTHZ_ settings by name
    return harness.authz_service(
        tmp_path, registry_url=source.url, registry_token=source.service_token(), **extra
    )


def test_a_revoked_key_is_denied_by_two_replicas_within_a_second(tmp_path: Path) -> None:
    """Both replicas cache the key, the registry revokes it, both deny within 1 s (measured)."""
    with (
        harness.registry_process(tmp_path) as registry,
        replica(tmp_path, registry, cache_ttl="3600") as first,
        replica(tmp_path, registry, cache_ttl="3600") as second,
    ):
        client = registry.create_client("Acme")
        key = client["api_key"]
        for service in (first, second):
            assert check(service, key).status.code == 0
        harness.wait_until(lambda: "feed_connected" in first.logs() + second.logs(), 5, "feed")
        revoked_at = time.monotonic()
        registry.admin("DELETE", f"/clients/{client['client_id']}/api-key")
        denied: set[str] = set()
        while denied != {"first", "second"} and time.monotonic() - revoked_at < 2:
            for name, service in (("first", first), ("second", second)):
                if name not in denied and check(service, key).status.code != 0:
                    denied.add(name)
            time.sleep(0.01)
        elapsed = time.monotonic() - revoked_at
        assert denied == {"first", "second"}
        assert elapsed <= 1.0, f"revocation took {elapsed:.3f}s"
        reply = check(first, key)
        assert reply.status.message == "key_revoked"


def test_a_regenerated_key_works_at_once_and_the_old_one_only_for_its_grace(
    tmp_path: Path,
) -> None:
    """With a long cache TTL, the old key still stops when its grace period ends."""
    with (
        harness.registry_process(tmp_path) as registry,
        replica(tmp_path, registry, cache_ttl="3600") as service,
    ):
        client = registry.create_client("Acme")
        old = client["api_key"]
        assert check(service, old).status.code == 0
        regenerated = registry.admin(
            "POST", f"/clients/{client['client_id']}/api-key", {"grace_seconds": 1.5}
        )
        assert check(service, regenerated["api_key"]).status.code == 0
        assert check(service, old).status.code == 0
        time.sleep(1.6)
        assert check(service, old).status.message == "key_revoked"
        assert check(service, regenerated["api_key"]).status.code == 0


def test_an_outage_keeps_known_keys_working_until_max_stale(tmp_path: Path) -> None:
    """Registry down: cached keys allowed (stale-if-error), unknown keys 503; after max_stale,
    503 for all; with the registry back, everything recovers without a restart."""
    port = harness.free_port()
    settings = {
        "cache_ttl": "0.3",
        "cache_max_stale": "2",
        "registry_breaker_cooldown": "0.2",
        "registry_feed": "false",
    }
    with harness.registry_process(tmp_path, port=port) as registry:
        client = registry.create_client("Acme")
        key = client["api_key"]
        service_cm = replica(tmp_path, registry, **settings)
        service = service_cm.__enter__()
        assert check(service, key).status.code == 0
    try:
        time.sleep(0.4)  # past the TTL: only stale-if-error can allow it now
        assert check(service, key).status.code == 0
        cold = check(service, "azk_never_seen_before_key_1234567890abcde")
        assert (cold.status.message, cold.denied_response.status.code) == (
            "registry_unavailable",
            503,
        )
        time.sleep(2)
        assert check(service, key).status.message == "registry_unavailable"
        with harness.registry_process(tmp_path, port=port):
            harness.wait_until(lambda: check(service, key).status.code == 0, 5, "recovery")
    finally:
        service_cm.__exit__(None, None, None)


def test_snapshot_mode_answers_from_memory_and_follows_changes(tmp_path: Path) -> None:
    """Keys resolve with the registry stopped (no call per lookup); revocations and new keys
    arrive through the feed within a second."""
    port = harness.free_port()
    with harness.registry_process(tmp_path, port=port) as registry:
        first = registry.create_client("A")
        service_cm = replica(tmp_path, registry, registry="snapshot", snapshot_poll_interval="0.2")
        service = service_cm.__enter__()
    try:
        assert check(service, first["api_key"]).status.code == 0  # registry is down now
        assert check(service, "azk_unknown_key_0000000000000000000000").status.message == (
            "unknown_key"
        )
        with harness.registry_process(tmp_path, port=port) as registry:
            second = registry.create_client("B")
            harness.wait_until(
                lambda: check(service, second["api_key"]).status.code == 0,
                5,
                "new key through the feed",
            )
            revoked_at = time.monotonic()
            registry.admin("DELETE", f"/clients/{first['client_id']}/api-key")
            harness.wait_until(
                lambda: check(service, first["api_key"]).status.code != 0,
                1.0,
                "revocation through the feed",
            )
            assert time.monotonic() - revoked_at <= 1.0
    finally:
        service_cm.__exit__(None, None, None)


def test_snapshot_mode_is_not_ready_until_the_first_snapshot(tmp_path: Path) -> None:
    """/readyz 503 and gRPC health NOT_SERVING while the registry is unreachable; then ready."""
    port = harness.free_port()
    grpc_port, http_port = harness.free_port(), harness.free_port()
    env = {
        "AUTHZ_REGISTRY": "snapshot",
        "AUTHZ_REGISTRY_URL": f"http://127.0.0.1:{port}",
        "AUTHZ_REGISTRY_TOKEN": "not-yet-known-token-0000000",
        "AUTHZ_SNAPSHOT_POLL_INTERVAL": "0.1",
        "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "AUTHZ_ADMIN_ADDRESS": "",
        "AUTHZ_ACCESS_LOG_ADDRESS": "",
    }
    (tmp_path / "registry").mkdir()
    with harness.registry_process(tmp_path / "registry", port=port) as registry:
        env["AUTHZ_REGISTRY_TOKEN"] = registry.service_token()
    process = subprocess.Popen(
        [sys.executable, "-m", "authz_service", "serve"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        harness.wait_until(
            lambda: harness.send(http_port, "/readyz").status == 503, 20, "not ready"
        )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Not ready is not dead: liveness probes must not restart the pod meanwhile.
            alive = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
            with harness.registry_process(tmp_path / "registry", port=port):
                harness.wait_until(
                    lambda: harness.send(http_port, "/readyz").status == 200, 5, "ready"
                )
                harness.wait_until(
                    lambda: (
                        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ),
                    2,
                    "gRPC SERVING",
                )
    finally:
        process.terminate()
        process.wait(15)
