"""The Helm chart, rendered by the real Helm engine (helm-python-sdk embeds Helm's Go SDK) and
checked against the Kubernetes API schemas (kubernetes-validate): the defaults, everything
switched on, the security defaults and probes, and contradictions that must fail the render."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from authz_service import policy, settings, tracing
from authz_service.registry import static_file

CHART = Path(__file__).resolve().parents[2] / "helm" / "authz-service"
ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known here.
KUBERNETES_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor"}  # a Prometheus Operator CRD


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest of a release named "authz" in namespace "auth"."""
    out = chart.render(values, name="authz", namespace="auth", is_install=True)
    return [
        document
        for name, text in sorted(out.items())
        if not name.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def render_error(chart: helm.Chart, values: dict[str, Any]) -> str:
    """The message of a render that must fail."""
    with pytest.raises(helm.HelmError) as raised:
        render(chart, values)
    return str(raised.value)


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    out = chart.render(values, name="authz", namespace="auth", is_install=True)
    return next(text for name, text in out.items() if name.endswith("NOTES.txt"))


def kinds(manifests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        by_kind.setdefault(manifest["kind"], []).append(manifest)
    return by_kind


def containers(manifests: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in kinds(manifests)["Deployment"]:
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield pod, container


def authz_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for _, c in containers(manifests) if c["name"] == "authz-service")


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(
    chart: helm.Chart, values: dict[str, Any] | None, version: str
) -> None:
    """Strict validation: unknown fields are errors, as the API server would treat them."""
    manifests = render(chart, values)
    for manifest in manifests:
        if manifest["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_defaults_deploy_what_a_production_install_needs(chart: helm.Chart) -> None:
    by_kind = kinds(render(chart))
    assert sorted(by_kind) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    (deployment,) = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert by_kind["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1
    assert len(deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]) == 2


def test_everything_switched_on_deploys_everything(chart: helm.Chart) -> None:
    by_kind = kinds(render(chart, ALL_ON))
    assert {name: len(items) for name, items in by_kind.items()} == {
        "ConfigMap": 3,  # settings, policy, dashboard
        "Deployment": 2,  # authz-service, the registry
        "HorizontalPodAutoscaler": 1,
        "NetworkPolicy": 2,
        "PodDisruptionBudget": 1,
        "Secret": 2,
        "Service": 2,
        "ServiceAccount": 1,
        "ServiceMonitor": 1,
    }
    assert "replicas" not in by_kind["Deployment"][0]["spec"]  # the HPA owns the count


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_security_defaults_are_on_for_every_container(
    chart: helm.Chart, values: dict[str, Any] | None
) -> None:
    for pod, container in containers(render(chart, values)):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]["memory"]
        # The one writable place on the read-only root filesystem.
        assert {m["name"] for m in container["volumeMounts"]} >= {"tmp"}


def test_probes_use_grpc_health_and_liveness_never_waits_for_readiness(
    chart: helm.Chart,
) -> None:
    container = authz_container(render(chart))
    grpc_port = container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
    assert container["startupProbe"]["grpc"]["service"] == "liveness"


def test_termination_grace_covers_the_drain_and_the_grace_period(chart: helm.Chart) -> None:
    manifests = render(chart, {"shutdown": {"drainDelay": 7, "grace": 20}})
    (deployment,) = kinds(manifests)["Deployment"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 32
    config = next(c for c in kinds(manifests)["ConfigMap"] if "AUTHZ_DRAIN_DELAY" in c["data"])
    assert (config["data"]["AUTHZ_DRAIN_DELAY"], config["data"]["AUTHZ_SHUTDOWN_GRACE"]) == (
        "7",
        "20",
    )


def test_the_grpc_port_is_declared_as_grpc(chart: helm.Chart) -> None:
    (service,) = kinds(render(chart))["Service"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-metrics"]["port"] == 9090


def test_the_http_check_port_is_served_declared_and_open_to_the_proxies(
    chart: helm.Chart,
) -> None:
    """Container port, Service port (appProtocol http), setting and NetworkPolicy agree."""
    by_kind = kinds(render(chart, ALL_ON))
    container = authz_container(render(chart, ALL_ON))
    assert {"name": "http-check", "containerPort": 9004, "protocol": "TCP"} in container["ports"]
    service = next(s for s in by_kind["Service"] if s["metadata"]["name"] == "authz-authz-service")
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "http-check"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (9004, "http-check", "http")
    config = next(c for c in by_kind["ConfigMap"] if "AUTHZ_REGISTRY" in c["data"])
    assert config["data"]["AUTHZ_HTTP_CHECK_ADDRESS"] == "0.0.0.0:9004"
    policy = next(
        p for p in by_kind["NetworkPolicy"] if p["metadata"]["name"] == "authz-authz-service"
    )
    proxies = next(
        rule
        for rule in policy["spec"]["ingress"]
        if rule["from"] == ALL_ON["networkPolicy"]["grpcFrom"]
    )
    assert {p["port"] for p in proxies["ports"]} == {9001, 9003, 9004}


def test_the_http_check_port_can_be_turned_off(chart: helm.Chart) -> None:
    manifests = render(chart, {"ports": {"httpCheck": 0}})
    by_kind = kinds(manifests)
    assert "http-check" not in {p["name"] for p in authz_container(manifests)["ports"]}
    (service,) = by_kind["Service"]
    assert "http-check" not in {p["name"] for p in service["spec"]["ports"]}
    config = next(c for c in by_kind["ConfigMap"] if "AUTHZ_REGISTRY" in c["data"])
    assert config["data"]["AUTHZ_HTTP_CHECK_ADDRESS"] == ""


@pytest.mark.parametrize(
    ("values", "secret", "key"),
    [
        (
            {"accessLogToken": {"value": "a-long-access-log-token"}},
            "authz-authz-service",
            "access-log-token",
        ),
        (
            {"accessLogToken": {"existingSecret": "tokens", "existingSecretKey": "als"}},
            "tokens",
            "als",
        ),
    ],
    ids=["value", "existing Secret"],
)
def test_the_access_log_token_reaches_the_service_from_a_secret(
    chart: helm.Chart, values: dict[str, Any], secret: str, key: str
) -> None:
    """AUTHZ_ACCESS_LOG_TOKEN comes from a Secret, never from the ConfigMap."""
    manifests = render(chart, values)
    (variable,) = [
        v for v in authz_container(manifests)["env"] if v["name"] == "AUTHZ_ACCESS_LOG_TOKEN"
    ]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    by_kind = kinds(manifests)
    assert all("AUTHZ_ACCESS_LOG_TOKEN" not in c["data"] for c in by_kind["ConfigMap"])
    if "value" in values["accessLogToken"]:
        (chart_secret,) = by_kind["Secret"]
        assert chart_secret["stringData"][key] == values["accessLogToken"]["value"]


def test_without_an_access_log_token_none_is_set(chart: helm.Chart) -> None:
    names = {v["name"] for v in authz_container(render(chart)).get("env", [])}
    assert "AUTHZ_ACCESS_LOG_TOKEN" not in names


def test_the_service_monitor_scrapes_the_services_metrics_port(chart: helm.Chart) -> None:
    """ServiceMonitor is a CRD, outside the Kubernetes schemas: its links are checked here."""
    by_kind = kinds(render(chart, ALL_ON))
    (monitor,) = by_kind["ServiceMonitor"]
    service = next(s for s in by_kind["Service"] if s["metadata"]["name"] == "authz-authz-service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_the_rendered_settings_are_accepted_by_the_service(
    chart: helm.Chart, values: dict[str, Any] | None
) -> None:
    """The ConfigMap's AUTHZ_* values, with the secrets the pod gets, load as Settings; the
    keys file and the policy it ships parse."""
    manifests = render(chart, values)
    by_kind = kinds(manifests)
    config = next(c for c in by_kind["ConfigMap"] if "AUTHZ_REGISTRY" in c["data"])
    environ = dict(config["data"])
    for variable in authz_container(manifests).get("env", []):
        environ[variable["name"]] = {
            "AUTHZ_REGISTRY_TOKEN": "a-service-token",
            "AUTHZ_REDIS_URL": "redis://redis:6379/0",
            "AUTHZ_ACCESS_LOG_TOKEN": "an-access-log-token",
        }[variable["name"]]
    loaded = settings.load(environ=environ)
    assert loaded.grpc_address == "0.0.0.0:9001"
    assert loaded.http_check_address == "0.0.0.0:9004"
    for secret in by_kind["Secret"]:
        if "keys.yaml" in secret.get("stringData", {}):
            static_file.parse(secret["stringData"]["keys.yaml"], "keys.yaml")
    for config_map in by_kind["ConfigMap"]:
        if "policy.yaml" in config_map.get("data", {}):
            policy.parse(config_map["data"]["policy.yaml"], "policy.yaml")


def test_tracing_is_off_by_default_and_on_gives_the_pods_the_otel_variables(
    chart: helm.Chart,
) -> None:
    """The variables the chart renders are the ones that turn the service's tracing on."""

    def otel(values: dict[str, Any] | None) -> dict[str, str]:
        (config,) = [
            c for c in kinds(render(chart, values))["ConfigMap"] if "AUTHZ_REGISTRY" in c["data"]
        ]
        return {k: v for k, v in config["data"].items() if k.startswith("OTEL_")}

    assert otel(None) == {}
    assert tracing.exporters_asked_for(otel(None)) == []
    rendered = otel(ALL_ON)
    assert rendered == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": ALL_ON["tracing"]["endpoint"],
        "OTEL_SERVICE_NAME": "authz-service",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=production",
    }
    assert tracing.exporters_asked_for(rendered) == ["otlp_proto_grpc"]


@pytest.mark.parametrize(
    "registry",
    [{"mode": "static"}, {"mode": "snapshot", "url": "http://registry:8081", "token": "t" * 32}],
    ids=["static", "snapshot"],
)
def test_redis_is_given_in_every_registry_mode_for_the_rate_limits(
    chart: helm.Chart, registry: dict[str, Any]
) -> None:
    """Redis holds the clients' rate-limit buckets whatever resolves the keys, so that a
    limit holds across replicas."""
    values = {"registry": registry, "redis": {"url": "redis://redis:6379/0"}}
    names = {variable["name"] for variable in authz_container(render(chart, values))["env"]}
    assert "AUTHZ_REDIS_URL" in names


def test_the_dashboard_is_shipped_with_the_chart(chart: helm.Chart) -> None:
    dashboard = next(
        c
        for c in kinds(render(chart, ALL_ON))["ConfigMap"]
        if c["metadata"]["name"].endswith("-dashboard")
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files" / "grafana-dashboard.json").read_text()
    assert dashboard["data"]["authz-service.json"].strip() == shipped.strip()


def test_the_notes_say_how_to_wire_envoy_and_istio(chart: helm.Chart) -> None:
    text = notes(chart)
    assert "authz-authz-service.auth.svc.cluster.local:9001" in text
    assert "failure_mode_allow: false" in text
    assert "envoyExtAuthzGrpc" in text
    assert "failOpen: false" in text
    assert "action: CUSTOM" in text
    assert "envoy/front-proxy-http.yaml" in text
    assert "envoyExtAuthzHttp provider on port 9004" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"registry": {"mode": "http"}}, "registry.mode=http needs registry.url"),
        (
            {"registry": {"mode": "http", "url": "http://registry:8081"}},
            "needs the registry's service token",
        ),
        ({"keysFile": {"content": ""}}, "registry.mode=static needs the keys file"),
        (
            {"registry": {"timeout": 0.2}, "checkTimeout": 0.15},
            "registry.timeout (0.2) must be below checkTimeout (0.15)",
        ),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
            "autoscaling.minReplicas is above autoscaling.maxReplicas",
        ),
        (
            {"policy": {"content": "default: allow", "existingConfigMap": "p"}},
            "policy.existingConfigMap and policy.content are both set",
        ),
        ({"settings": {"AUTHZ_REGISTRY": "http"}}, "settings.AUTHZ_REGISTRY is set by the chart"),
        (
            {"settings": {"AUTHZ_ACCESS_LOG_TOKEN": "t"}},
            "settings.AUTHZ_ACCESS_LOG_TOKEN is set by the chart",
        ),
        (
            {"accessLogToken": {"value": "a-long-access-log-token", "existingSecret": "s"}},
            "accessLogToken.value and accessLogToken.existingSecret are both set",
        ),
        (
            {"accessLogToken": {"existingSecret": "s"}, "ports": {"accessLog": 0}},
            "accessLogToken is set but ports.accessLog=0",
        ),
        ({"registryServer": {"enabled": True}}, "registryServer needs its tokens"),
        (
            {
                "registryServer": {
                    "enabled": True,
                    "replicaCount": 2,
                    "tokens": {"existingSecret": "t"},
                }
            },
            "sqlite runs one replica",
        ),
        (
            {"podDisruptionBudget": {"maxUnavailable": "0%"}},
            "maxUnavailable=0% blocks every node drain",
        ),
        (
            {"tracing": {"endpoint": "http://collector:4317"}},
            "tracing.endpoint or tracing.env is set but tracing.enabled is false",
        ),
        (
            {"tracing": {"enabled": True, "samplerArg": "0.1"}},
            "tracing.samplerArg is only read by the traceidratio samplers",
        ),
        (
            {"tracing": {"enabled": True, "env": {"OTEL_SERVICE_NAME": "x"}}},
            "tracing.env.OTEL_SERVICE_NAME is set by the chart",
        ),
    ],
)
def test_contradictory_values_fail_the_render_with_a_clear_message(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    assert message in render_error(chart, values)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"replicas": 3}, "replicas"),
        ({"registry": {"mode": "ldap"}}, "mode"),
        ({"registryServer": {"database": {"kind": "mysql"}}}, "kind"),
        ({"settings": {"LOG_LEVEL": "debug"}}, "LOG_LEVEL"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"accessLogToken": {"value": "short"}}, "value"),
        ({"ports": {"httpCheck": 70000}}, "httpCheck"),
        ({"tracing": {"sampler": "sometimes"}}, "sampler"),
        ({"tracing": {"env": {"AUTHZ_LOG_LEVEL": "debug"}}}, "AUTHZ_LOG_LEVEL"),
    ],
)
def test_the_schema_refuses_unknown_or_malformed_values(
    chart: helm.Chart, values: dict[str, Any], field: str
) -> None:
    assert field in render_error(chart, values)


