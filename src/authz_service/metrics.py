"""Every Prometheus object of the service, in one place, served at /metrics.

Labels are bounded. ``client_id`` values come only from the registry (a decision's client, or the
dynamic metadata our own Check put on the request), never from what a client sent; past
``client_label_cap`` distinct clients they fold into ``other``. Keys, paths and raw header values
are never labels.

Per-check work is one cached counter child and one histogram observation. State that changes
elsewhere (the cache, the registry client, the breaker, the snapshot, the change feed) is read
only when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


class Metrics:
    def __init__(self, client_label_cap: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clients = ClientLabels(client_label_cap)
        registry = self.registry
        self._checks = Counter(
            "authz_checks",
            "Checks answered, by client, decision and reason.",
            ["client_id", "decision", "reason"],
            registry=registry,
        )
        self._check_seconds = Histogram(
            "authz_check_duration_seconds",
            "Time to decide one check.",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self._request_bytes = Counter(
            "authz_request_bytes",
            "Request body bytes of checked requests, as Envoy reports "
            "them in the CheckRequest, by client.",
            ["client_id"],
            registry=registry,
        )
        self.registry_call_seconds = Histogram(
            "authz_registry_call_duration_seconds",
            "Time of one call to the client registry.",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self._upstream_responses = Counter(
            "authz_upstream_responses",
            "Requests finished by the upstream, from Envoy's access "
            "logs, by client and status class.",
            ["client_id", "status_class"],
            registry=registry,
        )
        self._upstream_request_bytes = Counter(
            "authz_upstream_request_bytes",
            "Request bytes (headers and body) from Envoy's access logs, by client.",
            ["client_id"],
            registry=registry,
        )
        self._upstream_response_bytes = Counter(
            "authz_upstream_response_bytes",
            "Response bytes (headers and body) from Envoy's access logs, by client.",
            ["client_id"],
            registry=registry,
        )
        self._state = _StateCollector()
        registry.register(self._state)
        self._children: dict[tuple[str, bool, str], Any] = {}

    def decision(self, decision: Decision, elapsed: float, request_bytes: int) -> None:
        client = decision.client
        label = self.clients.label(client.client_id if client else None)
        key = (label, decision.allowed, decision.reason.value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._checks.labels(
                label, "allow" if decision.allowed else "deny", decision.reason.value
            )
        child.inc()
        self._check_seconds.observe(elapsed)
        if request_bytes > 0:
            self._request_bytes.labels(label).inc(request_bytes)

    def upstream(
        self, client_id: str | None, status: int, request_bytes: int, response_bytes: int
    ) -> None:
        label = self.clients.label(client_id)
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "unknown"
        self._upstream_responses.labels(label, status_class).inc()
        self._upstream_request_bytes.labels(label).inc(request_bytes)
        self._upstream_response_bytes.labels(label).inc(response_bytes)

    def gauge(self, name: str, documentation: str, read: Callable[[], float | None]) -> None:
        """A gauge read at scrape time (absent while ``read`` returns None)."""
        self._state.gauges.append((name, documentation, read))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere and read at scrape time."""
        self._state.counters.append((name, documentation, None, lambda: {"": read()}))

    def counters(
        self, name: str, documentation: str, label: str, read: Callable[[], Mapping[str, float]]
    ) -> None:
        """A labelled counter whose values are kept elsewhere and read at scrape time."""
        self._state.counters.append((name, documentation, label, read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], float | None]]] = []
        self.counters: list[tuple[str, str, str | None, Callable[[], Mapping[str, float]]]] = []

    def describe(self) -> Iterable[Metric]:
        return []  # described on collection; the set of metrics is fixed at start-up

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read in self.gauges:
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=value)
        for name, documentation, label, read_all in self.counters:
            family = CounterMetricFamily(name, documentation, labels=[label] if label else [])
            for label_value, count in read_all().items():
                family.add_metric([label_value] if label else [], count)
            yield family
