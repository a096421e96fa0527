"""Access policy through a real Envoy: the sample policy file (examples/policy.yaml) and the
sample front proxy's per-route requirements, then the admin API with the real grpcurl."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_service import apikeys
from authz_service.registry.static_file import add_key
from tests.e2e import harness

pytestmark = pytest.mark.e2e

EXAMPLE_POLICY = Path(__file__).parents[2] / "examples" / "policy.yaml"
EXPLAIN = "authz_service.admin.v1.Admin/Explain"
INVALIDATE = "authz_service.admin.v1.Admin/Invalidate"


@dataclass(frozen=True)
class Keys:
    admin: str  # client "ops", role admin
    biller: str  # client "biller", role billing
    plain: str  # client "plain", no roles


@dataclass(frozen=True)
class Stack:
    keys: Keys
    service: harness.Service
    envoy: harness.Envoy
    upstream: harness.Upstream
    policy: Path

    def send(self, path: str, key: str, method: str = "GET") -> harness.Response:
        return harness.send(self.envoy.port, path, [("Authorization", f"ApiKey {key}")], method)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("policy")
    keys_file = workdir / "keys.yaml"
    keys = Keys(
        admin=add_key(keys_file, "ops", "Ops Team", ("admin",)),
        biller=add_key(keys_file, "biller", "Billing Team", ("billing",)),
        plain=add_key(keys_file, "plain", "Plain Client"),
    )
    policy = workdir / "policy.yaml"
    shutil.copy(EXAMPLE_POLICY, policy)
    with (
        harness.authz_service(workdir, keys_file, policy_file=str(policy)) as service,
        harness.echo_upstream() as upstream,
    ):
        config = harness.render_front_proxy(0, 0, service, upstream.port)
        with harness.envoy(workdir, config) as envoy:
            yield Stack(keys, service, envoy, upstream, policy)


def test_a_client_with_the_role_gets_in_with_its_roles_upstream(stack: Stack) -> None:
    reply = stack.send("/admin/users", stack.keys.admin)
    assert reply.status == 200
    assert stack.upstream.values(-1, "x-client-id") == ["ops"]
    assert stack.upstream.values(-1, "x-client-roles") == ["admin"]


def test_a_client_without_the_role_gets_403_naming_the_rule(stack: Stack) -> None:
    before = len(stack.upstream.seen)
    reply = stack.send("/admin/users", stack.keys.plain)
    assert reply.status == 403
    assert reply.header("x-ext-authz-reason") == "forbidden"
    assert reply.header("x-ext-authz-rule") == "admin-area"
    assert reply.json()["rule"] == "admin-area"
    assert len(stack.upstream.seen) == before


@pytest.mark.parametrize(
    "path", ["/%61dmin/users", "//admin/users", "/admin/../admin/users", "/x/../admin", "/admin/"]
)
def test_other_spellings_of_a_protected_path_are_denied_too(stack: Stack, path: str) -> None:
    before = len(stack.upstream.seen)
    assert stack.send(path, stack.keys.plain).status == 403
    assert stack.send(path, stack.keys.admin).status == 200
    assert len(stack.upstream.seen) == before + 1


@pytest.mark.parametrize("path", ["/admin%2fusers", "/admin%5Cusers", "/admin;v=1/users"])
def test_ambiguous_paths_are_refused_with_400(stack: Stack, path: str) -> None:
    """Envoy refuses escaped slashes itself (the sample config says so); authz-service refuses
    what Envoy lets through, such as a path parameter."""
    before = len(stack.upstream.seen)
    assert stack.send(path, stack.keys.admin).status == 400
    assert len(stack.upstream.seen) == before


def test_the_route_requirements_from_envoy_apply_on_top_of_the_file(stack: Stack) -> None:
    """/billing carries required_roles "billing,admin" in its ExtAuthzPerRoute."""
    denied = stack.send("/billing/invoices", stack.keys.plain)
    assert (denied.status, denied.header("x-ext-authz-rule")) == (403, "billing-route")
    assert stack.send("/billing/invoices", stack.keys.biller).status == 200
    assert stack.send("/billing/invoices", stack.keys.admin).status == 200


def test_a_rule_that_allows_nobody_stops_even_admins(stack: Stack) -> None:
    reply = stack.send("/internal/debug", stack.keys.admin)
    assert (reply.status, reply.header("x-ext-authz-rule")) == (403, "internal")


def test_a_dry_run_rule_lets_the_request_through_and_records_it(stack: Stack) -> None:
    """reports-readers is in dry-run: 200, and the log line and a metric say it would deny."""
    assert stack.send("/Reports/2026", stack.keys.plain).status == 200
    harness.wait_until(
        lambda: '"dry_run_rule": "reports-readers"' in stack.service.logs(), 5, "decision log"
    )
    line = next(
        json.loads(line)
        for line in stack.service.logs().splitlines()
        if '"dry_run_rule": "reports-readers"' in line
    )
    assert (line["decision"], line["client_id"], line["path"]) == (
        "allow",
        "plain",
        "/Reports/2026",
    )
    metrics = harness.send(stack.service.http_port, "/metrics").body.decode()
    assert (
        'authz_policy_dry_run_denials_total{client_id="plain",rule="reports-readers"} 1.0'
        in metrics
    )


def test_the_policy_file_reloads_without_a_restart(stack: Stack) -> None:
    """An edit takes effect at the next poll; a broken edit is refused and the last good policy
    stays in force."""
    policy = stack.policy
    original = policy.read_text()
    try:
        policy.write_text(original.replace("prefix: /internal", "prefix: /private"))
        harness.wait_until(
            lambda: stack.send("/internal/debug", stack.keys.admin).status == 200, 10, "reload"
        )
        policy.write_text("default: [")
        harness.wait_until(
            lambda: "policy_file_rejected" in stack.service.logs(), 10, "rejection logged"
        )
        assert stack.send("/private/x", stack.keys.admin).status == 403
    finally:
        policy.write_text(original)
        harness.wait_until(
            lambda: stack.send("/internal/debug", stack.keys.admin).status == 403, 10, "restore"
        )


# --- the admin API, with the real grpcurl ---------------------------------------------------


def explain(stack: Stack, **request: object) -> dict[str, object]:
    reply = harness.grpcurl(stack.service.admin_target, EXPLAIN, data=json.dumps(request))
    return dict(json.loads(reply))


def test_reflection_lists_the_admin_api_on_its_own_port(stack: Stack) -> None:
    services = harness.grpcurl(stack.service.admin_target, "list").split()
    assert services == ["authz_service.admin.v1.Admin", "grpc.reflection.v1alpha.ServerReflection"]
    assert "authz_service.admin" not in harness.grpcurl(stack.service.grpc_target, "list")


def test_explain_traces_a_key_through_every_step(stack: Stack) -> None:
    reply = explain(stack, method="GET", host="api", path="/%61dmin/x?q=1", key=stack.keys.plain)
    assert reply["decision"] == "deny"
    assert reply["reason"] == "forbidden"
    assert reply["http_status"] == 403
    assert reply["credential"] == "valid"
    assert reply["key_id"] == apikeys.hash_key(stack.keys.plain)[:12]
    assert reply["resolution"] == "memory"
    assert reply["client"] == {"client_id": "plain", "name": "Plain Client"}
    assert reply["rule"] == "admin-area"
    assert reply["normalized_path"] == "/admin/x"
    steps = reply["steps"]
    assert isinstance(steps, list)
    assert steps[-1] == "decision: deny (forbidden), HTTP 403"
    assert stack.keys.plain not in json.dumps(reply)


def test_explain_shows_a_credential_failure(stack: Stack) -> None:
    reply = explain(stack, path="/", key="not a key")
    assert (reply["decision"], reply["credential"], reply["http_status"]) == (
        "deny",
        "malformed_credential",
        401,
    )


def test_explain_for_a_client_id_and_route_requirements(stack: Stack) -> None:
    reply = explain(
        stack,
        path="/billing/x",
        client_id="biller",
        context_extensions={"required_roles": "admin", "rule_id": "admins-only"},
    )
    assert (reply["decision"], reply["rule"], reply["resolution"]) == (
        "deny",
        "admins-only",
        "known_client",
    )
    dry_run = explain(stack, path="/reports", client_id="biller")
    assert (dry_run["decision"], dry_run["dry_run_rule"]) == ("allow", "reports-readers")


def test_explain_for_an_unknown_client_needs_roles(stack: Stack) -> None:
    with pytest.raises(subprocess.CalledProcessError) as raised:
        explain(stack, path="/admin", client_id="stranger")
    assert "NotFound" in raised.value.stderr
    reply = explain(stack, path="/admin", client_id="stranger", roles=["admin"])
    assert (reply["decision"], reply["resolution"]) == ("allow", "supplied_roles")


def test_invalidate_without_a_cache_says_so(stack: Stack) -> None:
    reply = json.loads(
        harness.grpcurl(
            stack.service.admin_target, INVALIDATE, data=json.dumps({"client_id": "plain"})
        )
    )
    assert "nothing cached" in reply["detail"]


def test_invalidate_evicts_a_cached_client(tmp_path: Path) -> None:
    """With the registry over HTTP, roles come from the registry into the policy; Invalidate
    drops the cached answers of a client's keys, and the next check asks the registry again."""
    with harness.registry_process(tmp_path) as registry:
        client = registry.create_client("Acme", roles=["admin"])
        with harness.authz_service(
            tmp_path,
            registry="http",
            registry_url=registry.url,
            registry_token=registry.service_token(),
            registry_feed="false",
            policy_file=str(EXAMPLE_POLICY),
        ) as service:
            key = client["api_key"]
            first = json.loads(
                harness.grpcurl(
                    service.admin_target, EXPLAIN, data=json.dumps({"key": key, "path": "/admin"})
                )
            )
            assert (first["decision"], first["rule"]) == ("allow", "admin-area")
            assert first["client"]["roles"] == ["admin"]
            cached = json.loads(
                harness.grpcurl(service.admin_target, EXPLAIN, data=json.dumps({"key": key}))
            )
            assert (first["resolution"], cached["resolution"]) == ("registry", "memory")
            reply = json.loads(
                harness.grpcurl(
                    service.admin_target,
                    INVALIDATE,
                    data=json.dumps({"client_id": client["client_id"]}),
                )
            )
            assert reply["evicted"] == 1
            again = json.loads(
                harness.grpcurl(service.admin_target, EXPLAIN, data=json.dumps({"key": key}))
            )
            assert again["resolution"] == "registry"
            by_key = json.loads(
                harness.grpcurl(service.admin_target, INVALIDATE, data=json.dumps({"key": key}))
            )
            assert by_key["evicted"] == 1
