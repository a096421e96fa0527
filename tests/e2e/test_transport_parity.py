"""Both transports answer alike: one behaviour table, every row sent through two real Envoys
side by side, envoy/front-proxy.yaml to the service's gRPC port and envoy/front-proxy-http.yaml to
its HTTP check port, in front of the same authz-service and the same upstream.

For each row, both sides give the row's expected outcome, and the same status, answer headers,
body, upstream view (every header the upstream received) and decision log line. The one
documented differences, both Envoy's: it takes any 5xx answer of an HTTP check server for a failed
check, so the HTTP side of a 503 deny is Envoy's status_on_error (503, an empty body, none of our
headers), while the decision log says the same for both; and a deny of a HEAD request loses its
content-type in HTTP mode.
"""

from __future__ import annotations

import json
import pprint
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service import apikeys
from tests.e2e import harness

pytestmark = pytest.mark.e2e

EXAMPLE_POLICY = harness.ROOT / "examples" / "policy.yaml"
# The answer headers a deny may bring the client (the samples let these through, and more).
ANSWER_HEADERS = (
    "www-authenticate",
    "retry-after",
    "x-ext-authz-reason",
    "x-ext-authz-rule",
    "content-type",
    "cache-control",
)
# What a decision log line says about the decision (not its timing, nor the request's own ids).
DECISION_FIELDS = (
    "decision",
    "reason",
    "client_id",
    "method",
    "host",
    "path",
    "key_id",
    "resolution",
    "rule",
    "dry_run_rule",
)


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    roles: tuple[str, ...] = ()

    def identity(self) -> list[tuple[str, str]]:
        """The identity headers the upstream must receive, and no other x-client-* header."""
        headers = [("x-client-id", self.client_id), ("x-client-name", self.name)]
        return headers + ([("x-client-roles", ",".join(self.roles))] if self.roles else [])


OPS = Client("ops", "Ops Team", ("admin",))
BILLER = Client("biller", "Billing Team", ("billing",))
PLAIN = Client("plain", "Plain Client")
METER = Client("meter", "Metered Client", ("reader",))  # the access-log test's alone
KEYS = {client: apikeys.generate() for client in (OPS, BILLER, PLAIN, METER)}
DISABLED, EXPIRED, UNKNOWN = apikeys.generate(), apikeys.generate(), apikeys.generate()
BAD_CHECKSUM = UNKNOWN[:-1] + ("A" if UNKNOWN[-1] != "A" else "B")

Headers = tuple[tuple[str, str], ...]


def key(client: Client, *more: tuple[str, str]) -> Headers:
    """The client's key, and whatever else the client sends."""
    return (("Authorization", f"ApiKey {KEYS[client]}"), *more)


def apikey(value: str) -> Headers:
    return (("Authorization", value),)


@dataclass(frozen=True)
class Row:
    """One request, and what both transports must make of it."""

    what: str  # the behaviour, in one line
    headers: Headers
    path: str = "/orders"
    method: str = "GET"
    host: str = "api.example.com"
    status: int = 200
    client: Client | None = None  # the identity the upstream is given (a checked allow)
    reason: str | None = None  # our reason for a deny
    rule: str | None = None  # the rule that decided, as the log (and a deny) names it
    dry_run_rule: str | None = None
    checked: bool = True  # False: Envoy answers or routes the request without asking us
    stack: str = "main"  # the fixture to send it through: main, or registry_down


def forbidden(client: Client, path: str, what: str, rule: str, method: str = "GET") -> Row:
    return Row(what, key(client), path, method, status=403, reason="forbidden", rule=rule)


def admin_area(path: str, what: str) -> Row:
    """A spelling of /admin that a client without the admin role must not get through."""
    return forbidden(PLAIN, path, what, "admin-area")


def ambiguous(path: str, what: str) -> Row:
    """A path we refuse as ambiguous (400), even for an admin."""
    return Row(what, key(OPS), path, status=400, reason="ambiguous_path")