def test_the_schema_closes_every_object_it_describes() -> None:
    """additionalProperties: false wherever the schema lists properties."""

    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield where
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}")

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert list(walk(schema, "$")) == []


def test_every_value_is_commented() -> None:
    """Each key of values.yaml (down to the chart's own settings) has a comment above it or
    beside it; keys inside Kubernetes objects passed through (resources, ...) are exempt."""
    passed_through = ("resources", "podSecurityContext", "securityContext", "labels", "limits")
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    parents: list[tuple[int, str]] = []
    block_indent = None  # inside a "key: |" text block, which holds text, not values
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*):", line)
        if block_indent is not None and (
            not line.strip() or len(line) - len(line.lstrip()) > block_indent
        ):
            continue
        block_indent = None
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        if line.rstrip().endswith("|"):
            block_indent = indent
        parents = [(i, k) for i, k in parents if i < indent]
        inside = any(k in passed_through for _, k in parents)
        parents.append((indent, key))
        if inside:
            continue
        previous = lines[index - 1].strip() if index else ""
        if not previous.startswith("#") and "#" not in line:
            uncommented.append(key)
    assert uncommented == []


def test_helm_lint_finds_nothing(chart: helm.Chart) -> None:
    for values in (None, ALL_ON):
        report = helm.lint(CHART, values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems
