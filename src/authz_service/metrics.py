"""Every Prometheus object of the service, in one place, served at /metrics.

Labels are bounded. ``client_id`` values come only from the registry (a decision's client, or the
dynamic metadata our own Check put on the request), never from what a client sent; past
``client_label_cap`` distinct clients they fold into ``other``. The check metrics and the
access-log metrics keep separate label sets, so entries sent to the access-log port (which
anyone who can reach it could forge) can never push real clients out of the check metrics.
Keys, paths and raw header values are never labels.

Per-check work is a dictionary increment and a histogram observation on plain numbers. State that
changes elsewhere (the cache, the registry client, the breaker, the snapshot, the change feed,
background tasks) is read only when /metrics is scraped, through the ``watch_*`` methods, which
know those parts only by the small protocols below.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from authz_service import health
from authz_service.model import Decision

OTHER = "other"  # the client label past the cap
NONE = "none"  # the client label of a decision without a client
CHECK_BUCKETS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)


class WaitingChecks(Protocol):
    @property
    def waiting(self) -> int: ...


class CacheState(Protocol):
    lookups: dict[str, int]

    @property
    def entries(self) -> int: ...

    @property
    def evictions(self) -> int: ...


class RegistryClientState(Protocol):
    outcomes: dict[str, int]

    @property
    def breaker_state(self) -> str: ...


class SnapshotState(Protocol):
    version: int | None
    synced_at: float | None


class FeedState(Protocol):
    last_event_at: float | None
    malformed_events: int
    resyncs: int

    @property
    def mode(self) -> str: ...

    @property
    def connected(self) -> bool: ...


class PolicyState(Protocol):
    @property
    def rules(self) -> Sized: ...


class RateLimitState(Protocol):
    @property
    def local(self) -> Sized: ...  # the local buckets

    @property
    def mode(self) -> str: ...


class UsageState(Protocol):
    flushed_entries: int
    dropped: dict[str, int]
    failures: dict[str, int]

    @property
    def buffered(self) -> int: ...


_BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}


class ClientLabels:
    """The first ``cap`` client ids keep their own label; the rest share ``other``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._labels: dict[str, str] = {}

    def label(self, client_id: str | None) -> str:
        if client_id is None:
            return NONE
        label = self._labels.get(client_id)
        if label is None:
            if len(self._labels) >= self._cap:
                return OTHER
            label = self._labels[client_id] = client_id
        return label


class Histogram:
    """A histogram kept as plain numbers: ``observe`` is one ``bisect`` and three additions.
    Not locked itself: its owner serialises observations."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as Prometheus expects."""
        cumulative, total = [], 0
        for bound, count in zip(
            (*map(floatToGoString, self._bounds), "+Inf"), self._counts, strict=True
        ):
            total += count
            cumulative.append((bound, float(total)))
        return cumulative


