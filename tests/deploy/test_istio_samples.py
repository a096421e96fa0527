"""The Istio samples (envoy/istio/): fail closed, a timeout set and shorter than Istio's 600 s
default but longer than ours, the provider the policy names, health paths excluded, and the
header-stripping filter accepted by the real Envoy. There is no cluster here: Istio's CRDs
cannot be applied, so their fields are checked against what they must agree with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from authz_service.settings import Settings
from tests.e2e import harness

ISTIO = harness.ROOT / "envoy" / "istio"
CHART = harness.ROOT / "helm" / "authz-service"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ISTIO / name).read_text())
    return document


def provider() -> dict[str, Any]:
    (entry,) = load("mesh-config.yaml")["meshConfig"]["extensionProviders"]
    return dict(entry)


def test_the_provider_fails_closed_with_a_timeout_longer_than_the_services() -> None:
    grpc = provider()["envoyExtAuthzGrpc"]
    assert grpc["failOpen"] is False
    assert grpc["statusOnError"] == "503"
    timeout = float(grpc["timeout"].removesuffix("s"))
    assert Settings().check_timeout < timeout <= 1.0


def test_the_provider_points_at_the_charts_service() -> None:
    """`helm install authz-service helm/authz-service -n authz`, as the README says."""
    out = helm.Chart.load(CHART).render(None, name="authz-service", namespace="authz")
    service = yaml.safe_load(out["authz-service/templates/service.yaml"])
    grpc = provider()["envoyExtAuthzGrpc"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert grpc["service"] == name
    assert grpc["port"] in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}


def test_the_policy_hands_every_request_but_health_checks_to_the_provider() -> None:
    policy = load("authorization-policy.yaml")
    assert policy["kind"] == "AuthorizationPolicy"
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == provider()["name"]
    (rule,) = policy["spec"]["rules"]
    (target,) = rule["to"]
    assert set(target["operation"]) == {"notPaths"}
    assert {"/healthz", "/readyz"} <= set(target["operation"]["notPaths"])


def test_identity_headers_are_stripped_before_the_check_on_the_same_workload() -> None:
    envoy_filter = load("strip-identity-headers.yaml")
    policy = load("authorization-policy.yaml")
    assert (
        envoy_filter["spec"]["workloadSelector"]["labels"]
        == (policy["spec"]["selector"]["matchLabels"])
    )
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert patch["patch"]["operation"] == "INSERT_FIRST"
    removed = {
        m["remove"]
        for m in patch["patch"]["value"]["typed_config"]["mutations"]["request_mutations"]
    }
    defaults = Settings()
    assert removed == {
        defaults.client_id_header,
        defaults.client_name_header,
        defaults.client_roles_header,
    }


def test_the_envoy_filter_patch_is_a_valid_envoy_filter(tmp_path: Path) -> None:
    """The patched-in filter, placed in a minimal listener, passes `envoy --mode validate`."""
    (patch,) = load("strip-identity-headers.yaml")["spec"]["configPatches"]
    config = {
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "inbound",
                                        "route_config": {"name": "local"},
                                        "http_filters": [
                                            patch["patch"]["value"],
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }
    path = tmp_path / "patched.yaml"
    path.write_text(yaml.safe_dump(config))
    result = harness.envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