def refused_by_envoy(what: str, path: str = "/orders", headers: Headers | None = None) -> Row:
    """Envoy answers 400 itself, before any check (to an admin's request, by default)."""
    return Row(what, key(OPS) if headers is None else headers, path, status=400, checked=False)


def unauthorized(what: str, reason: str, headers: Headers, stack: str = "main") -> Row:
    return Row(what, headers, status=401, reason=reason, stack=stack)


def invoice(sender: Client, what: str, host: str = "api.example.com", **outcome: Any) -> Row:
    return Row(what, key(sender), "/accounts/7/invoices/1", "POST", host, **outcome)


ROWS = [
    # --- a valid key --------------------------------------------------------------------------
    Row("a valid key reaches the upstream as its client, without the key", key(OPS), client=OPS),
    Row(
        "the scheme is case-insensitive, and spaces around the key are tolerated",
        apikey(f"apikey   {KEYS[BILLER]}  "),
        client=BILLER,
    ),
    Row("a client without roles is sent without x-client-roles", key(PLAIN), client=PLAIN),
    Row("the query string reaches the upstream", key(OPS), "/orders?page=2&q=%2F", client=OPS),
    # --- spoofed identity ---------------------------------------------------------------------
    Row(
        "identity headers sent in three casings are replaced by ours",
        key(OPS, ("x-client-id", "evil"), ("X-Client-Name", "Evil"), ("X-CLIENT-ROLES", "root")),
        client=OPS,
    ),
    Row(
        "duplicated identity headers are all replaced by ours",
        key(OPS, ("x-client-id", "evil"), ("X-Client-Id", "evil-2"), ("x-client-id", "evil-3")),
        client=OPS,
    ),
    Row(
        "a client without roles cannot claim any",
        key(PLAIN, ("x-client-roles", "admin"), ("X-Client-Roles", "billing")),
        client=PLAIN,
    ),
    Row(
        "our answer and route header names, sent by a client, change nothing",
        key(
            PLAIN,
            ("x-authz-client-id", "ops"),
            ("x-authz-route-required-roles", "nobody"),
            ("x-envoy-auth-headers-to-remove", "x-forwarded-proto"),
        ),
        client=PLAIN,
    ),
    refused_by_envoy("x_client_id is refused", headers=key(OPS, ("x_client_id", "evil"))),
    refused_by_envoy("X_Client_Roles is refused", headers=key(PLAIN, ("X_Client_Roles", "admin"))),
    refused_by_envoy("X_CLIENT_NAME is refused", headers=key(OPS, ("X_CLIENT_NAME", "Evil"))),
    refused_by_envoy("x-client_id is refused", headers=key(OPS, ("x-client_id", "evil"))),
    refused_by_envoy(
        "both spellings at once are refused",
        headers=key(OPS, ("x-client-id", "evil"), ("x_client_id", "evil-2")),
    ),
    Row(
        "a request our identity headers would take over Envoy's 100 headers: Envoy's 500",
        key(OPS, *((f"x-pad-{n}", "1") for n in range(94))),
        status=500,
    ),
    Row(
        "a route that skips the check passes no identity, whatever the client sent",
        (("x-client-id", "evil"), ("X-Client-Roles", "admin")),
        "/healthz",
        checked=False,
    ),
    # --- credentials --------------------------------------------------------------------------
    unauthorized("no Authorization header", "missing_credential", ()),
    Row(
        "no key on a HEAD request: 401, without a body",
        (),
        method="HEAD",
        status=401,
        reason="missing_credential",
    ),
    unauthorized("an empty Authorization header", "missing_credential", apikey("")),
    unauthorized("another scheme (Bearer)", "unsupported_scheme", apikey("Bearer abc")),
    unauthorized("another scheme (Basic)", "unsupported_scheme", apikey("Basic dXNlcjpwdw==")),
    unauthorized("the scheme without a key", "malformed_credential", apikey("ApiKey")),
    unauthorized("the scheme and spaces, no key", "malformed_credential", apikey("ApiKey    ")),
    unauthorized(
        "two Authorization headers",
        "multiple_credentials",
        (*key(OPS), ("authorization", f"ApiKey {KEYS[PLAIN]}")),
    ),
    unauthorized(
        "two keys comma-merged in one header",
        "multiple_credentials",
        apikey(f"ApiKey {KEYS[OPS]}, ApiKey {KEYS[PLAIN]}"),
    ),
    unauthorized(
        "two keys in one value, space-separated",
        "malformed_credential",
        apikey(f"ApiKey {KEYS[OPS]} {KEYS[PLAIN]}"),
    ),
    unauthorized("an illegal character in the key", "malformed_credential", apikey('ApiKey a"b')),
    unauthorized("a byte that is not UTF-8", "malformed_credential", apikey("ApiKey azk_\xe9x")),
    unauthorized("a key that is too long", "malformed_credential", apikey("ApiKey " + "a" * 129)),
    unauthorized("a wrong checksum", "malformed_credential", apikey(f"ApiKey {BAD_CHECKSUM}")),
    unauthorized("a key nobody registered", "unknown_key", apikey(f"ApiKey {UNKNOWN}")),
    unauthorized("a disabled key", "key_disabled", apikey(f"ApiKey {DISABLED}")),
    unauthorized("an expired key", "key_expired", apikey(f"ApiKey {EXPIRED}")),
    # --- RBAC with examples/policy.yaml -------------------------------------------------------
    Row("an admin gets into /admin", key(OPS), "/admin/users", client=OPS, rule="admin-area"),
    admin_area("/admin/users", "a client without the role does not (403, naming the rule)"),
    Row(
        "anyone identified may read /admin/status",
        key(PLAIN),
        "/admin/status",
        client=PLAIN,
        rule="admin-status",
    ),
    forbidden(PLAIN, "/admin/status", "but not write it", "admin-area", method="POST"),
    forbidden(OPS, "/internal/debug", "a rule that allows nobody stops an admin", "internal"),
    invoice(
        BILLER,
        "billing may write invoices on the billing host",
        client=BILLER,
        rule="invoice-writes",
    ),
    invoice(PLAIN, "others may not", status=403, reason="forbidden", rule="invoice-writes"),
    invoice(
        PLAIN,
        "a billing subdomain is a billing host",
        "eu.billing.example.com",
        status=403,
        reason="forbidden",
        rule="invoice-writes",
    ),
    invoice(
        PLAIN,
        "host case and port are ignored",
        "API.Example.COM:8443",
        status=403,
        reason="forbidden",
        rule="invoice-writes",
    ),
    invoice(PLAIN, "another host falls to the default (allow)", "other.example.com", client=PLAIN),
    # --- path bypass spellings ----------------------------------------------------------------
    admin_area("/%61dmin/users", "an escaped unreserved character"),
    admin_area("/%61%64%6d%69%6e", "a path escaped throughout"),
    admin_area("/admin/../admin/users", "a dot-dot segment back into /admin"),
    admin_area("/x/../admin", "a dot-dot segment into /admin"),
    admin_area("/./admin/./users", "dot segments"),
    admin_area("//admin//users", "duplicate slashes"),
    admin_area("/admin/", "a trailing slash"),
    admin_area("/admin?as=admin", "a query string"),
    admin_area("/admin\\users", "a backslash, which Envoy turns into a slash"),
    ambiguous("/admin;x", "a path parameter"),
    ambiguous("/admin;role=admin/users", "a path parameter inside the path"),
    Row(
        "/ADMIN is another path, as the rule is case-sensitive", key(PLAIN), "/ADMIN", client=PLAIN
    ),
    Row("so is /Admin/users", key(PLAIN), "/Admin/users", client=PLAIN),
    # --- ambiguous paths ----------------------------------------------------------------------
    refused_by_envoy("an escaped slash", "/admin%2fusers"),
    refused_by_envoy("an escaped slash, upper-case", "/admin%2Fusers"),
    refused_by_envoy("an escaped backslash", "/admin%5cusers"),
    refused_by_envoy("an escaped NUL", "/admin%00"),
    refused_by_envoy("a fragment", "/admin#x"),
    ambiguous("/admin%zz", "a malformed escape"),
    ambiguous("/admin%2", "a truncated escape"),
    # --- dry-run ------------------------------------------------------------------------------
    Row(
        "a dry-run rule that would deny lets the request through, and the log says so",
        key(PLAIN),
        "/reports/2026",
        client=PLAIN,
        dry_run_rule="reports-readers",
    ),
    Row(
        "a case-insensitive dry-run rule matches any case",
        key(PLAIN),
        "/REPORTS/2026",
        client=PLAIN,
        dry_run_rule="reports-readers",
    ),
    Row(
        "a dry-run rule that admits the client does not decide: the rules after it do",
        key(OPS),
        "/reports/x",
        client=OPS,
    ),
    # --- route requirements (context_extensions / x-authz-route-* headers) --------------------
    forbidden(PLAIN, "/billing/invoices", "the route requires billing or admin", "billing-route"),
    Row("a client with billing gets in", key(BILLER), "/billing/invoices", client=BILLER),
    Row("so does an admin", key(OPS), "/billing/invoices", client=OPS),
    forbidden(
        PLAIN,
        "/billing",
        "the route applies to its prefix itself",
        "billing-route",
    ),
    Row(
        "a client's own route headers relax nothing",
        key(
            PLAIN,
            ("x-authz-route-required-roles", "plain"),
            ("x-authz-route-rule-id", "mine"),
            ("x-authz-route-allowed-clients", "plain"),
        ),
        "/billing/invoices",
        status=403,
        reason="forbidden",
        rule="billing-route",
    ),
    Row("the key is checked first", (), "/billing/x", status=401, reason="missing_credential"),
    # --- registry down (a registry="http" service whose registry is stopped) -----------------
    Row(
        "a key that needs the registry gets 503, and never reaches the upstream",
        apikey(f"ApiKey {UNKNOWN}"),
        status=503,
        reason="registry_unavailable",
        stack="registry_down",
    ),
    unauthorized(
        "a malformed key is still refused offline",
        "malformed_credential",
        apikey(f"ApiKey {BAD_CHECKSUM}"),
        stack="registry_down",
    ),
    unauthorized("no key is still 401", "missing_credential", (), stack="registry_down"),
]


