"""The usage ledger end to end: a known mix of requests through the real Envoy, and the exact
totals per key in the registry (allows, denials by reason, upstream answers by class, bytes),
across a graceful restart of authz-service and across a registry outage longer than a flush
interval. The registry is the test-only stand-in of the usage contract (tests/usage_registry.py)
until the reference registry implements POST /v1/usage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_service import apikeys
from authz_service.registry.static_file import add_key
from tests.e2e import harness
from tests.e2e.test_telemetry import scrape, value
from tests.usage_registry import UsageRegistry

pytestmark = pytest.mark.e2e
FLUSH_INTERVAL = "0.5"


@dataclass(frozen=True)
class Keys:
    path: Path
    metered: str  # client "metered": its totals are the ones checked
    warmup: str  # client "warmup": requests that only wait for a restarted service

    @property
    def metered_id(self) -> str:
        return apikeys.hash_key(self.metered)[:12]


@dataclass(frozen=True)
class Mix:
    """What one round of the known mix sends, and what the ledger must say of it."""

    ok: int = 6  # GET /status/200/100
    failing: int = 4  # GET /status/503/50
    forbidden: int = 3  # GET /billing/x: the route needs a role the client lacks
    unknown: int = 2  # an unknown key: nobody's usage

    def send(self, proxy: harness.Envoy, key: str) -> None:
        authorized = [("Authorization", f"ApiKey {key}")]
        for _ in range(self.ok):
            assert harness.send(proxy.port, "/status/200/100", authorized).status == 200
        for _ in range(self.failing):
            assert harness.send(proxy.port, "/status/503/50", authorized).status == 503
        for _ in range(self.forbidden):
            assert harness.send(proxy.port, "/billing/x", authorized).status == 403
        for _ in range(self.unknown):
            reply = harness.send(proxy.port, "/status/200/1", [("Authorization", "ApiKey azk_x")])
            assert reply.status == 401

    @property
    def upstream(self) -> int:
        return self.ok + self.failing


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    return Keys(path, add_key(path, "metered", "Metered"), add_key(path, "warmup", "Warm-up"))


@pytest.fixture
def registry() -> Iterator[UsageRegistry]:
    stand_in = UsageRegistry()
    stand_in.start()
    yield stand_in
    stand_in.stop()


@dataclass
class Ports:
    grpc: int
    http: int
    access_log: int


@contextmanager
def ledger_service(
    tmp_path: Path, keys: Keys, registry: UsageRegistry, ports: Ports
) -> Iterator[harness.Service]:
    """authz-service with the ledger on, on fixed ports (Envoy keeps pointing at them across a
    restart)."""
    with harness.authz_service(
        tmp_path,
        keys.path,
        grpc_port=ports.grpc,
        http_port=ports.http,
        access_log_address=f"127.0.0.1:{ports.access_log}",
        usage_ledger="true",
        usage_flush_interval=FLUSH_INTERVAL,
        registry_url=registry.url,
        registry_token=registry.token,
    ) as service:
        yield service


def wait_for_access_logs(service: harness.Service, count: int) -> None:
    """Until Envoy's access logs of the metered client's requests have all arrived."""
    harness.wait_until(
        lambda: (
            value(scrape(service), "authz_upstream_responses_total", client_id="metered") >= count
        ),
        10,
        "access logs",
    )


def warm_up(proxy: harness.Envoy, keys: Keys) -> None:
    """Until Envoy reaches the (re)started service."""
    harness.wait_until(
        lambda: (
            harness.send(proxy.port, "/", [("Authorization", f"ApiKey {keys.warmup}")]).status
            == 200
        ),
        20,
        "Envoy reaching authz-service",
    )


def assert_totals(registry: UsageRegistry, keys: Keys, mix: Mix, rounds: int) -> None:
    totals = registry.key("metered", keys.metered_id)
    assert totals.allowed == rounds * mix.upstream
    assert dict(totals.denied) == {"forbidden": rounds * mix.forbidden}
    assert dict(totals.upstream) == {"2xx": rounds * mix.ok, "5xx": rounds * mix.failing}
    assert totals.response_bytes == rounds * (mix.ok * 100 + mix.failing * 50)
    assert totals.request_bytes == 0  # GETs without a body
    assert {client for client, _ in registry.totals} <= {"metered", "warmup"}


def test_totals_are_exact_across_a_graceful_restart(
    tmp_path: Path, keys: Keys, registry: UsageRegistry
) -> None:
    """The mix, a graceful restart (SIGTERM: the last flush happens after the servers stop),
    and the mix again: the registry's totals are exactly two rounds of it."""
    mix = Mix()
    ports = Ports(harness.free_port(), harness.free_port(), harness.free_port())
    with (
        harness.echo_upstream() as upstream,
        ledger_service(tmp_path, keys, registry, ports) as first,
    ):
        config = harness.render_front_proxy(0, 0, first, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            warm_up(proxy, keys)
            mix.send(proxy, keys.metered)
            wait_for_access_logs(first, mix.upstream)
            assert first.terminate() == 0
            with ledger_service(tmp_path, keys, registry, ports) as second:
                warm_up(proxy, keys)
                mix.send(proxy, keys.metered)
                wait_for_access_logs(second, mix.upstream)
                assert second.terminate() == 0
    assert_totals(registry, keys, mix, rounds=2)
    assert registry.refusals == []


def test_totals_are_exact_across_a_registry_outage_longer_than_a_flush_interval(
    tmp_path: Path, keys: Keys, registry: UsageRegistry
) -> None:
    """The registry is down while the mix runs and while its minute is flushed, and again
    after: the batches wait and arrive when it is back. The first answer after the outage is
    lost on the way, so the same batch arrives twice; the registry counts it once."""
    mix = Mix()
    ports = Ports(harness.free_port(), harness.free_port(), harness.free_port())
    with (
        harness.echo_upstream() as upstream,
        ledger_service(tmp_path, keys, registry, ports) as service,
    ):
        config = harness.render_front_proxy(0, 0, service, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            warm_up(proxy, keys)
            if time.time() % 60 > 45:  # keep the mix inside one minute, so that it is sealed
                harness.wait_until(lambda: time.time() % 60 < 1, 20, "the next minute")
            registry.stop()
            mix.send(proxy, keys.metered)
            wait_for_access_logs(service, mix.upstream)

            def failures() -> float:
                return value(
                    scrape(service), "authz_usage_flush_failures_total", kind="unavailable"
                )

            # The minute ends (within 60 s), and at least two flushes fail.
            harness.wait_until(lambda: failures() >= 2, 90, "flushes failing while it is down")
            registry.lose_answers = 1
            registry.start()
            assert registry.wait_for(
                lambda: (
                    registry.totals.get(("metered", keys.metered_id)) is not None
                    and registry.lose_answers == 0
                    and len(registry.batch_ids) > len(registry.accepted)
                ),
                30,
            )
            harness.wait_until(
                lambda: value(scrape(service), "authz_usage_entries_buffered") == 0,
                30,
                "the backlog delivered",
            )
            assert_totals(registry, keys, mix, rounds=1)
    duplicates = len(registry.batch_ids) - len(set(registry.batch_ids))
    assert duplicates >= 1


def test_in_http_mode_upstream_usage_is_counted_under_the_key_too(
    tmp_path: Path, keys: Keys, registry: UsageRegistry
) -> None:
    """envoy/front-proxy-http.yaml: the key arrives in the access log as the x-authz-key-id
    metadata that Envoy made from our answer header."""
    mix = Mix(ok=3, failing=2, forbidden=1, unknown=1)
    ports = Ports(harness.free_port(), harness.free_port(), harness.free_port())
    with (
        harness.echo_upstream() as upstream,
        ledger_service(tmp_path, keys, registry, ports) as service,
    ):
        config = harness.render_front_proxy_http(0, 0, service, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            warm_up(proxy, keys)
            mix.send(proxy, keys.metered)
            wait_for_access_logs(service, mix.upstream)
            assert service.terminate() == 0
    assert_totals(registry, keys, mix, rounds=1)
