"""authz-service resolving keys through the real client registry: revocation reaches every
replica within a second through the change feed, and an outage degrades as documented."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

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


def admin(
    registry: harness.RegistryProcess, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        registry.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {registry.admin_token()}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        text = reply.read()
        return json.loads(text) if text else None


def replica(tmp_path: Path, registry: harness.RegistryProcess, **settings: str) -> Any:
    extra: Any = settings  # AUTHZ_ settings by name, passed through
    return harness.authz_service(
        tmp_path,
        registry="http",
        registry_url=registry.url,
        registry_token=registry.service_token(),
        **extra,
    )


def test_a_revoked_key_is_denied_by_two_replicas_within_a_second(tmp_path: Path) -> None:
    """Both replicas cache the key, the registry revokes it, both deny within 1 s (measured)."""
    with (
        harness.registry_process(tmp_path) as registry,
        replica(tmp_path, registry, cache_ttl="3600") as first,
        replica(tmp_path, registry, cache_ttl="3600") as second,
    ):
        client = admin(
            registry, "POST", "/clients", {"client_name": "Acme", "email": "ops@acme.example"}
        )
        key = client["api_key"]
        for service in (first, second):
            assert check(service, key).status.code == 0
        harness.wait_until(lambda: "feed_connected" in first.logs() + second.logs(), 5, "feed")
        revoked_at = time.monotonic()
        admin(registry, "DELETE", f"/clients/{client['client_id']}/api-key")
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
        client = admin(
            registry, "POST", "/clients", {"client_name": "Acme", "email": "ops@acme.example"}
        )
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
