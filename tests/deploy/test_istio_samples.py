"""The Istio samples (envoy/istio/): both providers fail closed, with a timeout set and shorter
than Istio's 600 s default but longer than ours; the HTTP provider carries the same header lists
as envoy/front-proxy-http.yaml; the policies name the chart's Service, pods and ports; and the
EnvoyFilter's patches, applied the way Istio applies them, are accepted and enforced by the real
Envoy. There is no cluster here: Istio's CRDs cannot be applied, so their fields are checked
against what they must agree with."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from authz_service.settings import Settings
from tests.e2e import harness

ISTIO = harness.ROOT / "envoy" / "istio"
CHART = harness.ROOT / "helm" / "authz-service"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ISTIO / name).read_text())
    return document


def load_all(name: str) -> dict[str, dict[str, Any]]:
    """The documents of a file, by kind."""
    return {d["kind"]: d for d in yaml.safe_load_all((ISTIO / name).read_text())}


def providers() -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in load("mesh-config.yaml")["meshConfig"]["extensionProviders"]}


def grpc_provider() -> dict[str, Any]:
    found: dict[str, Any] = providers()["authz-service"]["envoyExtAuthzGrpc"]
    return found


def http_provider() -> dict[str, Any]:
    found: dict[str, Any] = providers()["authz-service-http"]["envoyExtAuthzHttp"]
    return found


def chart_manifests() -> dict[str, Any]:
    """`helm install authz-service helm/authz-service -n authz`, as the README says."""
    out = helm.Chart.load(CHART).render(None, name="authz-service", namespace="authz")
    return {
        "service": yaml.safe_load(out["authz-service/templates/service.yaml"]),
        "deployment": yaml.safe_load(out["authz-service/templates/deployment.yaml"]),
    }


def service_ports() -> dict[str, int]:
    return {p["name"]: p["port"] for p in chart_manifests()["service"]["spec"]["ports"]}


@pytest.mark.parametrize("provider", [grpc_provider, http_provider], ids=["grpc", "http"])
def test_the_provider_fails_closed_with_a_timeout_longer_than_the_services(
    provider: Any,
) -> None:
    settings = provider()
    assert settings["failOpen"] is False
    assert settings["statusOnError"] == "503"
    timeout = float(settings["timeout"].removesuffix("s"))
    assert Settings().check_timeout < timeout <= 1.0


@pytest.mark.parametrize(
    ("provider", "port"),
    [(grpc_provider, "grpc"), (http_provider, "http-check")],
    ids=["grpc", "http"],
)
def test_the_provider_points_at_the_charts_service(provider: Any, port: str) -> None:
    service = chart_manifests()["service"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert provider()["service"] == name
    assert provider()["port"] == service_ports()[port]


def test_the_http_provider_sends_and_passes_the_same_headers_as_the_envoy_sample() -> None:
    """Istio's names for allowed_headers, allowed_upstream_headers, allowed_client_headers and
    allowed_client_headers_on_success."""
    sample = yaml.safe_load(harness.FRONT_PROXY_HTTP.read_text())
    manager = sample["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = next(
        f["typed_config"]
        for f in manager["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    )
    response = ext_authz["http_service"]["authorization_response"]

    def names(patterns: dict[str, Any]) -> list[str]:
        return [p["exact"] for p in patterns["patterns"]]

    provider = http_provider()
    assert provider["includeRequestHeadersInCheck"] == names(ext_authz["allowed_headers"])
    assert provider["headersToUpstreamOnAllow"] == names(response["allowed_upstream_headers"])
    assert provider["headersToDownstreamOnDeny"] == names(response["allowed_client_headers"])
    assert provider["headersToDownstreamOnAllow"] == names(
        response["allowed_client_headers_on_success"]
    )
    assert "pathPrefix" not in provider  # AUTHZ_HTTP_CHECK_PATH_PREFIX defaults to none
    assert Settings().http_check_path_prefix == ""


def test_the_policy_hands_every_request_but_health_checks_to_a_provider() -> None:
    policy = load("authorization-policy.yaml")
    assert policy["kind"] == "AuthorizationPolicy"
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] in providers()
    (rule,) = policy["spec"]["rules"]
    (target,) = rule["to"]
    assert set(target["operation"]) == {"notPaths"}
    assert {"/healthz", "/readyz"} <= set(target["operation"]["notPaths"])


def patches() -> list[dict[str, Any]]:
    envoy_filter = load("strip-identity-headers.yaml")
    policy = load("authorization-policy.yaml")
    assert (
        envoy_filter["spec"]["workloadSelector"]["labels"]
        == (policy["spec"]["selector"]["matchLabels"])
    )
    found: list[dict[str, Any]] = envoy_filter["spec"]["configPatches"]
    return found


def test_identity_headers_are_stripped_before_the_check_on_the_same_workload() -> None:
    strip, _ = patches()
    assert strip["applyTo"] == "HTTP_FILTER"
    assert strip["patch"]["operation"] == "INSERT_FIRST"
    removed = {
        m["remove"]
        for m in strip["patch"]["value"]["typed_config"]["mutations"]["request_mutations"]
    }
    defaults = Settings()
    assert removed == {
        defaults.client_id_header,
        defaults.client_name_header,
        defaults.client_roles_header,
    }


def test_header_names_with_underscores_are_refused_on_the_same_workload() -> None:
    _, underscores = patches()
    assert underscores["applyTo"] == "NETWORK_FILTER"
    assert underscores["patch"]["operation"] == "MERGE"
    options = underscores["patch"]["value"]["typed_config"]["common_http_protocol_options"]
    assert options == {"headers_with_underscores_action": "REJECT_REQUEST"}
    for patch in patches():
        assert patch["match"]["context"] == "SIDECAR_INBOUND"
        assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == (
            "envoy.filters.network.http_connection_manager"
        )


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Istio's MERGE of a message: fields set in the patch replace or merge into the target."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def inbound_listener(upstream_port: int) -> dict[str, Any]:
    """A minimal sidecar inbound listener, with both patches applied as Istio applies them."""
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters."
        "network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "name": "inbound",
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    strip, underscores = patches()
    manager["http_filters"].insert(0, copy.deepcopy(strip["patch"]["value"]))
    merge(manager, underscores["patch"]["value"]["typed_config"])
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def test_the_patched_listener_is_a_valid_envoy_config(tmp_path: Path) -> None:
    path = tmp_path / "patched.yaml"
    path.write_text(yaml.safe_dump(inbound_listener(8000)))
    result = harness.envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def patched_inbound(tmp_path: Path) -> Iterator[tuple[harness.Envoy, harness.WsgiUpstream]]:
    with (
        harness.wsgi_upstream() as app,
        harness.envoy(tmp_path, inbound_listener(app.port)) as proxy,
    ):
        yield proxy, app


@pytest.mark.e2e
def test_the_patched_listener_keeps_every_spelling_of_identity_from_the_application(
    patched_inbound: tuple[harness.Envoy, harness.WsgiUpstream],
) -> None:
    """Through the real Envoy: hyphenated names are removed, underscored ones refused (400)."""
    proxy, app = patched_inbound
    reply = harness.send(proxy.port, "/", [("X-Client-Id", "evil"), ("x-client-roles", "admin")])
    assert reply.status == 200
    assert not [k for k in app.seen[-1] if k.startswith("HTTP_X_CLIENT_")]
    for name in ("x_client_id", "X_Client_Roles", "x-client_name"):
        assert harness.send(proxy.port, "/", [(name, "evil")]).status == 400
    assert len(app.seen) == 1


def test_only_the_meshs_proxies_may_send_access_logs() -> None:
    """mTLS required on the chart's access-log port, and a DENY for any other caller there."""
    documents = load_all("access-log-policy.yaml")
    peer, policy = documents["PeerAuthentication"], documents["AuthorizationPolicy"]
    manifests = chart_manifests()
    pod_labels = manifests["deployment"]["spec"]["template"]["metadata"]["labels"]
    container = manifests["deployment"]["spec"]["template"]["spec"]["containers"][0]
    (access_log_port,) = [
        p["containerPort"] for p in container["ports"] if p["name"] == "grpc-access-log"
    ]
    for document in (peer, policy):
        assert document["metadata"]["namespace"] == manifests["service"]["metadata"]["namespace"]
        assert document["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert peer["spec"]["portLevelMtls"] == {access_log_port: {"mode": "STRICT"}}
    assert policy["spec"]["action"] == "DENY"
    (rule,) = policy["spec"]["rules"]
    (source,) = rule["from"]
    assert set(source["source"]) == {"notNamespaces"}
    (target,) = rule["to"]
    assert target["operation"] == {"ports": [str(access_log_port)]}
