"""The access policy: path normalisation, rule matching, route requirements, dry-run, and the
validation of policy files."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz_service.model import Client, Request
from authz_service.policy import (
    AmbiguousPathError,
    Policy,
    PolicyError,
    PolicyFile,
    Verdict,
    normalize_path,
    parse,
)
from authz_service.reasons import Reason
from tests.fakes import wait_for

ADMIN = Client("ops-1", "Ops", ("admin",))
BILLING = Client("billing-1", "Billing", ("billing",))
PLAIN = Client("app-1", "App")

POLICY = """
version: 1
default: allow
rules:
  - id: admin-area
    paths: [{prefix: /admin}]
    allow: {roles: [admin]}
  - id: invoices
    hosts: [api.example.com, "*.billing.example.com"]
    methods: [POST, delete]
    paths: [{glob: "/accounts/*/invoices/**"}]
    allow: {roles: [billing], clients: [ops-1]}
  - id: reports-ci
    paths: [{exact: /Reports}]
    case_sensitive: false
    allow: {clients: [ci-bot]}
"""


def request(path: str, method: str = "GET", host: str = "api.example.com", **kw: Any) -> Request:
    return Request(is_http=True, method=method, host=host, path=path, **kw)


def verdict(policy: Policy, client: Client, path: str, **kw: Any) -> Verdict:
    return policy.evaluate(request(path, **kw), client)


class TestNormalisation:
    @pytest.mark.parametrize(
        ("raw", "normal"),
        [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/admin/", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/admin/../admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/./admin/.", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a%2E/b", "/a./b"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/a%7e", "/a~"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/c", "/a..b/c"),
        ],
    )
    def test_equivalent_spellings_have_one_normal_form(self, raw: str, normal: str) -> None:
        assert normalize_path(raw) == normal

    @pytest.mark.parametrize(
        "raw",
        [
            "/admin%2fx",
            "/admin%2Fx",
            "/admin%5cx",
            "/admin\\x",
            "/admin;x",
            "/admin%",
            "/admin%zz",
            "/admin%0a",
            "/admin\x00",
            "admin",
            "",
            "*",
        ],
    )
    def test_ambiguous_paths_are_refused_not_guessed(self, raw: str) -> None:
        with pytest.raises(AmbiguousPathError):
            normalize_path(raw)

    def test_path_parameters_can_be_stripped_instead(self) -> None:
        assert normalize_path("/admin;jsessionid=1/x", strip_parameters=True) == "/admin/x"
        assert normalize_path("/public/..;/admin", strip_parameters=True) == "/admin"


class TestRules:
    policy = parse(POLICY, "policy.yaml")

    @pytest.mark.parametrize(
        "path",
        [
            "/admin",
            "/admin/",
            "/admin/users",
            "/admin/../admin",
            "//admin",
            "/%61dmin",
            "/public/../admin/x",
            "/admin?x",  # the codec strips query and fragment before the pipeline
        ],
    )
    def test_bypass_attempts_reach_the_rule(self, path: str) -> None:
        path = path.partition("?")[0]
        assert verdict(self.policy, PLAIN, path) == Verdict(
            False, Reason.FORBIDDEN, "admin-area", None, normalize_path(path)
        )
        assert verdict(self.policy, ADMIN, path).allowed

    @pytest.mark.parametrize("path", ["/admin%2fx", "/admin;x", "/admin%5Cx", "/admin\\x"])
    def test_ambiguous_paths_are_denied_for_everyone(self, path: str) -> None:
        for client in (ADMIN, PLAIN):
            assert verdict(self.policy, client, path) == Verdict(False, Reason.AMBIGUOUS_PATH)

    def test_prefixes_match_whole_segments(self) -> None:
        assert verdict(self.policy, PLAIN, "/administrator") == Verdict(
            True, Reason.ALLOWED, None, None, "/administrator"
        )

    def test_a_case_sensitive_rule_does_not_match_other_cases(self) -> None:
        """Paths are case-sensitive unless the rule says otherwise."""
        assert verdict(self.policy, PLAIN, "/ADMIN").allowed
        assert verdict(self.policy, PLAIN, "/Admin").rule is None

    def test_a_case_insensitive_rule_matches_every_case(self) -> None:
        ci = Client("ci-bot", "CI")
        for path in ("/Reports", "/reports", "/REPORTS", "/%52eports"):
            assert verdict(self.policy, PLAIN, path).rule == "reports-ci", path
            assert not verdict(self.policy, PLAIN, path).allowed
            assert verdict(self.policy, ci, path).allowed

    @pytest.mark.parametrize(
        ("glob", "matches", "misses"),
        [
            ("/a/**", ["/a", "/a/b", "/a/b/c"], ["/ab", "/b/a"]),
            ("/a/**/z", ["/a/z", "/a/b/z", "/a/b/c/z"], ["/a/b", "/az"]),
            ("/a/*/z", ["/a/b/z", "/a/bcd/z"], ["/a/z", "/a/b/c/z"]),
            ("/v*/items", ["/v1/items", "/v/items"], ["/x/v1/items", "/v1/x/items"]),
            ("/**", ["/", "/a", "/a/b"], []),
        ],
    )
    def test_glob_stars(self, glob: str, matches: list[str], misses: list[str]) -> None:
        policy = parse(
            f"default: allow\nrules: [{{id: g, paths: [{{glob: '{glob}'}}], allow: none}}]", "p"
        )
        for path in matches:
            assert verdict(policy, ADMIN, path).rule == "g", path
        for path in misses:
            assert verdict(policy, ADMIN, path).rule is None, path

    def test_hosts_methods_and_globs_all_have_to_match(self) -> None:
        path = "/accounts/42/invoices/2026/11"
        assert not verdict(self.policy, PLAIN, path, method="POST").allowed
        assert verdict(self.policy, BILLING, path, method="POST").rule == "invoices"
        assert verdict(self.policy, ADMIN, path, method="DELETE").allowed  # by client id
        assert verdict(self.policy, PLAIN, path, method="GET").rule is None  # method differs
        assert verdict(self.policy, PLAIN, path, method="POST", host="other.example").allowed
        for host in ("API.example.com:8443", "eu.billing.example.com", "api.example.com."):
            assert verdict(self.policy, PLAIN, path, method="POST", host=host).rule == "invoices"
        assert verdict(self.policy, PLAIN, "/accounts/42/x/invoices", method="POST").allowed

    def test_the_first_matching_rule_decides(self) -> None:
        policy = parse(
            """
            default: deny
            rules:
              - {id: open, paths: [{prefix: /admin/health}], allow: any}
              - {id: closed, paths: [{prefix: /admin}], allow: none}
            """,
            "p",
        )
        assert verdict(policy, PLAIN, "/admin/health").rule == "open"
        assert verdict(policy, ADMIN, "/admin").rule == "closed"
        assert not verdict(policy, ADMIN, "/admin").allowed

    def test_the_default_decides_what_no_rule_matches(self) -> None:
        deny = parse("default: deny\nrules: [{id: a, paths: [{exact: /a}], allow: any}]", "p")
        assert verdict(deny, ADMIN, "/b") == Verdict(False, Reason.FORBIDDEN, "default", None, "/b")
        assert verdict(parse("default: deny", "p"), ADMIN, "/a") == Verdict(
            False, Reason.FORBIDDEN, "default"
        )
        assert verdict(parse("default: allow", "p"), PLAIN, "/a").allowed

    def test_without_rules_paths_are_not_even_normalised(self) -> None:
        """No policy file: nothing to compare, so an odd path is the upstream's business."""
        assert Policy().evaluate(request("/a%2fb"), PLAIN) == Verdict(True)


