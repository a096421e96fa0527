"""The Grafana dashboard is built only from metrics the service exposes."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from authz_service.breaker import CircuitBreaker
from authz_service.changes import RecentChanges
from authz_service.feed import ChangeFeed, FeedSettings
from authz_service.health import Health
from authz_service.limits import LocalBuckets, RateLimiter
from authz_service.metrics import Metrics
from authz_service.policy import NO_POLICY
from authz_service.registry.http import HttpRegistry
from authz_service.registry.snapshot import SnapshotRegistry
from authz_service.resolver import CachingResolver, ResolverSettings
from authz_service.usage import UsageLedger

DASHBOARD = Path(__file__).resolve().parents[2] / "helm/authz-service/files/grafana-dashboard.json"
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


async def exposed_metric_names() -> set[str]:
    """Every metric family the service can expose: with the http registry, the snapshot, the
    feed, a policy file, rate limits and the usage ledger in use."""
    metrics = Metrics()
    health = Health()
    http = HttpRegistry(
        "http://registry",
        "t",
        timeout=1,
        max_in_flight=1,
        breaker=CircuitBreaker(1, 1),
        health=health,
    )
    resolver = CachingResolver(
        http, ResolverSettings(), asyncio.get_running_loop(), RecentChanges(60)
    )
    snapshot = SnapshotRegistry("http://registry", "t")
    snapshot.version, snapshot.synced_at = 0, time.time()
    feed = ChangeFeed("http://registry", "t", resolver, health, FeedSettings())
    feed.last_event_at = time.time()  # the age is absent until a first event
    metrics.watch_health(lambda: health.problems)
    metrics.watch_registry_client(http)
    metrics.watch_cache(resolver)
    metrics.watch_snapshot(snapshot)
    metrics.watch_feed(feed)
    metrics.watch_policy(lambda: NO_POLICY)
    metrics.watch_checks(FakeChecks())
    metrics.watch_rate_limits(RateLimiter(LocalBuckets()))
    metrics.watch_usage(UsageLedger(max_entries=1))
    return {family.name for family in metrics.registry.collect()}


class FakeChecks:
    waiting = 0


async def test_every_query_names_a_metric_that_exists() -> None:
    """No panel can silently show nothing because of a misspelt or removed metric."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    known = await exposed_metric_names()
    for expr in exprs:
        for name in re.findall(r"\bauthz_[a-z0-9_]+", expr):
            base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
            assert base in known or name in known, f"{name} in {expr!r}"