@dataclass(frozen=True)
class Stack:
    """One authz-service, one upstream, and an Envoy per transport in front of them."""

    service: harness.Service
    upstream: harness.Upstream
    grpc: harness.Envoy
    http: harness.Envoy


@contextmanager
def running_stack(workdir: Path, keys_file: Path | None = None, **settings: str) -> Iterator[Stack]:
    with (
        harness.authz_service(workdir, keys_file, 0, 0, env=None, **settings) as service,
        harness.echo_upstream() as upstream,
    ):
        grpc_config = harness.render_front_proxy(0, 0, service, upstream.port)
        http_config = harness.render_front_proxy_http(0, 0, service, upstream.port)
        with (
            harness.envoy(workdir, grpc_config) as grpc,
            harness.envoy(workdir, http_config) as http,
        ):
            yield Stack(service, upstream, grpc, http)


def entry(key: str, client_id: str, name: str, **fields: Any) -> dict[str, Any]:
    """One keys-file entry: the key's hash, its client, and optional fields."""
    return {"sha256": apikeys.hash_key(key), "client_id": client_id, "client_name": name, **fields}


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The keys above in a keys file, and the sample policy."""
    workdir = tmp_path_factory.mktemp("parity")
    entries = [entry(k, c.client_id, c.name, roles=list(c.roles)) for c, k in KEYS.items()]
    entries.append(entry(DISABLED, "off", "Off", enabled=False))
    entries.append(entry(EXPIRED, "old", "Old", expires_at="2001-01-01T00:00:00Z"))
    keys_file = workdir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"version": 1, "keys": entries}))
    policy = workdir / "policy.yaml"
    shutil.copy(EXAMPLE_POLICY, policy)
    with running_stack(workdir, keys_file, policy_file=str(policy)) as stack:
        yield stack


@pytest.fixture(scope="module")
def registry_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """registry=http, pointed at a client registry that has been stopped."""
    workdir = tmp_path_factory.mktemp("registry-down")
    with harness.registry_process(workdir) as registry:
        url, token = registry.url, registry.service_token()
    with running_stack(workdir, registry="http", registry_url=url, registry_token=token) as stack:
        yield stack


@dataclass
class Seen:
    """What one side made of a row: the answer, the upstream's view, and our decision."""

    status: int
    answer_headers: dict[str, str | None]
    body: Any  # a deny's bytes, or the upstream's echo without the request's own id
    upstream: list[tuple[str, str]] | None  # every header it received but x-request-id
    decision: dict[str, Any] | None = None