class TestDryRun:
    def test_a_dry_run_rule_records_its_denial_and_steps_aside(self) -> None:
        policy = parse(
            """
            default: allow
            rules:
              - {id: new-admin, paths: [{prefix: /admin}], allow: {roles: [admin]}, dry_run: true}
              - {id: old-admin, paths: [{prefix: /admin}], allow: {roles: [admin, support]}}
            """,
            "p",
        )
        support = Client("s-1", "Support", ("support",))
        assert verdict(policy, support, "/admin") == Verdict(
            True, Reason.ALLOWED, "old-admin", "new-admin", "/admin"
        )
        assert verdict(policy, PLAIN, "/admin") == Verdict(
            False, Reason.FORBIDDEN, "old-admin", "new-admin", "/admin"
        )
        assert verdict(policy, ADMIN, "/admin").dry_run_rule is None

    def test_a_dry_run_policy_allows_what_it_would_deny(self) -> None:
        policy = parse(
            "default: deny\ndry_run: true\n"
            "rules: [{id: admin, paths: [{prefix: /admin}], allow: {roles: [admin]}}]",
            "p",
        )
        assert verdict(policy, PLAIN, "/admin") == Verdict(
            True, Reason.ALLOWED, "admin", "admin", "/admin"
        )
        assert verdict(policy, PLAIN, "/other") == Verdict(
            True, Reason.ALLOWED, None, "default", "/other"
        )
        assert verdict(policy, ADMIN, "/admin") == Verdict(
            True, Reason.ALLOWED, "admin", None, "/admin"
        )


