"""Composition root: builds the concrete parts from settings, runs them, shuts them down. The only
place that builds concrete classes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from authz_service import grpc_server, http_server, tracing
from authz_service.admin.servicer import AdminServicer
from authz_service.answers import AnswerSettings
from authz_service.breaker import CircuitBreaker
from authz_service.changes import RecentChanges
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.envoy_codec import Encoder
from authz_service.feed import ChangeFeed, FeedSettings
from authz_service.health import Health, supervise
from authz_service.http_check import HttpCheckServer, HttpCheckSettings
from authz_service.limits import LocalBuckets, RateLimiter, SharedBuckets
from authz_service.metrics import Metrics
from authz_service.policy import Policy, PolicyError, PolicyFile
from authz_service.registry import ChangeConsumer, Registry
from authz_service.registry.http import HttpRegistry
from authz_service.registry.snapshot import SnapshotRegistry
from authz_service.registry.static_file import StaticFileRegistry
from authz_service.resolver import CachingResolver, ResolverSettings
from authz_service.settings import Settings
from authz_service.shared_cache import SharedCache
from authz_service.usage import Flusher, RegistryUsage, UsageLedger

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_READINESS_POLL = 0.1  # seconds between readiness checks feeding gRPC health
LIVENESS_SERVICE = "liveness"  # the gRPC health service name for liveness probes


class StartupError(RuntimeError):
    """The service cannot start; the message says which setting to fix."""


@dataclass
class Parts:
    """What the settings call for, built: the key source, and who follows the change feed."""

    registry: Registry
    consumer: ChangeConsumer | None = None


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
    loop = asyncio.get_running_loop()
    health_state = Health()
    metrics = Metrics(settings.metrics_client_cap)
    metrics.watch_health(lambda: health_state.problems)
    try:
        traces = tracing.from_environment()  # the OTEL_* variables, not settings
        parts = (
            Parts(registry) if registry else _parts(settings, loop, health_state, metrics, traces)
        )
        limits = _rate_limiter(settings)
    except RuntimeError as exc:  # an optional extra that the settings need is missing
        raise StartupError(str(exc)) from None
    if limits is not None:
        metrics.watch_rate_limits(limits)
    usage = _usage(settings)
    if usage is not None:
        metrics.watch_usage(usage.ledger)
    policy_file = None
    if settings.policy_file:
        policy_file = PolicyFile(Path(settings.policy_file), settings.policy_reload_interval)
        try:
            await policy_file.start()
        except PolicyError as exc:
            raise StartupError(str(exc)) from None
        metrics.watch_policy(policy_file.current)
    feed_task = None
    try:
        await parts.registry.start()
        if limits is not None:
            await limits.start()
        if parts.consumer is not None:
            feed = ChangeFeed(
                settings.registry_url,
                settings.registry_token,
                parts.consumer,
                health_state,
                FeedSettings(poll_interval=settings.snapshot_poll_interval),
            )
            metrics.watch_feed(feed)
            feed_task = supervise("change-feed", feed.run)
        policy = None if policy_file is None else policy_file.current
        await _serve(
            settings,
            stop=stop,
            registry=parts.registry,
            metrics=metrics,
            health_state=health_state,
            policy=policy,
            traces=traces,
            limits=limits,
            usage=usage,
        )
    finally:
        if feed_task is not None:
            feed_task.cancel()
        await parts.registry.close()
        if limits is not None:
            await limits.close()
        if policy_file is not None:
            await policy_file.close()
        if traces is not None:
            await asyncio.to_thread(traces.close)


def _parts(
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    health_state: Health,
    metrics: Metrics,
    traces: tracing.Tracing | None,
) -> Parts:
    if settings.registry == "http":
        backend = HttpRegistry(
            settings.registry_url,
            settings.registry_token,
            timeout=settings.registry_timeout,
            max_in_flight=settings.registry_max_in_flight,
            breaker=CircuitBreaker(
                settings.registry_breaker_failures, settings.registry_breaker_cooldown
            ),
            health=health_state,
            observe_latency=metrics.registry_call_seconds.observe,
            tracing=traces,
        )
        metrics.watch_registry_client(backend)
        resolver = CachingResolver(
            backend,
            ResolverSettings(
                positive_ttl=settings.cache_ttl,
                negative_ttl=settings.cache_negative_ttl,
                max_stale=settings.cache_max_stale,
                max_entries=settings.cache_max_entries,
                cold_lookups_per_second=settings.cold_lookup_rate,
                cold_lookup_burst=settings.cold_lookup_burst,
            ),
            loop,
            # Kept longer than any cached answer can live, stale-if-error included.
            RecentChanges(retention=settings.cache_ttl + settings.cache_max_stale + 60),
            shared=_shared_cache(settings, traces),
        )
        metrics.watch_cache(resolver)
        return Parts(resolver, resolver if settings.registry_feed else None)
    if settings.registry == "snapshot":
        snapshot = SnapshotRegistry(settings.registry_url, settings.registry_token)
        metrics.watch_snapshot(snapshot)
        return Parts(snapshot, snapshot)
    # The keys file is in memory already: a cache in front of it would only add work.
    return Parts(StaticFileRegistry(settings.keys_file, settings.keys_reload_interval))


def _shared_cache(settings: Settings, traces: tracing.Tracing | None) -> SharedCache | None:
    if not settings.redis_url:
        return None
    return SharedCache(
        settings.redis_url,
        settings.redis_namespace,
        settings.redis_timeout,
        CircuitBreaker(settings.registry_breaker_failures, settings.registry_breaker_cooldown),
        traces,
    )


def _rate_limiter(settings: Settings) -> RateLimiter | None:
    if not settings.rate_limits:
        return None
    shared = None
    if settings.redis_url:
        shared = SharedBuckets(
            settings.redis_url,
            settings.redis_namespace,
            settings.redis_timeout,
            CircuitBreaker(settings.registry_breaker_failures, settings.registry_breaker_cooldown),
        )
    return RateLimiter(LocalBuckets(), shared)


def _usage(settings: Settings) -> Flusher | None:
    if not settings.usage_ledger:
        return None
    return Flusher(
        UsageLedger(settings.usage_max_buffered),
        RegistryUsage(settings.registry_url, settings.registry_token),
        settings.usage_flush_interval,
    )


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


async def _serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    registry: Registry,
    metrics: Metrics,
    health_state: Health,
    policy: Callable[[], Policy] | None,
    traces: tracing.Tracing | None,
    limits: RateLimiter | None,
    usage: Flusher | None,
) -> None:
    ledger = usage.ledger if usage is not None else None
    checker = _checker(
        settings, registry, metrics, policy, traces=traces, limits=limits, usage=ledger
    )
    metrics.watch_checks(checker)
    health_servicer = health.HealthServicer()
    draining = False

    def not_ready() -> list[str]:
        """Why this replica must not get checks now (empty: it is ready)."""
        reasons = list(health_state.problems.values())
        if not registry.ready:
            reasons.append("the registry's keys are not loaded yet")
        if draining:
            reasons.append("shutting down")
        return reasons

    servers = _Servers(settings, checker, metrics, health_servicer, ledger)
    ports = await servers.start(not_ready)
    # Everything built so far lives as long as the process: move it out of the cyclic GC's
    # reach, so that collections triggered by per-check garbage do not re-scan it every time.
    gc.freeze()
    # "liveness" is SERVING while the process runs, for liveness probes: unlike readiness, a
    # registry that is not synced yet must not get the pod restarted.
    health_servicer.set(LIVENESS_SERVICE, _SERVING)
    health_task = supervise(
        "readiness", lambda: _follow_readiness(health_servicer, lambda: not not_ready())
    )
    usage_task = supervise("usage-flush", usage.run) if usage is not None else None
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
                "http_check_address": settings.http_check_address or None,
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
    await servers.stop(settings.shutdown_grace)
    if usage is not None and usage_task is not None:
        # Only now: nothing answered after this could still be counted.
        usage_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await usage_task
        await usage.finish()
    log.info("stopped", extra={"fields": {"event": "stopped"}})


def _checker(
    settings: Settings,
    registry: Registry,
    metrics: Metrics,
    policy: Callable[[], Policy] | None,
    *,
    traces: tracing.Tracing | None,
    limits: RateLimiter | None,
    usage: UsageLedger | None,
) -> Checker:
    workers = settings.grpc_workers
    return Checker(
        registry,
        CheckSettings(
            credential_rules=CredentialRules(
                max_key_length=settings.max_key_length,
                key_prefix=settings.key_prefix,
                require_checksum=settings.require_key_checksum,
            ),
            check_timeout=settings.check_timeout,
            max_waiting=settings.max_concurrent_checks,
            # A quarter of the workers (at least one) never wait for the registry.
            max_waiting_threads=max(1, workers - max(1, workers // 4)),
            allow_non_http=settings.non_http_requests == "allow",
        ),
        asyncio.get_running_loop(),
        metrics,
        policy,
        tracing=traces,
        limits=limits,
        usage=usage,
    )


class _Servers:
    """Every listening server: the gRPC check server (a thread pool), the HTTP check server,
    the access-log and admin servers (grpc.aio), and the HTTP port for probes and metrics."""

    def __init__(
        self,
        settings: Settings,
        checker: Checker,
        metrics: Metrics,
        health_servicer: health.HealthServicer,
        usage: UsageLedger | None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        answer_settings = AnswerSettings(
            client_id_header=settings.client_id_header,
            client_name_header=settings.client_name_header,
            client_roles_header=settings.client_roles_header,
            realm=settings.realm,
            retry_after_seconds=settings.retry_after,
        )
        self._check = grpc_server.build_server(
            grpc_server.AuthorizationServicer(
                checker,
                Encoder(answer_settings, settings.rate_limit_headers),
                settings.max_message_bytes,
            ),
            health_servicer,
            workers=settings.grpc_workers,
        )
        self._http_check = (
            HttpCheckServer(
                checker,
                answer_settings,
                HttpCheckSettings(
                    path_prefix=settings.http_check_path_prefix,
                    max_body_bytes=settings.max_message_bytes,
                ),
                settings.rate_limit_headers,
            )
            if settings.http_check_address
            else None
        )
        self._aio: list[tuple[str, str, str, grpc.aio.Server]] = []
        if settings.access_log_address:
            access_logs = grpc_server.AccessLogServicer(
                metrics,
                settings.access_log_client_header or None,
                settings.access_log_token,
                usage,
            )
            self._aio.append(
                (
                    "access_log",
                    settings.access_log_address,
                    "AUTHZ_ACCESS_LOG_ADDRESS (access_log_address)",
                    grpc_server.build_access_log_server(access_logs, settings.max_message_bytes),
                )
            )
        if settings.admin_address:
            self._aio.append(
                (
                    "admin",
                    settings.admin_address,
                    "AUTHZ_ADMIN_ADDRESS (admin_address)",
                    grpc_server.build_admin_server(AdminServicer(checker)),
                )
            )
        self._runner: web.AppRunner | None = None

    async def start(self, not_ready: Callable[[], list[str]]) -> dict[str, int]:
        """Listen everywhere; return the ports bound (an address may ask for port 0)."""
        settings = self._settings
        ports = {
            "grpc": _listen(self._check, settings.grpc_address, "AUTHZ_GRPC_ADDRESS (grpc_address)")
        }
        for name, address, setting, server in self._aio:
            ports[name] = _listen(server, address, setting)
        try:
            if self._http_check is not None:
                where = "AUTHZ_HTTP_CHECK_ADDRESS (http_check_address)"
                ports["http_check"] = await self._http_check.start(settings.http_check_address)
            where = "AUTHZ_HTTP_ADDRESS (http_address)"
            self._runner = await http_server.start(
                settings.http_address, not_ready, self._metrics.exposition
            )
            ports["http"] = self._runner.addresses[0][1]
        except OSError as exc:
            await self.stop(0)
            raise StartupError(f"{where}: cannot listen there: {exc.strerror}") from None
        self._check.start()
        for *_, server in self._aio:
            await server.start()
        return ports

    async def stop(self, grace: float) -> None:
        for *_, server in self._aio:
            await server.stop(None)
        if self._http_check is not None:
            await self._http_check.stop(grace)
        await asyncio.to_thread(self._check.stop(grace).wait)
        if self._runner is not None:
            await self._runner.cleanup()


def _listen(server: grpc.Server | grpc.aio.Server, address: str, setting: str) -> int:
    try:
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"{setting}: cannot listen on {address}: {exc}") from None