def through(stack: Stack, envoy: harness.Envoy, row: Row) -> Seen:
    """The row through one Envoy (the decision is read later, for both sides at once)."""
    reached = len(stack.upstream.seen)
    reply = harness.send(envoy.port, row.path, [("host", row.host), *row.headers], row.method)
    answer_headers = {name: reply.header(name) for name in ANSWER_HEADERS}
    if len(stack.upstream.seen) == reached:
        return Seen(reply.status, answer_headers, reply.body, None)
    (headers,) = stack.upstream.seen[reached:]
    echo = reply.json()
    echo["headers"].pop("x-request-id")
    upstream = sorted(
        ((name.lower(), value) for name, value in headers if name.lower() != "x-request-id"),
        key=lambda header: header[0],
    )
    return Seen(reply.status, answer_headers, echo, upstream)


def both(stack: Stack, row: Row) -> tuple[Seen, Seen]:
    """The row through each Envoy, with the decision each check logged (in the order of the
    requests, as they go one after the other)."""
    logged = len(stack.service.decisions())
    grpc, http = through(stack, stack.grpc, row), through(stack, stack.http, row)
    lines = stack.service.decisions()[logged:]
    assert len(lines) == (2 if row.checked else 0), pprint.pformat(lines)
    if lines:
        grpc.decision, http.decision = ({f: line[f] for f in DECISION_FIELDS} for line in lines)
    return grpc, http


