"""Composition root: builds the concrete parts from settings, runs them, shuts them down."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from authz_service import grpc_server, http_server
from authz_service.admin.servicer import AdminServicer
from authz_service.breaker import CircuitBreaker
from authz_service.credentials import CredentialRules
from authz_service.envoy_codec import CodecSettings, Encoder
from authz_service.feed import ChangeFeed
from authz_service.metrics import Metrics
from authz_service.pipeline import Pipeline, PipelineSettings
from authz_service.policy import Policy, PolicyError, PolicyFile
from authz_service.registry import Registry
from authz_service.registry.http import HttpRegistry
from authz_service.registry.snapshot import SnapshotRegistry
from authz_service.registry.static_file import StaticFileRegistry
from authz_service.resolver import CachingResolver, ResolverSettings
from authz_service.settings import Settings
from authz_service.shared_cache import SharedCache

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_READINESS_POLL = 0.1  # seconds between readiness checks feeding gRPC health
LIVENESS_SERVICE = "liveness"  # the gRPC health service name for liveness probes


class StartupError(RuntimeError):
    """The service cannot start; the message says which setting to fix."""


async def run_until_signalled(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)


async def serve(settings: Settings, stop: asyncio.Event, registry: Registry | None = None) -> None:
    """Serve until ``stop`` is set, then drain: NOT_SERVING first, then finish in-flight checks.

    ``registry`` replaces the one the settings describe (tests use it to inject faults).
    """
    metrics = Metrics(settings.metrics_client_cap)
    try:
        registry = registry or _registry(settings, metrics)
    except RuntimeError as exc:  # an optional extra that the settings need is missing
        raise StartupError(str(exc)) from None
    policy_file = None
    if settings.policy_file:
        policy_file = PolicyFile(Path(settings.policy_file), settings.policy_reload_interval)
        try:
            await policy_file.start()
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        rules = policy_file.current
        metrics.gauge(
            "authz_policy_rules", "Rules in the policy file in force.", lambda: len(rules().rules)
        )
    feed = _change_feed(settings, registry)
    _watch(metrics, registry, feed)
    try:
        await registry.start()
        if feed is not None:
            await feed.start()
        policy = None if policy_file is None else policy_file.current
        await _serve(settings, stop, registry, metrics, policy)
    finally:
        if feed is not None:
            await feed.close()
        await registry.close()
        if policy_file is not None:
            await policy_file.close()


async def _follow_readiness(
    health_servicer: health.HealthServicer, is_ready: Callable[[], bool]
) -> None:
    """Keep gRPC health in step with readiness (a snapshot registry is not ready at first)."""
    current = None
    while True:
        status = _SERVING if is_ready() else _NOT_SERVING
        if status != current:
            for service in ("", grpc_server.AUTHORIZATION_SERVICE):
                health_servicer.set(service, status)
            current = status
        await asyncio.sleep(_READINESS_POLL)


def _registry(settings: Settings, metrics: Metrics) -> Registry:
    if settings.registry == "http":
        backend = HttpRegistry(
            settings.registry_url,
            settings.registry_token,
            timeout=settings.registry_timeout,
            max_in_flight=settings.registry_max_in_flight,
            breaker=CircuitBreaker(
                settings.registry_breaker_failures, settings.registry_breaker_cooldown
            ),
            observe_latency=metrics.registry_call_seconds.observe,
        )
        return CachingResolver(
            backend,
            ResolverSettings(
                positive_ttl=settings.cache_ttl,
                negative_ttl=settings.cache_negative_ttl,
                max_stale=settings.cache_max_stale,
                max_entries=settings.cache_max_entries,
                cold_lookups_per_second=settings.cold_lookup_rate,
                cold_lookup_burst=settings.cold_lookup_burst,
            ),
            shared=_shared_cache(settings),
        )
    if settings.registry == "snapshot":
        return SnapshotRegistry(
            settings.registry_url, settings.registry_token, settings.snapshot_poll_interval
        )
    # The keys file is in memory already: a cache in front of it would only add work.
    return StaticFileRegistry(settings.keys_file, settings.keys_reload_interval)


def _shared_cache(settings: Settings) -> SharedCache | None:
    if not settings.redis_url:
        return None
    return SharedCache(
        settings.redis_url,
        settings.redis_namespace,
        settings.redis_timeout,
        CircuitBreaker(settings.registry_breaker_failures, settings.registry_breaker_cooldown),
    )


def _change_feed(settings: Settings, registry: Registry) -> ChangeFeed | None:
    if not (settings.registry_feed and isinstance(registry, CachingResolver)):
        return None
    return ChangeFeed(settings.registry_url, settings.registry_token, registry.apply_change)


def _watch(metrics: Metrics, registry: Registry, feed: ChangeFeed | None) -> None:
    """Expose the state of the parts in use; read at scrape time, never per check."""
    if isinstance(registry, CachingResolver):
        resolver = registry
        metrics.counters(
            "authz_cache_lookups", "Cache lookups by result.", "result", lambda: resolver.lookups
        )
        metrics.gauge(
            "authz_cache_entries", "Keys in the in-process cache.", lambda: resolver.entries
        )
        metrics.counter(
            "authz_cache_evictions",
            "Entries pushed out by the size bound.",
            lambda: resolver.evictions,
        )
        backend = resolver.backend
        if isinstance(backend, HttpRegistry):
            http = backend
            metrics.counters(
                "authz_registry_calls",
                "Registry calls by outcome.",
                "outcome",
                lambda: http.outcomes,
            )
            metrics.gauge(
                "authz_registry_circuit_state",
                "Registry circuit breaker: 0 closed, 1 open, 2 half-open.",
                lambda: _BREAKER_STATES[http.breaker_state],
            )
    if isinstance(registry, SnapshotRegistry):
        snapshot = registry
        metrics.gauge(
            "authz_snapshot_version",
            "Change-log version of the registry copy.",
            lambda: snapshot.version,
        )
        metrics.gauge(
            "authz_snapshot_age_seconds",
            "Seconds since the copy last synced.",
            lambda: None if snapshot.synced_at is None else time.time() - snapshot.synced_at,
        )
    if feed is None and not isinstance(registry, SnapshotRegistry):
        return

    def followed() -> ChangeFeed | None:
        # The snapshot registry creates its feed once its first snapshot is in.
        return registry.feed if isinstance(registry, SnapshotRegistry) else feed

    def connected() -> float:
        current = followed()
        return 1 if current is not None and current.connected else 0

    def last_event_age() -> float | None:
        current = followed()
        if current is None or current.last_event_at is None:
            return None
        return time.time() - current.last_event_at

    metrics.gauge(
        "authz_feed_connected", "1 while the registry change feed is connected.", connected
    )
    metrics.gauge(
        "authz_feed_last_event_age_seconds",
        "Seconds since the last change-feed event.",
        last_event_age,
    )


_BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    registry: Registry,
    metrics: Metrics,
    policy: Callable[[], Policy] | None,
) -> None:
    pipeline = Pipeline(
        registry,
        PipelineSettings(
            credential_rules=CredentialRules(
                max_key_length=settings.max_key_length,
                require_checksum=settings.require_key_checksum,
            ),
            check_timeout=settings.check_timeout,
            max_in_flight=settings.max_concurrent_checks,
            allow_non_http=settings.non_http_requests == "allow",
        ),
        metrics,
        policy,
    )
    metrics.gauge(
        "authz_checks_in_flight", "Checks waiting for the registry.", lambda: pipeline.in_flight
    )
    encoder = Encoder(
        CodecSettings(
            client_id_header=settings.client_id_header,
            client_name_header=settings.client_name_header,
            client_roles_header=settings.client_roles_header,
            realm=settings.realm,
            retry_after_seconds=settings.retry_after,
        )
    )
    health_servicer = health.HealthServicer()
    server = grpc_server.build_server(
        grpc_server.AuthorizationServicer(pipeline, encoder, asyncio.get_running_loop()),
        health_servicer,
        workers=settings.grpc_workers,
        max_message_bytes=settings.max_message_bytes,
    )
    # Optional servers on grpc.aio: the access-log streams and the admin API.
    optional: list[tuple[str, str, str, grpc.aio.Server]] = []
    if settings.access_log_address:
        access_logs = grpc_server.AccessLogServicer(
            metrics, settings.access_log_client_header or None
        )
        optional.append(
            (
                "access_log",
                settings.access_log_address,
                "AUTHZ_ACCESS_LOG_ADDRESS (access_log_address)",
                grpc_server.build_access_log_server(access_logs, settings.max_message_bytes),
            )
        )
    if settings.admin_address:
        optional.append(
            (
                "admin",
                settings.admin_address,
                "AUTHZ_ADMIN_ADDRESS (admin_address)",
                grpc_server.build_admin_server(AdminServicer(pipeline)),
            )
        )
    # The ports actually bound (an address may ask for port 0), reported in the "serving" line.
    ports = {"grpc": _listen(server, settings.grpc_address, "AUTHZ_GRPC_ADDRESS (grpc_address)")}
    for name, address, setting, aio_server in optional:
        ports[name] = _listen(aio_server, address, setting)
    draining = False

    def is_ready() -> bool:
        return registry.ready and not draining

    server.start()
    for *_, aio_server in optional:
        await aio_server.start()

    async def stop_servers(grace: float | None) -> None:
        for *_, aio_server in optional:
            await aio_server.stop(None)
        await asyncio.to_thread(server.stop(grace).wait)

    try:
        runner = await http_server.start(settings.http_address, is_ready, metrics.exposition)
        ports["http"] = runner.addresses[0][1]
    except OSError as exc:
        await stop_servers(None)
        raise StartupError(
            f"AUTHZ_HTTP_ADDRESS (http_address): cannot listen on {settings.http_address}: "
            f"{exc.strerror}"
        ) from None
    # Everything built so far lives as long as the process: move it out of the cyclic GC's
    # reach, so that collections triggered by per-check garbage do not re-scan it every time.
    gc.freeze()
    # "liveness" is SERVING while the process runs, for liveness probes: unlike readiness, a
    # registry that is not synced yet must not get the pod restarted.
    health_servicer.set(LIVENESS_SERVICE, _SERVING)
    health_task = asyncio.create_task(_follow_readiness(health_servicer, is_ready))
    log.info(
        "serving",
        extra={
            "fields": {
                "event": "serving",
                "grpc_address": settings.grpc_address,
                "grpc_port": ports["grpc"],
                "ports": ports,
                "grpc_workers": settings.grpc_workers,
                "http_address": settings.http_address,
                "access_log_address": settings.access_log_address or None,
                "admin_address": settings.admin_address or None,
            }
        },
    )

    await stop.wait()

    # Report NOT_SERVING first and keep answering for drain_delay, so that probes and load
    # balancers move traffic away; then refuse new checks and let in-flight ones finish.
    draining = True
    log.info(
        "shutting down",
        extra={
            "fields": {
                "event": "shutdown",
                "drain_seconds": settings.drain_delay,
                "grace_seconds": settings.shutdown_grace,
            }
        },
    )
    health_task.cancel()
    health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(settings.drain_delay)
    await stop_servers(settings.shutdown_grace)
    await runner.cleanup()
    log.info("stopped", extra={"fields": {"event": "stopped"}})


def _listen(server: grpc.Server | grpc.aio.Server, address: str, setting: str) -> int:
    try:
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"{setting}: cannot listen on {address}: {exc}") from None
