"""Telemetry through the real Envoy: decisions counted per client in /metrics, upstream answers
and bytes counted per client from Envoy's access logs, and no key anywhere in /metrics."""

from __future__ import annotations

import re

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e


def scrape(service: harness.Service) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = harness.send(service.http_port, "/metrics").body.decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, number in samples.items():
        metric, _, label_text = key.partition("{")
        if metric == name and all(w in label_text for w in wanted):
            total += number
    return total


def test_checks_are_counted_per_client_decision_and_reason(
    front_proxy: harness.Envoy, service: harness.Service, keys: Keys
) -> None:
    """Each check through Envoy moves exactly its own counter."""
    before = scrape(service)
    for _ in range(3):
        harness.send(front_proxy.port, "/m", [("Authorization", f"ApiKey {keys.acme}")])
    harness.send(front_proxy.port, "/m", [("Authorization", "ApiKey azk_nope")])
    after = scrape(service)
    allowed = dict(client_id="acme", decision="allow", reason="allowed")
    denied = dict(client_id="none", decision="deny", reason="unknown_key")
    assert (
        value(after, "authz_checks_total", **allowed)
        - value(before, "authz_checks_total", **allowed)
        == 3
    )
    assert (
        value(after, "authz_checks_total", **denied) - value(before, "authz_checks_total", **denied)
        == 1
    )
    assert value(after, "authz_check_duration_seconds_count") >= 4


def test_upstream_answers_and_bytes_are_counted_per_client_from_access_logs(
    front_proxy: harness.Envoy, service: harness.Service, keys: Keys
) -> None:
    """4 answers of 200 (100 bytes) and 3 of 503 (50 bytes) for one client: exactly those."""
    before = scrape(service)
    authorized = [("Authorization", f"ApiKey {keys.meter}")]
    for _ in range(4):
        assert harness.send(front_proxy.port, "/status/200/100", authorized).status == 200
    for _ in range(3):
        assert harness.send(front_proxy.port, "/status/503/50", authorized).status == 503

    def delta(name: str, **labels: str) -> float:
        return value(scrape(service), name, **labels) - value(before, name, **labels)

    harness.wait_until(
        lambda: delta("authz_upstream_responses_total", client_id="meter") >= 7, 5, "access logs"
    )
    assert delta("authz_upstream_responses_total", client_id="meter", status_class="2xx") == 4
    assert delta("authz_upstream_responses_total", client_id="meter", status_class="5xx") == 3
    assert delta("authz_upstream_response_bytes_total", client_id="meter") == 4 * 100 + 3 * 50


def test_no_key_appears_in_metrics_logs_or_responses(
    front_proxy: harness.Envoy, service: harness.Service, upstream: harness.Upstream, keys: Keys
) -> None:
    """A recognisable key sent through Envoy is nowhere: not in /metrics, the service's logs,
    the answers (headers and body) or what the upstream received."""
    marker = "azk_RECOGNISABLE0000000000000000000000000"
    replies = [
        harness.send(front_proxy.port, "/leak", [("Authorization", f"ApiKey {marker}")]),
        harness.send(front_proxy.port, "/leak", [("Authorization", f"ApiKey {keys.acme}")]),
    ]
    harness.wait_until(lambda: service.logs().count('"path": "/leak"') >= 2, 5, "decision logs")
    outputs = [
        harness.send(service.http_port, "/metrics").body.decode(),
        service.logs(),
        *(repr(reply.headers) + reply.body.decode() for reply in replies),
        repr(upstream.seen[-1]),
    ]
    for text in outputs:
        assert marker not in text
        assert keys.acme not in text
    assert not re.search(r'path="', outputs[0])
