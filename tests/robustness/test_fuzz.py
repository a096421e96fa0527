"""Hypothesis against the real gRPC server: raw CheckRequest bytes, mutated real requests, and
structured CheckRequests (headers, raw header_map bytes, unicode, sizes around the limit).

Invariants, for every example: the answer is a CheckResponse (never a gRPC error) with an
explicit decision; an allow names the client of a valid key that the request carried; no key
appears in an answer. Over each test: every check was counted once and logged once, and no key
appears in the service's output. One service process serves the module, with the sample
access policy, so that fuzzed paths, hosts and methods go through its rules too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service import apikeys
from authz_service.registry.static_file import add_key
from tests.e2e import harness
from tests.robustness.conftest import CHECK, decisions, is_explicit

pytestmark = pytest.mark.e2e

POLICY = harness.ROOT / "examples" / "policy.yaml"
MAX_MESSAGE_BYTES = 1 << 20  # AUTHZ_MAX_MESSAGE_BYTES's default
EXAMPLES = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@dataclass(frozen=True)
class Keys:
    valid: dict[str, str]  # key -> its client's id
    refused: tuple[str, ...]  # a disabled key, and well-formed keys nobody registered


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    valid = {
        add_key(path, "acme", "Acme Corp", ("reader", "admin")): "acme",
        add_key(path, "plain", "Plain Client"): "plain",
    }
    refused = (apikeys.generate(), apikeys.generate(), "azk_" + "A" * 38)
    return path, Keys(valid, refused)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Keys]
) -> Iterator[harness.Service]:
    with harness.authz_service(
        tmp_path_factory.mktemp("authz"), keys[0], policy_file=str(POLICY)
    ) as running:
        yield running


@dataclass
class Fuzzing:
    """One test's checks: how many were made, and the request ids they carried."""

    call: Callable[[bytes], CheckResponse]
    keys: Keys
    made: int = 0
    request_ids: tuple[str, ...] = ()

    def check(self, data: bytes, request_id: str | None = None) -> CheckResponse:
        self.made += 1
        if request_id is not None:
            self.request_ids = (*self.request_ids, request_id)
        reply = self.call(data)  # a gRPC error raises, and fails the example
        assert is_explicit(reply), reply
        answer = reply.SerializeToString()
        for key in (*self.keys.valid, *self.keys.refused):
            assert key.encode() not in answer, "a key in the answer"
        if reply.status.code == 0:
            allowed = {h.header.key: h.header.value for h in reply.ok_response.headers}
            carried = [c for k, c in self.keys.valid.items() if k.encode() in data]
            assert allowed.get("x-client-id") in carried, "an allow without a valid key"
        return reply


def checks_total(service: harness.Service) -> float:
    text = harness.send(service.http_port, "/metrics").body.decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("authz_checks_total{")
    )


@pytest.fixture
def fuzzing(service: harness.Service, keys: tuple[Path, Keys]) -> Iterator[Fuzzing]:
    """Counts and log lines before and after: each check counted and logged exactly once, and
    no key in the service's output."""
    counted, logged = checks_total(service), len(decisions(service))
    with grpc.insecure_channel(service.grpc_target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        fuzz = Fuzzing(lambda data: call(data, timeout=10), keys[1])
        yield fuzz
        fence = f"fence-{uuid.uuid4().hex}"
        fuzz.check(request(headers={"x-request-id": fence}).SerializeToString(), fence)
    assert checks_total(service) - counted == fuzz.made
    harness.wait_until(lambda: fence in service.logs(), 5, "the fence's log line")
    lines = decisions(service)[logged:]
    assert len(lines) == fuzz.made
    ids = [line["request_id"] for line in lines if line["request_id"] in fuzz.request_ids]
    assert sorted(ids) == sorted(fuzz.request_ids)
    output = service.logs()
    for key in (*fuzz.keys.valid, *fuzz.keys.refused):
        assert key not in output, "a key in the service's output"


def request(
    *,
    method: str = "GET",
    host: str = "api.example.com",
    path: str = "/orders",
    headers: dict[str, str] | None = None,
    header_map: list[HeaderValue] | None = None,
    route: dict[str, str] | None = None,
) -> CheckRequest:
    http = AttributeContext.HttpRequest(
        method=method,
        host=host,
        path=path,
        headers=headers or {},
        header_map=HeaderMap(headers=header_map or []),
    )
    return CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(http=http), context_extensions=route or {}
        )
    )