def expect(row: Row, seen: Seen) -> None:
    """The row's own outcome, on one side."""
    assert seen.status == row.status
    if row.checked:
        assert seen.decision is not None
        assert seen.decision["reason"] == (row.reason or "allowed")
        assert seen.decision["rule"] == row.rule
        assert seen.decision["dry_run_rule"] == row.dry_run_rule
    if row.status == 200:
        assert seen.upstream is not None, "the upstream was not reached"
        names = {name for name, _ in seen.upstream}
        assert "authorization" not in names
        identity = [(n, v) for n, v in seen.upstream if n.startswith("x-client-")]
        assert identity == sorted(row.client.identity() if row.client else [])
    else:
        assert seen.upstream is None, "the upstream was reached"
    if row.reason is not None and row.status < 500:
        assert seen.answer_headers["x-ext-authz-reason"] == row.reason
        assert seen.answer_headers["x-ext-authz-rule"] == row.rule
        if row.method == "HEAD":
            assert seen.body == b""
        else:
            assert json.loads(seen.body)["reason"] == row.reason


@pytest.mark.parametrize(
    "row",
    [pytest.param(row, id=row.what) for row in ROWS],
)
def test_both_transports_answer_alike(request: pytest.FixtureRequest, row: Row) -> None:
    stack: Stack = request.getfixturevalue(row.stack)
    grpc, http = both(stack, row)
    sides = f"{row.what}\ngRPC: {pprint.pformat(grpc)}\nHTTP: {pprint.pformat(http)}"
    expect(row, grpc)
    if row.reason is not None and row.status >= 500:
        # Envoy takes a 5xx from an HTTP check server for a failed check: its status_on_error
        # (503) reaches the client, with an empty body and none of our headers.
        assert grpc.answer_headers["x-ext-authz-reason"] == row.reason, sides
        assert grpc.answer_headers["retry-after"] == "1", sides
        grpc = replace(grpc, answer_headers=dict.fromkeys(ANSWER_HEADERS), body=b"")
    if row.method == "HEAD" and row.reason is not None:
        # The answer to a HEAD check has no body, and Envoy drops the content-type of a deny
        # whose body is empty (a HEAD reply has no body either way).
        grpc = replace(grpc, answer_headers={**grpc.answer_headers, "content-type": None})
    assert grpc == http, sides