class Metrics:
    """The service's metrics: plain numbers behind one lock, read by /metrics on the loop."""

    def __init__(self, client_label_cap: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Checks are counted on the check server's worker threads, access logs and registry
        # calls on the event loop: one uncontended lock keeps the counts exact.
        self._lock = threading.Lock()
        self.clients = ClientLabels(client_label_cap)
        self.upstream_clients = ClientLabels(client_label_cap)
        self.access_log_streams_refused = 0
        self._checks: dict[tuple[str, str, str], int] = {}
        self._check_seconds = Histogram(CHECK_BUCKETS)
        self._request_bytes: dict[str, int] = {}
        self._dry_run_denials: dict[tuple[str, str], int] = {}
        self._rate_limited_checks = {"shared": 0, "local": 0}
        self.registry_call_seconds = Histogram(CHECK_BUCKETS)
        self._upstream: dict[tuple[str, str], int] = {}
        self._upstream_request_bytes: dict[str, int] = {}
        self._upstream_response_bytes: dict[str, int] = {}
        self._state = _StateCollector()
        self.registry.register(self._state)
        self.counters(
            "authz_checks",
            "Checks answered, by client, decision and reason.",
            ("client_id", "decision", "reason"),
            lambda: self._checks,
        )
        self.histogram(
            "authz_check_duration_seconds", "Time to decide one check.", self._check_seconds
        )
        self.counters(
            "authz_request_bytes",
            "Request body bytes of checked requests, as Envoy "
            "reports them in the CheckRequest, by client.",
            ("client_id",),
            lambda: self._request_bytes,
        )
        self.counters(
            "authz_policy_dry_run_denials",
            "Requests allowed only because the rule that would have denied them is in dry-run, "
            "by rule and client.",
            ("rule", "client_id"),
            lambda: self._dry_run_denials,
        )
        self.histogram(
            "authz_registry_call_duration_seconds",
            "Time of one call to the client registry.",
            self.registry_call_seconds,
        )
        self.counters(
            "authz_upstream_responses",
            "Requests finished by the upstream, from "
            "Envoy's access logs, by client and status class.",
            ("client_id", "status_class"),
            lambda: self._upstream,
        )
        self.counters(
            "authz_upstream_request_bytes",
            "Request body bytes from Envoy's access logs, by client.",
            ("client_id",),
            lambda: self._upstream_request_bytes,
        )
        self.counters(
            "authz_upstream_response_bytes",
            "Response body bytes from Envoy's access logs, by client.",
            ("client_id",),
            lambda: self._upstream_response_bytes,
        )

    def decision(self, decision: Decision, elapsed: float, request_bytes: int) -> None:
        client = decision.client
        with self._lock:
            label = self.clients.label(client.client_id if client else None)
            key = (label, "allow" if decision.allowed else "deny", decision.reason.value)
            self._checks[key] = self._checks.get(key, 0) + 1
            self._check_seconds.observe(elapsed)
            if request_bytes > 0:
                self._request_bytes[label] = self._request_bytes.get(label, 0) + request_bytes
            if decision.dry_run_rule is not None:  # rule ids come from the policy: bounded
                rule_key = (decision.dry_run_rule, label)
                self._dry_run_denials[rule_key] = self._dry_run_denials.get(rule_key, 0) + 1
            if decision.quota is not None:
                self._rate_limited_checks["shared" if decision.quota.shared else "local"] += 1

    def upstream(
        self, client_id: str | None, status: int, request_bytes: int, response_bytes: int
    ) -> None:
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "unknown"
        with self._lock:
            label = self.upstream_clients.label(client_id)
            key = (label, status_class)
            self._upstream[key] = self._upstream.get(key, 0) + 1
            self._upstream_request_bytes[label] = (
                self._upstream_request_bytes.get(label, 0) + request_bytes
            )
            self._upstream_response_bytes[label] = (
                self._upstream_response_bytes.get(label, 0) + response_bytes
            )

    # --- the state of other parts, read at scrape time -----------------------------------------
    def watch_checks(self, checks: WaitingChecks) -> None:
        self.gauge(
            "authz_checks_in_flight", "Checks waiting for the registry.", lambda: checks.waiting
        )

    def watch_cache(self, cache: CacheState) -> None:
        self.counters(
            "authz_cache_lookups", "Cache lookups by result.", "result", lambda: cache.lookups
        )
        self.gauge("authz_cache_entries", "Keys in the in-process cache.", lambda: cache.entries)
        self.counter(
            "authz_cache_evictions",
            "Entries pushed out by the size bound.",
            lambda: cache.evictions,
        )

    def watch_registry_client(self, client: RegistryClientState) -> None:
        self.counters(
            "authz_registry_calls", "Registry calls by outcome.", "outcome", lambda: client.outcomes
        )
        self.gauge(
            "authz_registry_circuit_state",
            "Registry circuit breaker: 0 closed, 1 open, 2 half-open.",
            lambda: _BREAKER_STATES[client.breaker_state],
        )

    def watch_snapshot(self, snapshot: SnapshotState) -> None:
        self.gauge(
            "authz_snapshot_version",
            "Change-log version of the registry copy.",
            lambda: snapshot.version,
        )
        self.gauge(
            "authz_snapshot_age_seconds",
            "Seconds since the copy last synced.",
            lambda: None if snapshot.synced_at is None else time.time() - snapshot.synced_at,
        )

    def watch_feed(self, feed: FeedState) -> None:
        self.gauge(
            "authz_feed_connected",
            "1 while the registry change stream is connected.",
            lambda: 1 if feed.connected else 0,
        )
        self.counters(
            "authz_feed_mode",
            "How the registry's changes are followed now (1 for the current mode): streaming, "
            "polling (the stream is refused or down) or connecting.",
            "mode",
            lambda: {
                mode: int(feed.mode == mode) for mode in ("streaming", "polling", "connecting")
            },
            kind="gauge",
        )
        self.gauge(
            "authz_feed_last_event_age_seconds",
            "Seconds since the last change-feed event.",
            lambda: None if feed.last_event_at is None else time.time() - feed.last_event_at,
        )
        self.counter(
            "authz_feed_malformed_events",
            "Change events that could not be read (each one triggers a resync).",
            lambda: feed.malformed_events,
        )
        self.counter(
            "authz_feed_resyncs", "Times the feed's consumer started afresh.", lambda: feed.resyncs
        )

    def watch_rate_limits(self, limits: RateLimitState) -> None:
        self.counters(
            "authz_rate_limit_checks",
            "Checks of rate-limited clients, by where their bucket was kept: shared (Redis) or "
            "local (this replica's own, without Redis or while it is down).",
            "mode",
            lambda: self._rate_limited_checks,
        )
        self.counters(
            "authz_rate_limit_mode",
            "Where rate limits are counted now (1 for the current mode): shared (Redis, "
            "across replicas) or local (each replica on its own).",
            "mode",
            lambda: {mode: int(limits.mode == mode) for mode in ("shared", "local")},
            kind="gauge",
        )
        self.gauge(
            "authz_rate_limit_buckets",
            "Clients with a local rate-limit bucket.",
            lambda: len(limits.local),
        )

    def watch_usage(self, usage: UsageState) -> None:
        self.gauge(
            "authz_usage_entries_buffered",
            "Usage ledger entries (one key, one minute) held: open, or waiting for the registry.",
            lambda: usage.buffered,
        )
        self.counter(
            "authz_usage_entries_flushed",
            "Usage ledger entries the registry acknowledged.",
            lambda: usage.flushed_entries,
        )
        self.counters(
            "authz_usage_records_dropped",
            "Checks and upstream responses the usage ledger lost: buffer_full (not counted, "
            "the buffer was full), rejected (in a batch the registry refused as malformed), "
            "shutdown (not delivered at shutdown).",
            "reason",
            lambda: usage.dropped,
        )
        self.counters(
            "authz_usage_flush_failures",
            "Usage batches not delivered: unavailable (the registry failed; retried) or "
            "rejected (refused as malformed; dropped).",
            "kind",
            lambda: usage.failures,
        )

    def watch_policy(self, policy: Callable[[], PolicyState]) -> None:
        self.gauge(
            "authz_policy_rules", "Rules in the policy file in force.", lambda: len(policy().rules)
        )

    def watch_health(self, problems: Callable[[], Mapping[str, str]]) -> None:
        self.counters(
            "authz_problem",
            "1 for each component with a problem that keeps this replica unready.",
            "component",
            lambda: dict.fromkeys(problems(), 1),
            kind="gauge",
        )
        self.counters(
            "authz_background_task_restarts",
            "Restarts of a background task after it failed.",
            "task",
            lambda: {name: state.restarts for name, state in health.TASKS.items()},
        )
        self.counters(
            "authz_background_task_up",
            "1 while a background task runs.",
            "task",
            lambda: {name: int(state.running) for name, state in health.TASKS.items()},
            kind="gauge",
        )
        self.counter(
            "authz_access_log_streams_refused",
            "Access-log streams refused for want of the AUTHZ_ACCESS_LOG_TOKEN.",
            lambda: self.access_log_streams_refused,
        )

    def gauge(self, name: str, documentation: str, read: Callable[[], float | None]) -> None:
        """A gauge read at scrape time (absent while ``read`` returns None)."""
        self._state.gauges.append((name, documentation, read))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere and read at scrape time."""
        self._state.counters.append((name, documentation, (), lambda: {(): read()}, "counter"))

    def counters(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...] | str,
        read: Callable[[], Mapping[Any, float]],
        kind: str = "counter",
    ) -> None:
        """A labelled counter (or gauge) kept elsewhere (keys: label values), read at scrape
        time."""
        names = (labels,) if isinstance(labels, str) else labels
        self._state.counters.append((name, documentation, names, read, kind))

    def histogram(self, name: str, documentation: str, histogram: Histogram) -> None:
        self._state.histograms.append((name, documentation, histogram))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], float | None]]] = []
        self.counters: list[
            tuple[str, str, tuple[str, ...], Callable[[], Mapping[Any, float]], str]
        ] = []
        self.histograms: list[tuple[str, str, Histogram]] = []

    def describe(self) -> Iterable[Metric]:
        return []  # described on collection; the set of metrics is fixed at start-up

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read in self.gauges:
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=value)
        for name, documentation, labels, read_all, kind in self.counters:
            family: CounterMetricFamily | GaugeMetricFamily = (
                CounterMetricFamily(name, documentation, labels=list(labels))
                if kind == "counter"
                else GaugeMetricFamily(name, documentation, labels=list(labels))
            )
            for values, count in list(read_all().items()):
                family.add_metric(_label_values(values, len(labels)), count)
            yield family
        for name, documentation, histogram in self.histograms:
            distribution = HistogramMetricFamily(name, documentation)
            distribution.add_metric([], histogram.buckets(), histogram.sum)
            yield distribution


def _label_values(values: Any, count: int) -> list[str]:
    if count == 0:
        return []
    return [values] if count == 1 and isinstance(values, str) else list(values)