# --- strategies --------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=64)  # protobuf needs UTF-8
NAMES = st.one_of(
    st.sampled_from(["authorization", "Authorization", "AUTHORIZATION", "x-request-id", "host"]),
    TEXT,
)
LARGE = [MAX_MESSAGE_BYTES - 200, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, 2 << 20]
SIZES = st.one_of(  # about one request in eight near or over the limit
    st.just(0),
    st.just(0),
    st.just(0),
    st.integers(0, 4096),
    st.integers(0, 65536),
    st.integers(0, 256),
    st.integers(0, 1024),
    st.sampled_from(LARGE),
)


def authorizations(keys: Keys) -> st.SearchStrategy[str]:
    """Authorization values: valid keys written as the scheme allows, and near misses."""
    valid = st.sampled_from(sorted(keys.valid))
    refused = st.sampled_from(keys.refused)
    return st.one_of(
        valid.map(lambda k: f"ApiKey {k}"),
        st.tuples(
            st.sampled_from(["apikey", "APIKEY", "ApiKey"]), st.sampled_from([" ", "   "])
        ).flatmap(lambda p: valid.map(lambda k: f"{p[0]}{p[1]}{k}")),
        refused.map(lambda k: f"ApiKey {k}"),
        valid.map(lambda k: f"ApiKey {k[:-1]}"),  # one character short: a bad checksum
        valid.map(lambda k: f"ApiKey {k[:-1]}{'A' if k[-1] != 'A' else 'B'}"),
        st.tuples(valid, valid).map(lambda p: f"ApiKey {p[0]}, ApiKey {p[1]}"),
        valid.map(lambda k: f"Bearer {k}"),
        valid.map(lambda k: f"ApiKey {k}\u00e9"),
        TEXT,
    )


@st.composite
def structured(draw: st.DrawFn, keys: Keys) -> tuple[CheckRequest, bool]:
    """A CheckRequest, and whether it must be allowed (one valid key, said plainly)."""
    authorization = draw(st.one_of(st.none(), authorizations(keys)))
    headers = draw(st.dictionaries(NAMES, TEXT, max_size=6))
    raw = draw(st.booleans())
    header_map = []
    if raw:  # encode_raw_headers: entries repeated at will, values as raw bytes
        entries = draw(st.lists(st.tuples(NAMES, st.binary(max_size=64)), max_size=6))
        header_map = [HeaderValue(key=name, raw_value=value) for name, value in entries]
        if authorization is not None:
            at = draw(st.integers(0, len(header_map)))
            header_map.insert(
                at, HeaderValue(key="authorization", raw_value=authorization.encode())
            )
    elif authorization is not None:
        headers["authorization"] = authorization
    padding = draw(SIZES)
    if padding:
        headers["x-padding"] = "p" * padding
    route = draw(
        st.one_of(
            st.just({}),
            st.dictionaries(
                st.sampled_from(["required_roles", "allowed_clients", "rule_id", "dry_run", "x"]),
                TEXT,
                max_size=3,
            ),
        )
    )
    check = request(
        method=draw(st.one_of(st.sampled_from(["GET", "HEAD", "POST", "DELETE"]), TEXT)),
        host=draw(st.one_of(st.just("api.example.com"), TEXT)),
        path=draw(st.one_of(st.sampled_from(["/orders", "/admin/x", "/internal"]), TEXT)),
        headers=headers,
        header_map=header_map,
        route=route,
    )
    parts = (authorization or "").split()
    plain = (
        len(parts) == 2
        and parts[0].lower() == "apikey"
        and parts[1] in keys.valid
        and not raw
        and not route
        and padding < MAX_MESSAGE_BYTES - 4096
        and check.attributes.request.http.method in ("GET", "HEAD")
        and check.attributes.request.http.path == "/orders"
    )
    return check, plain


