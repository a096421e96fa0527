"""Every sample Envoy configuration is accepted by the real Envoy, and the samples keep the
protections the README promises: underscores refused, identity stripped, the access-log streams
authenticated, and the HTTP transport's sample equal to the gRPC one wherever they can agree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service.settings import Settings
from tests.e2e import harness

pytestmark = pytest.mark.e2e
CONFIGS = sorted((harness.ROOT / "envoy").glob("*.yaml"))  # envoy/istio/ holds Istio resources
DEFAULTS = Settings()
IDENTITY = [DEFAULTS.client_id_header, DEFAULTS.client_name_header, DEFAULTS.client_roles_header]
# The HTTP transport's wire contract (README, "Envoy configuration").
CHECK_HEADERS = ["authorization", "x-request-id", "traceparent", "tracestate"]
DENY_HEADERS = [
    "www-authenticate",
    "retry-after",
    "x-ext-authz-reason",
    "x-ext-authz-rule",
    "content-type",
    "cache-control",
    "ratelimit",
    "ratelimit-policy",
]
SUCCESS_HEADERS = ["ratelimit", "ratelimit-policy"]  # a rate-limited client's quota, on allows
METADATA_HEADERS = ["x-authz-client-id", "x-authz-client-name", "x-authz-key-id"]
ROUTE_HEADERS = {
    "x-authz-route-required-roles": "billing,admin",
    "x-authz-route-rule-id": "billing-route",
}


def load(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def managers(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The typed_config of every HTTP connection manager."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    yield network_filter["typed_config"]


def http_filter(manager: dict[str, Any], name: str) -> dict[str, Any]:
    config: dict[str, Any] = next(
        f["typed_config"] for f in manager["http_filters"] if f["name"] == name
    )
    return config


def routes(manager: dict[str, Any]) -> list[dict[str, Any]]:
    (host,) = manager["route_config"]["virtual_hosts"]
    found: list[dict[str, Any]] = host["routes"]
    return found


def exact(patterns: dict[str, Any]) -> list[str]:
    """The names of a list of exact string matchers, which must all be exact."""
    assert all(set(p) == {"exact"} | ({"ignore_case"} & set(p)) for p in patterns["patterns"])
    return [p["exact"] for p in patterns["patterns"]]


def test_there_are_sample_configs() -> None:
    """The samples exist (so the parametrised tests below cannot pass vacuously)."""
    assert {harness.FRONT_PROXY, harness.FRONT_PROXY_HTTP} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_envoy_validates_the_sample(config: Path) -> None:
    """`envoy --mode validate` accepts it, without a deprecated field."""
    result = harness.envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Deprecated field" not in result.stdout + result.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_sample_refuses_header_names_with_underscores(config: Path) -> None:
    """x_client_id would reach a WSGI or CGI upstream as HTTP_X_CLIENT_ID."""
    for manager in managers(load(config)):
        options = manager["common_http_protocol_options"]
        assert options["headers_with_underscores_action"] == "REJECT_REQUEST"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_sample_strips_identity_headers_first_and_fails_closed(config: Path) -> None:
    for manager in managers(load(config)):
        first = manager["http_filters"][0]
        assert first["name"] == "envoy.filters.http.header_mutation"
        removed = [m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]]
        assert removed == IDENTITY
        ext_authz = http_filter(manager, "envoy.filters.http.ext_authz")
        assert ext_authz["failure_mode_allow"] is False
        assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_access_logs_go_over_a_unix_socket_or_carry_the_token(config: Path) -> None:
    """AUTHZ_ACCESS_LOG_TOKEN: over TCP, the streams send `authorization: Bearer <token>`."""
    document = load(config)
    clusters = {c["name"]: c for c in document["static_resources"]["clusters"]}
    for manager in managers(document):
        (logger,) = manager["access_log"]
        grpc_service = logger["typed_config"]["common_config"]["grpc_service"]
        cluster = clusters[grpc_service["envoy_grpc"]["cluster_name"]]
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"
        ]
        if "pipe" in address:
            assert "initial_metadata" not in grpc_service
        else:
            assert grpc_service["initial_metadata"] == [
                {"key": "authorization", "value": "Bearer ${AUTHZ_ACCESS_LOG_TOKEN}"}
            ]


def test_the_render_helper_gives_envoy_the_services_token() -> None:
    config = harness.render(
        harness.FRONT_PROXY, 0, 0, {"authz": 1, "authz_access_log": 2, "upstream": 3}, "s3cret"
    )
    (manager,) = managers(config)
    grpc_service = manager["access_log"][0]["typed_config"]["common_config"]["grpc_service"]
    assert grpc_service["initial_metadata"] == [{"key": "authorization", "value": "Bearer s3cret"}]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_the_check_timeout_is_longer_than_the_services_own(config: Path) -> None:
    """The service always answers first (a 503 deny at worst), so Envoy never times out."""
    for manager in managers(load(config)):
        ext_authz = http_filter(manager, "envoy.filters.http.ext_authz")
        service = ext_authz.get("grpc_service") or ext_authz["http_service"]["server_uri"]
        assert DEFAULTS.check_timeout < float(service["timeout"].removesuffix("s")) <= 1.0


def http_sample() -> dict[str, Any]:
    """The HTTP connection manager of envoy/front-proxy-http.yaml."""
    (manager,) = managers(load(harness.FRONT_PROXY_HTTP))
    return manager


def http_service(manager: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = http_filter(manager, "envoy.filters.http.ext_authz")["http_service"]
    return service


def test_the_http_check_carries_the_key_request_ids_and_trace_context_only() -> None:
    ext_authz = http_filter(http_sample(), "envoy.filters.http.ext_authz")
    assert exact(ext_authz["allowed_headers"]) == CHECK_HEADERS
    assert "authorization_request" not in ext_authz["http_service"]


def test_http_answers_pass_identity_upstream_deny_headers_to_clients_and_metadata_to_logs() -> None:
    response = http_service(http_sample())["authorization_response"]
    assert exact(response["allowed_upstream_headers"]) == IDENTITY
    assert exact(response["allowed_client_headers"]) == DENY_HEADERS
    assert exact(response["allowed_client_headers_on_success"]) == SUCCESS_HEADERS
    assert exact(response["dynamic_metadata_from_headers"]) == METADATA_HEADERS


def test_the_http_billing_route_adds_its_requirements_and_changes_nothing_else() -> None:
    """A per-route http_service replaces the filter's: it repeats it, plus two headers."""
    manager = http_sample()
    billing = next(r for r in routes(manager) if r["match"] == {"prefix": "/billing"})
    override = billing["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"][
        "http_service"
    ]
    added = override["authorization_request"].pop("headers_to_add")
    assert {h["key"]: h["value"] for h in added} == ROUTE_HEADERS
    assert override == {**http_service(manager), "authorization_request": {}}