# --- access-log attribution -----------------------------------------------------------------


def upstream_counts(service: harness.Service, client: Client) -> dict[str, float]:
    """The client's authz_upstream_* samples in /metrics, by their labels."""
    counts = {}
    label = f'client_id="{client.client_id}"'
    for line in harness.send(service.http_port, "/metrics").body.decode().splitlines():
        if line.startswith("authz_upstream_") and label in line:
            sample, _, value = line.rpartition(" ")
            counts[sample] = float(value)
    return counts


def test_access_logs_attribute_traffic_alike_through_either_envoy(main: Stack) -> None:
    """The same traffic through each Envoy raises the client's per-client counts by the same
    amounts: in gRPC mode our Check's dynamic metadata names the client, in HTTP mode the
    x-authz-client-id answer header that Envoy turns into it. A request that merely claims to
    be the client is not counted as the client's."""
    grpc, http = (counted_traffic(main, envoy) for envoy in (main.grpc, main.http))
    assert grpc == http, f"gRPC: {pprint.pformat(grpc)}\nHTTP: {pprint.pformat(http)}"
    responses = 'authz_upstream_responses_total{client_id="meter",status_class='
    assert {sample: count for sample, count in grpc.items() if sample.startswith(responses)} == {
        responses + '"2xx"}': 3,
        responses + '"5xx"}': 2,
    }
    assert grpc['authz_upstream_response_bytes_total{client_id="meter"}'] == 3 * 100 + 2 * 50


def counted_traffic(stack: Stack, envoy: harness.Envoy) -> dict[str, float]:
    """What one batch of traffic through ``envoy`` adds to the meter client's counts."""
    before = upstream_counts(stack.service, METER)
    claimed = [*apikey(f"ApiKey {UNKNOWN}"), ("x-authz-client-id", METER.client_id)]
    assert harness.send(envoy.port, "/status/200/100", claimed).status == 401
    for _ in range(3):
        assert harness.send(envoy.port, "/status/200/100", key(METER)).status == 200
    for _ in range(2):
        assert harness.send(envoy.port, "/status/503/50", key(METER)).status == 503

    def added() -> dict[str, float]:
        after = upstream_counts(stack.service, METER)
        return {s: v - before.get(s, 0.0) for s, v in after.items() if v != before.get(s, 0.0)}

    def answers(counts: dict[str, float]) -> float:
        return sum(v for s, v in counts.items() if s.startswith("authz_upstream_responses_total"))

    # One Envoy worker streams its entries in order: once the last five are counted, the
    # claimed request before them has been counted too, wherever it went.
    harness.wait_until(lambda: answers(added()) >= 5, 10, "the access logs")
    return added()


# --- request ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transport",
    [
        "grpc",
        "http",
    ],
)
def test_the_decision_log_names_the_request_id_the_upstream_saw(
    main: Stack, transport: str
) -> None:
    """Whether the client sent the id or Envoy made one, so that a decision can be found from
    the upstream's (or Envoy's access log's) x-request-id."""
    envoy = main.grpc if transport == "grpc" else main.http
    for sent in ([("x-request-id", f"parity-{transport}-1")], []):
        logged, reached = len(main.service.decisions()), len(main.upstream.seen)
        assert harness.send(envoy.port, "/orders", [*key(OPS), *sent]).status == 200
        (upstream_id,) = main.upstream.values(reached, "x-request-id")
        if sent:
            assert upstream_id == sent[0][1]
        (decision,) = main.service.decisions()[logged:]
        assert decision["request_id"] == upstream_id
