"""Metrics: bounded client labels, and access-log entries attributed to the right client."""

from __future__ import annotations

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from authz_service.envoy_codec import UpstreamRecord, decode_access_logs
from authz_service.limits import LocalBuckets, RateLimiter
from authz_service.metrics import Metrics
from authz_service.model import Client, Decision, Quota, RateLimit
from authz_service.reasons import Reason


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_client_labels_are_capped_and_fold_into_other() -> None:
    """Past the cap, new clients are counted under 'other'; known ones keep their label."""
    metrics = Metrics(client_label_cap=2)
    for client_id in ("a", "b", "c", "d", "a"):
        metrics.decision(Decision.allow(Client(client_id, client_id)), 0.001, 0)
    counts = {
        c: sample(
            metrics,
            "authz_checks_total",
            {"client_id": c, "decision": "allow", "reason": "allowed"},
        )
        for c in ("a", "b", "c", "d", "other")
    }
    assert counts == {"a": 2, "b": 1, "c": 0, "d": 0, "other": 2}


def test_denials_without_a_client_are_labelled_none() -> None:
    """A request's own claims never become a label."""
    metrics = Metrics()
    metrics.decision(Decision.deny(Reason.UNKNOWN_KEY), 0.001, 0)
    assert (
        sample(
            metrics,
            "authz_checks_total",
            {"client_id": "none", "decision": "deny", "reason": "unknown_key"},
        )
        == 1
    )


def test_dry_run_denials_are_counted_by_rule_and_client() -> None:
    """What a dry-run rule would have denied, so that operators can see it before enforcing."""
    metrics = Metrics()
    client = Client("c-1", "One")
    metrics.decision(Decision.allow(client, rule="old", dry_run_rule="new"), 0.001, 0)
    metrics.decision(Decision.allow(client, rule="old"), 0.001, 0)
    labels = {"rule": "new", "client_id": "c-1"}
    assert sample(metrics, "authz_policy_dry_run_denials_total", labels) == 1


def entry(
    client_id: str | None = None,
    header: str | None = None,
    status: int = 200,
    body: int = 10,
    metadata: dict[str, str] | None = None,
) -> HTTPAccessLogEntry:
    log = HTTPAccessLogEntry()
    if client_id is not None:
        log.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
            {"client_id": client_id}
        )
    if metadata is not None:
        log.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
            metadata
        )
    if header is not None:
        log.request.request_headers["x-client-id"] = header
    log.request.request_body_bytes = 3
    log.response.response_code.value = status
    log.response.response_body_bytes = body
    return log


def message(*entries: HTTPAccessLogEntry) -> StreamAccessLogsMessage:
    result = StreamAccessLogsMessage()
    result.http_logs.log_entry.extend(entries)
    return result


def test_access_log_entries_are_attributed_by_our_dynamic_metadata() -> None:
    """The client our Check named; the header is used only when configured and no metadata."""
    records = decode_access_logs(
        message(entry("acme"), entry(header="spoof"), entry("acme", header="spoof")),
        client_header=None,
    )
    assert [r.client_id for r in records] == ["acme", None, "acme"]
    assert records[0] == UpstreamRecord("acme", 200, 3, 10)
    with_header = decode_access_logs(message(entry(header="x")), client_header="x-client-id")
    assert with_header[0].client_id == "x"


def test_access_log_entries_name_the_key_our_check_allowed_in_either_transport() -> None:
    """gRPC: our dynamic metadata's key_id; HTTP: the x-authz-key-id answer header, which
    Envoy stores as metadata under its own name."""
    records = decode_access_logs(
        message(
            entry(metadata={"client_id": "acme", "key_id": "0123456789ab"}),
            entry(metadata={"x-authz-client-id": "acme", "x-authz-key-id": "ba9876543210"}),
            entry(header="acme"),
        ),
        client_header="x-client-id",
    )
    assert [(r.client_id, r.key_id) for r in records] == [
        ("acme", "0123456789ab"),
        ("acme", "ba9876543210"),
        ("acme", None),
    ]


def test_checks_of_rate_limited_clients_are_counted_by_where_the_bucket_was() -> None:
    metrics = Metrics()
    limits = RateLimiter(LocalBuckets())
    metrics.watch_rate_limits(limits)
    limit = RateLimit(5, "second")
    allowed = Decision.allow(Client("c", "C", (), limit))
    metrics.decision(allowed._replace(quota=Quota(limit, 4, 1, shared=True)), 0.001, 0)
    metrics.decision(allowed._replace(quota=Quota(limit, 3, 1, shared=False)), 0.001, 0)
    metrics.decision(allowed, 0.001, 0)
    assert sample(metrics, "authz_rate_limit_checks_total", {"mode": "shared"}) == 1
    assert sample(metrics, "authz_rate_limit_checks_total", {"mode": "local"}) == 1
    assert sample(metrics, "authz_rate_limit_mode", {"mode": "local"}) == 1
    assert sample(metrics, "authz_rate_limit_mode", {"mode": "shared"}) == 0


def test_upstream_responses_are_counted_by_status_class_with_body_bytes() -> None:
    """2xx and 5xx responses and their bytes, per client."""
    metrics = Metrics()
    metrics.upstream("acme", 200, 3, 100)
    metrics.upstream("acme", 503, 0, 50)
    assert (
        sample(
            metrics, "authz_upstream_responses_total", {"client_id": "acme", "status_class": "5xx"}
        )
        == 1
    )
    assert sample(metrics, "authz_upstream_response_bytes_total", {"client_id": "acme"}) == 150
    assert sample(metrics, "authz_upstream_request_bytes_total", {"client_id": "acme"}) == 3


def test_the_histogram_exposes_cumulative_buckets_sum_and_count() -> None:
    """What Prometheus expects: le buckets counting everything at or below, then +Inf."""
    metrics = Metrics()
    for elapsed in (0.00002, 0.00003, 0.0004, 2.0):
        metrics.decision(Decision.deny(Reason.UNKNOWN_KEY), elapsed, 0)
    bucket = "authz_check_duration_seconds_bucket"
    assert sample(metrics, bucket, {"le": "2.5e-05"}) == 1
    assert sample(metrics, bucket, {"le": "5e-05"}) == 2
    assert sample(metrics, bucket, {"le": "0.0005"}) == 3
    assert sample(metrics, bucket, {"le": "1.0"}) == 3
    assert sample(metrics, bucket, {"le": "+Inf"}) == 4
    assert sample(metrics, "authz_check_duration_seconds_count", {}) == 4
    assert abs(sample(metrics, "authz_check_duration_seconds_sum", {}) - 2.00045) < 1e-9