def test_a_client_can_never_send_the_route_or_metadata_headers_to_the_http_check() -> None:
    allowed = set(
        exact(http_filter(http_sample(), "envoy.filters.http.ext_authz")["allowed_headers"])
    )
    assert not allowed & set(ROUTE_HEADERS)
    assert not allowed & set(METADATA_HEADERS)


def test_the_http_sample_routes_filters_and_paths_match_the_grpc_sample() -> None:
    """Same routes (with the same bypass), same strip, same normalisation, same logs."""
    (grpc,) = managers(load(harness.FRONT_PROXY))
    http = http_sample()
    assert [r["match"] for r in routes(http)] == [r["match"] for r in routes(grpc)]
    healthz = {"path": "/healthz"}
    assert [r for r in routes(http) if r["match"] == healthz] == [
        r for r in routes(grpc) if r["match"] == healthz
    ]
    assert [f["name"] for f in http["http_filters"]] == [f["name"] for f in grpc["http_filters"]]
    assert http["http_filters"][0] == grpc["http_filters"][0]
    for field in (
        "normalize_path",
        "merge_slashes",
        "path_with_escaped_slashes_action",
        "common_http_protocol_options",
        "access_log",
    ):
        assert http[field] == grpc[field], field


def test_the_rate_limit_sample_is_the_front_proxy_plus_envoys_rate_limit_service() -> None:
    """envoy/front-proxy-ratelimit.yaml: after ext_authz, Envoy's ratelimit filter, with one
    descriptor per identified client (client_id from our dynamic metadata) limited by the
    client's own rate_limit (RateLimit.Override.DynamicMetadata, which our Check sets)."""
    sample = load(harness.ROOT / "envoy" / "front-proxy-ratelimit.yaml")
    (manager,) = managers(sample)
    (grpc,) = managers(load(harness.FRONT_PROXY))
    names = [f["name"] for f in manager["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]
    ratelimit = http_filter(manager, "envoy.filters.http.ratelimit")
    assert ratelimit["domain"] == "authz-service"
    (host,) = manager["route_config"]["virtual_hosts"]
    ((actions, limit),) = [(r["actions"], r["limit"]) for r in host.pop("rate_limits")]
    namespace = "envoy.filters.http.ext_authz"
    assert actions == [
        {
            "metadata": {
                "descriptor_key": "client_id",
                "metadata_key": {"key": namespace, "path": [{"key": "client_id"}]},
                "source": "DYNAMIC",
                "skip_if_absent": True,
            }
        }
    ]
    assert limit == {
        "dynamic_metadata": {"metadata_key": {"key": namespace, "path": [{"key": "rate_limit"}]}}
    }
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != names[2]]
    assert manager == grpc
    clusters = [c["name"] for c in sample["static_resources"]["clusters"]]
    assert clusters == ["authz", "authz_access_log", "ratelimit", "upstream"]
