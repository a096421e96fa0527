"""Every Prometheus object of the service, in one place, served at /metrics.

Labels are bounded. ``client_id`` values come only from the registry (a decision's client, or the
dynamic metadata our own Check put on the request), never from what a client sent; past
``client_label_cap`` distinct clients they fold into ``other``. Keys, paths and raw header values
are never labels.

Per-check work is a dictionary increment and a histogram observation on plain numbers. State that
changes elsewhere (the cache, the registry client, the breaker, the snapshot, the change feed) is
read only when /metrics is scraped.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

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
        self._checks: dict[tuple[str, str, str], int] = {}
        self._check_seconds = Histogram(CHECK_BUCKETS)
        self._request_bytes: dict[str, int] = {}
        self._dry_run_denials: dict[tuple[str, str], int] = {}
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

    def upstream(
        self, client_id: str | None, status: int, request_bytes: int, response_bytes: int
    ) -> None:
        status_class = f"{status // 100}xx" if 100 <= status < 600 else "unknown"
        with self._lock:
            label = self.clients.label(client_id)
            key = (label, status_class)
            self._upstream[key] = self._upstream.get(key, 0) + 1
            self._upstream_request_bytes[label] = (
                self._upstream_request_bytes.get(label, 0) + request_bytes
            )
            self._upstream_response_bytes[label] = (
                self._upstream_response_bytes.get(label, 0) + response_bytes
            )

    def gauge(self, name: str, documentation: str, read: Callable[[], float | None]) -> None:
        """A gauge read at scrape time (absent while ``read`` returns None)."""
        self._state.gauges.append((name, documentation, read))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere and read at scrape time."""
        self._state.counters.append((name, documentation, (), lambda: {(): read()}))

    def counters(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...] | str,
        read: Callable[[], Mapping[Any, float]],
    ) -> None:
        """A labelled counter kept elsewhere (keys: label values) and read at scrape time."""
        names = (labels,) if isinstance(labels, str) else labels
        self._state.counters.append((name, documentation, names, read))

    def histogram(self, name: str, documentation: str, histogram: Histogram) -> None:
        self._state.histograms.append((name, documentation, histogram))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], float | None]]] = []
        self.counters: list[
            tuple[str, str, tuple[str, ...], Callable[[], Mapping[Any, float]]]
        ] = []
        self.histograms: list[tuple[str, str, Histogram]] = []

    def describe(self) -> Iterable[Metric]:
        return []  # described on collection; the set of metrics is fixed at start-up

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read in self.gauges:
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=value)
        for name, documentation, labels, read_all in self.counters:
            family = CounterMetricFamily(name, documentation, labels=list(labels))
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