class TestRouteRequirements:
    """Envoy's per-route context_extensions: both they and the file must allow."""

    def route(self, **extensions: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(extensions.items()))

    def test_required_roles_need_any_one_of_them(self) -> None:
        route = self.route(required_roles="billing, admin")
        assert Policy().evaluate(request("/x", route=route), BILLING).allowed
        assert Policy().evaluate(request("/x", route=route), ADMIN).allowed
        assert Policy().evaluate(request("/x", route=route), PLAIN) == Verdict(
            False, Reason.FORBIDDEN, "route"
        )

    def test_allowed_clients_and_roles_either_grant(self) -> None:
        route = self.route(required_roles="admin", allowed_clients="app-1", rule_id="reports")
        assert Policy().evaluate(request("/x", route=route), PLAIN).allowed
        assert Policy().evaluate(request("/x", route=route), BILLING) == Verdict(
            False, Reason.FORBIDDEN, "reports"
        )

    def test_the_file_and_the_route_must_both_allow(self) -> None:
        policy = parse(POLICY, "p")
        route = self.route(required_roles="billing")
        assert not policy.evaluate(request("/admin", route=route), BILLING).allowed
        denied = policy.evaluate(request("/admin", route=route), ADMIN)
        assert (denied.allowed, denied.rule) == (False, "route")
        assert policy.evaluate(request("/other", route=route), BILLING).allowed

    def test_a_dry_run_route_records_instead_of_denying(self) -> None:
        route = self.route(required_roles="admin", dry_run="true")
        assert Policy().evaluate(request("/x", route=route), PLAIN) == Verdict(
            True, Reason.ALLOWED, None, "route"
        )

    @pytest.mark.parametrize(
        "extensions",
        [
            {"required_role": "admin"},  # a typo must not open the route
            {"required_roles": ""},
            {"required_roles": " , "},
            {"rule_id": "x"},
            {"required_roles": "admin", "dry_run": "yes"},
            {"required_roles": "admin", "rule_id": "bad id"},
        ],
    )
    def test_requirements_that_cannot_be_understood_close_the_route(
        self, extensions: dict[str, str], caplog: pytest.LogCaptureFixture
    ) -> None:
        route = self.route(**extensions)
        with caplog.at_level(logging.ERROR):
            assert Policy().evaluate(request("/x", route=route), ADMIN) == Verdict(
                False, Reason.INVALID_ROUTE_POLICY, "route"
            )


