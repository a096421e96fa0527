"""The Grafana dashboard is built only from metrics the service exposes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from authz_service.app import _watch
from authz_service.breaker import CircuitBreaker
from authz_service.feed import ChangeFeed
from authz_service.metrics import Metrics
from authz_service.registry.http import HttpRegistry
from authz_service.registry.snapshot import SnapshotRegistry
from authz_service.resolver import CachingResolver, ResolverSettings

DASHBOARD = Path(__file__).resolve().parents[2] / "helm/authz-service/files/grafana-dashboard.json"
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def exposed_metric_names() -> set[str]:
    """Every metric family, with the http registry and with the snapshot registry in use."""
    names: set[str] = set()
    http = HttpRegistry(
        "http://registry", "t", timeout=1, max_in_flight=1, breaker=CircuitBreaker(1, 1)
    )
    snapshot = SnapshotRegistry("http://registry", "t", 1.0)
    snapshot.version, snapshot.synced_at = 0, time.time()
    feed = ChangeFeed("http://registry", "t", lambda _: None)
    feed.last_event_at = time.time()  # the age is absent until a first event
    for registry in (CachingResolver(http, ResolverSettings()), snapshot):
        metrics = Metrics()
        _watch(metrics, registry, feed)
        metrics.gauge("authz_checks_in_flight", "checks", lambda: 0)
        names |= {family.name for family in metrics.registry.collect()}
    return names


def test_every_query_names_a_metric_that_exists() -> None:
    """No panel can silently show nothing because of a misspelt or removed metric."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    known = exposed_metric_names()
    for expr in exprs:
        for name in re.findall(r"\bauthz_[a-z0-9_]+", expr):
            base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
            assert base in known or name in known, f"{name} in {expr!r}"