def test_structured_check_requests_keep_every_invariant(
    fuzzing: Fuzzing, keys: tuple[Path, Keys]
) -> None:
    """Headers and header_map entries of every spelling, unicode, raw bytes, repeated
    Authorization values, route requirements and sizes around the limit."""

    @EXAMPLES
    @given(structured(keys[1]))
    def run(example: tuple[CheckRequest, bool]) -> None:
        check, plain = example
        request_id = f"fuzz-{uuid.uuid4().hex}"
        http = check.attributes.request.http
        if http.header_map.headers:
            http.header_map.headers.insert(0, HeaderValue(key="x-request-id", value=request_id))
        else:
            http.headers["x-request-id"] = request_id
        data = check.SerializeToString()
        oversized = len(data) > MAX_MESSAGE_BYTES
        reply = fuzzing.check(data, None if oversized else request_id)
        if oversized:
            assert reply.status.message == "request_too_large"
        if plain:
            assert reply.status.code == 0, reply.status.message

    run()


def test_raw_bytes_are_always_an_explicit_deny(fuzzing: Fuzzing) -> None:
    """Arbitrary bytes (no key in them): a deny, never an error."""

    @EXAMPLES
    @given(st.binary(max_size=4096))
    def run(data: bytes) -> None:
        assert fuzzing.check(data).status.code != 0

    run()


def test_mutated_real_requests_admit_only_the_key_they_still_carry(fuzzing: Fuzzing) -> None:
    """A real request with a valid key, with bytes flipped, inserted or cut: any allow is for
    the client whose key is still in the bytes."""
    key = next(iter(fuzzing.keys.valid))
    original = request(
        headers={"authorization": f"ApiKey {key}", "user-agent": "curl/8.5.0"}
    ).SerializeToString()
    edits = st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "cut"]), st.integers(0, len(original) - 1)),
        min_size=1,
        max_size=4,
    )

    @EXAMPLES
    @given(edits, st.integers(0, 255))
    def run(changes: list[tuple[str, int]], byte: int) -> None:
        data = bytearray(original)
        for change, position in changes:
            at = position % max(len(data), 1)
            if change == "flip" and data:
                data[at] ^= byte or 1
            elif change == "insert":
                data.insert(at, byte)
            elif data:
                del data[at : at + 1 + byte % 8]
        fuzzing.check(bytes(data))

    run()


def padded(authorization: str, size: int) -> bytes:
    """A CheckRequest of exactly ``size`` bytes, padded by a header."""
    padding = 0
    while True:
        headers = {"authorization": authorization, "x-padding": "p" * padding}
        data: bytes = request(headers=headers).SerializeToString()
        if len(data) == size:
            return data
        padding += size - len(data)  # the length prefixes may grow meanwhile: try again


def test_a_request_one_byte_over_the_limit_is_413_and_one_at_it_is_decided(
    fuzzing: Fuzzing,
) -> None:
    """Sizes straddling AUTHZ_MAX_MESSAGE_BYTES, with a valid key: allowed at the limit, an
    explicit 413 one byte over."""
    authorization = f"ApiKey {next(iter(fuzzing.keys.valid))}"
    assert fuzzing.check(padded(authorization, MAX_MESSAGE_BYTES)).status.code == 0
    over = fuzzing.check(padded(authorization, MAX_MESSAGE_BYTES + 1))
    assert (over.status.message, over.denied_response.status.code) == ("request_too_large", 413)