class TestPolicyFile:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("rules: []", "policy.yaml: default: required, 'allow' or 'deny'"),
            ("default: maybe", "default: required"),
            ("default: allow\nextra: 1", "unknown top-level field 'extra'"),
            ("default: allow\nversion: 2", "version: only version 1"),
            ("- a", "expected a mapping"),
            ("default: allow\nrules: [{allow: any}]", "rules[0].id: required"),
            (
                "default: allow\nrules: [{id: a, allow: any}, {id: a, allow: any}]",
                "rules[1].id: 'a' is used twice",
            ),
            ("default: allow\nrules: [{id: a}]", "rules[0] (a).allow: required"),
            ("default: allow\nrules: [{id: a, allow: {roles: []}}]", "(a).allow.roles"),
            ("default: allow\nrules: [{id: a, allow: all}]", "(a).allow: required"),
            (
                "default: allow\nrules: [{id: a, allow: {role: [admin]}}]",
                "(a).allow.role: unknown field; did you mean 'roles'? expected 'roles' and/or",
            ),
            (
                "default: allow\nrules: [{id: a, allow: {roles: [a], colour: red}}]",
                "(a).allow.colour: unknown field; expected 'roles' and/or 'clients'",
            ),
            ("default: allow\nrules: [{id: a, allow: any, colour: red}]", "(a).colour: unknown"),
            (
                "default: allow\nrules: [{id: a, allow: any, methods: [FETCH]}]",
                "(a).methods: 'FETCH' is not an HTTP method",
            ),
            (
                "default: allow\nrules: [{id: a, allow: any, hosts: ['a b']}]",
                "(a).hosts: 'a b' is not a host name",
            ),
            (
                "default: allow\nrules: [{id: a, allow: any, paths: [{regex: /x}]}]",
                "(a).paths[0]: expected one of exact, prefix or glob",
            ),
            (
                "default: allow\nrules: [{id: a, allow: any, paths: [{prefix: /a/../b}]}]",
                "(a).paths[0].prefix: '/a/../b' is not in normal form; write '/b'",
            ),
            (
                "default: allow\nrules: [{id: a, allow: any, paths: [{exact: /a%2Fb}]}]",
                "(a).paths[0].exact: '/a%2Fb' is ambiguous",
            ),
            ("default: allow\nrules: [{id: a, allow: any, dry_run: 1}]", "(a).dry_run: expected"),
            ("default: allow\npath_parameters: keep", "path_parameters: 'reject' or 'strip'"),
        ],
    )
    def test_invalid_files_are_refused_naming_the_rule_and_field(
        self, text: str, message: str
    ) -> None:
        with pytest.raises(PolicyError) as raised:
            parse(text, "policy.yaml")
        assert message in str(raised.value)

    async def test_a_changed_file_is_picked_up_and_a_broken_one_ignored(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / "policy.yaml"
        path.write_text("default: allow")
        policy_file = PolicyFile(path, reload_interval=0.02)
        await policy_file.start()
        try:
            path.write_text("default: deny")
            await wait_for(lambda: not policy_file.current().default_allow)
            with caplog.at_level(logging.ERROR):
                path.write_text("default: [")
                await wait_for(lambda: "keeping the last good version" in caplog.text)
            assert not policy_file.current().default_allow
        finally:
            await policy_file.close()

    async def test_a_missing_file_is_a_start_up_error(self, tmp_path: Path) -> None:
        with pytest.raises(PolicyError, match="AUTHZ_POLICY_FILE"):
            await PolicyFile(tmp_path / "none.yaml", 1).start()


# --- property: another spelling of the same resource never changes the verdict -----------

_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzAZ09-._~", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
_PROTECTED = parse(
    """
    default: allow
    rules:
      - {id: admin, paths: [{prefix: /admin}], allow: {roles: [admin]}}
      - {id: deep, paths: [{glob: "/api/*/secret/**"}], allow: {roles: [admin]}}
    """,
    "p",
)


def _respell(path: str, data: st.DataObject) -> str:
    """The same resource, written differently: escapes, dot-segments, duplicate slashes."""
    out = []
    for segment in path.strip("/").split("/"):
        chars = [
            f"%{ord(c):02{data.draw(st.sampled_from('xX'))}}" if data.draw(st.booleans()) else c
            for c in segment
        ]
        prefix = data.draw(st.sampled_from(["", "./", "x/../", "/", "x/y/../../"]))
        out.append(prefix + "".join(chars))
    return "/" + "/".join(out) + data.draw(st.sampled_from(["", "/", "/.", "//"]))


@given(
    st.lists(_SEGMENT, max_size=4).map(lambda tail: "/".join(["admin", *tail])),
    st.data(),
)
def test_a_denied_resource_stays_denied_however_its_path_is_spelled(
    path: str, data: st.DataObject
) -> None:
    original = verdict(_PROTECTED, PLAIN, "/" + path)
    assert not original.allowed
    respelled = verdict(_PROTECTED, PLAIN, _respell(path, data))
    assert not respelled.allowed


@given(
    st.tuples(_SEGMENT, st.lists(_SEGMENT, max_size=3)).map(
        lambda p: "/".join(["api", p[0], "secret", *p[1]])
    ),
    st.data(),
)
def test_globs_hold_however_the_path_is_spelled(path: str, data: st.DataObject) -> None:
    assert not verdict(_PROTECTED, PLAIN, _respell(path, data)).allowed


_SAMPLE = parse(
    (Path(__file__).parents[2] / "examples" / "policy.yaml").read_text(), "examples/policy.yaml"
)
# The same rules with the first-segment index out of play: every rule is tried in order.
_UNINDEXED = dataclasses.replace(
    _SAMPLE, rules=tuple(dataclasses.replace(r, first_segments=None) for r in _SAMPLE.rules)
)
_SEGMENTS = ["admin", "Admin", "status", "accounts", "7", "invoices", "REPORTS", "internal", "v1"]


@given(
    st.lists(st.sampled_from(_SEGMENTS), max_size=5),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(["api.example.com", "eu.billing.example.com", "other.example"]),
    st.sampled_from([PLAIN, ADMIN, BILLING]),
)
def test_the_segment_index_decides_as_trying_every_rule_would(
    segments: list[str], method: str, host: str, client: Client
) -> None:
    """Skipping the rules a path's first segment rules out never changes a verdict."""
    path = "/" + "/".join(segments)
    assert verdict(_SAMPLE, client, path, method=method, host=host) == verdict(
        _UNINDEXED, client, path, method=method, host=host
    )


def test_a_rule_about_get_is_about_head_too() -> None:
    """HEAD runs the GET handler on most servers, so a GET-only deny must not let HEAD pass."""
    policy = parse(
        "default: allow\n"
        "rules: [{id: read, methods: [GET], paths: [{prefix: /admin}], allow: {roles: [admin]}}]",
        "p",
    )
    client = Client("c", "C", ("reader",))
    for method in ("GET", "HEAD"):
        request = Request(is_http=True, method=method, path="/admin/x")
        assert policy.evaluate(request, client).rule == "read"
        assert not policy.evaluate(request, client).allowed
    assert policy.evaluate(Request(is_http=True, method="POST", path="/admin"), client).allowed


def test_a_dry_run_rule_that_admits_a_client_does_not_decide() -> None:
    """A rule being rolled out is evaluated as if absent either way: the rules after it
    decide, so it cannot open what they close."""
    policy = parse(
        "default: allow\n"
        "rules:\n"
        "  - {id: new-reporting, paths: [{prefix: /reports}], allow: {roles: [reporting]},"
        " dry_run: true}\n"
        "  - {id: closed, paths: [{prefix: /reports}], allow: none}\n",
        "p",
    )
    verdict = policy.evaluate(
        Request(is_http=True, method="GET", path="/reports/q1"), Client("c", "C", ("reporting",))
    )
    assert (verdict.allowed, verdict.rule, verdict.dry_run_rule) == (False, "closed", None)
