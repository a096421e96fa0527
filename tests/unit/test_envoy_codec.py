"""The Envoy codec: what is read from a CheckRequest, and every Decision as it goes on the wire."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from authz_service.answers import AnswerSettings, sanitize
from authz_service.envoy_codec import Encoder, decode
from authz_service.model import Authorization, Client, Decision, Quota, RateLimit, Request
from authz_service.reasons import OUTCOMES, Reason


def http_check(
    headers: dict[str, str] | None = None,
    raw: list[tuple[str, bytes]] | None = None,
    path: str = "/v1/things?x=1",
) -> CheckRequest:
    http = AttributeContext.HttpRequest(
        id="req-1", method="POST", host="api.example", path=path, headers=headers or {}
    )
    if raw is not None:
        http.header_map.CopyFrom(
            HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in raw])
        )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


def read(check: CheckRequest) -> Request:
    return decode(check.SerializeToString(), max_bytes=1 << 20)


class TestDecode:
    def test_http_attributes_become_a_request(self) -> None:
        """Method, host, request id and the Authorization value are taken as they are."""
        request = read(http_check({"authorization": "ApiKey abc", "other": "x"}))
        assert request == Request(
            is_http=True,
            authorization=Authorization(("ApiKey abc",)),
            method="POST",
            host="api.example",
            path="/v1/things",
            stream_id="req-1",
        )

    @pytest.mark.parametrize(
        ("path", "expected"),
        [("/a?b=c", "/a"), ("/a#frag", "/a"), ("/a?b#c", "/a"), ("/a", "/a"), ("", "")],
    )
    def test_the_path_loses_its_query_and_fragment(self, path: str, expected: str) -> None:
        """Query strings never reach the pipeline or the logs."""
        assert read(http_check(path=path)).path == expected

    def test_route_requirements_come_from_context_extensions(self) -> None:
        """ExtAuthzPerRoute's context_extensions, sorted so that equal routes compare equal."""
        check = http_check()
        check.attributes.context_extensions.update({"required_roles": "a,b", "rule_id": "r"})
        assert read(check).route == (("required_roles", "a,b"), ("rule_id", "r"))
        assert read(http_check()).route == ()

    def test_a_request_without_authorization_has_none(self) -> None:
        """No header means an empty tuple, not an empty string."""
        assert read(http_check({})).authorization.reveal() == ()

    def test_raw_header_map_keeps_every_repeated_value(self) -> None:
        """With encode_raw_headers, each Authorization entry is a separate value."""
        request = read(
            http_check(raw=[("authorization", b"ApiKey a"), ("Authorization", b"ApiKey b")])
        )
        assert request.authorization.reveal() == ("ApiKey a", "ApiKey b")

    def test_raw_header_map_with_invalid_utf8_keeps_the_damage_visible(self) -> None:
        """Invalid bytes become U+FFFD, which no key may contain, so the check will fail closed."""
        request = read(http_check(raw=[("authorization", b"ApiKey a\xffb")]))
        assert request.authorization.reveal() == ("ApiKey a\ufffdb",)

    def test_raw_header_map_wins_over_the_merged_map(self) -> None:
        """When both forms are present, the raw entries are authoritative."""
        request = read(
            http_check({"authorization": "ApiKey merged"}, raw=[("authorization", b"ApiKey raw")])
        )
        assert request.authorization.reveal() == ("ApiKey raw",)

    def test_a_check_without_http_attributes_is_a_non_http_request(self) -> None:
        """Envoy's network ext_authz sends no HTTP part; that is a request of its own kind."""
        assert read(CheckRequest()) == Request(is_http=False)

    def test_envoys_request_id_and_trace_context_are_read(self) -> None:
        """x-request-id joins our log line to Envoy's; the stream id is kept beside it."""
        request = read(
            http_check(
                {
                    "x-request-id": "5b3f",
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "tracestate": "a=b",
                }
            )
        )
        assert (request.request_id, request.stream_id) == ("5b3f", "req-1")
        assert request.traceparent.startswith("00-0af7")
        assert request.tracestate == "a=b"

    def test_a_request_over_the_size_limit_is_refused_unread(self) -> None:
        """Over max_bytes, the bytes are not parsed: the check denies it (413)."""
        raw = http_check({"authorization": "ApiKey " + "a" * 100}).SerializeToString()
        assert decode(raw, max_bytes=len(raw) - 1).problem is Reason.REQUEST_TOO_LARGE
        assert decode(raw, max_bytes=len(raw)).problem is None

    @pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x0a\x03\x22\x01\xff"])
    def test_bytes_that_are_not_a_check_request_are_refused(self, raw: bytes) -> None:
        """Invalid protobuf or invalid UTF-8 in a string field: the check denies it (400)."""
        assert decode(raw, max_bytes=1024).problem is Reason.REQUEST_UNPARSABLE


ENCODER = Encoder(AnswerSettings(realm='my "realm"', retry_after_seconds=7))
CLIENT = Client(client_id="c-1", name="Client One", roles=("reader", "writer"))


def encode(decision: Decision, encoder: Encoder = ENCODER) -> CheckResponse:
    """The answer as Envoy reads it (the encoder makes it serialised)."""
    return CheckResponse.FromString(encoder.encode(decision))


def headers_of(options: object) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}  # type: ignore[attr-defined]


class TestEncodeAllow:
    def test_an_allow_sets_identity_headers_that_overwrite(self) -> None:
        """Identity headers are set with append unset, so they replace any client-sent value."""
        response = encode(Decision.allow(CLIENT))
        assert response.status.code == 0
        assert not response.HasField("denied_response")
        assert headers_of(response.ok_response.headers) == {
            "x-client-id": "c-1",
            "x-client-name": "Client One",
            "x-client-roles": "reader,writer",
        }
        for option in response.ok_response.headers:
            assert not option.HasField("append")

    def test_an_allow_removes_the_key_from_the_upstream_request(self) -> None:
        """The Authorization header never reaches the upstream."""
        response = encode(Decision.allow(CLIENT))
        assert list(response.ok_response.headers_to_remove) == ["authorization"]

    def test_identity_headers_without_a_value_are_removed(self) -> None:
        """A client without roles cannot smuggle its own x-client-roles upstream."""
        response = encode(Decision.allow(Client(client_id="c-2", name="Two")))
        assert "x-client-roles" not in headers_of(response.ok_response.headers)
        assert "x-client-roles" in response.ok_response.headers_to_remove

    def test_an_allow_without_a_client_removes_every_identity_header(self) -> None:
        """An allowed non-HTTP check carries no identity, and no client-sent one either."""
        response = encode(Decision.allow(None, Reason.NON_HTTP_REQUEST))
        assert set(response.ok_response.headers_to_remove) == {
            "authorization",
            "x-client-id",
            "x-client-name",
            "x-client-roles",
        }

    def test_dynamic_metadata_names_the_client(self) -> None:
        """Access logs can read client_id and client_name from the filter's metadata."""
        response = encode(Decision.allow(CLIENT))
        assert dict(response.dynamic_metadata) == {"client_id": "c-1", "client_name": "Client One"}
        assert not response.ok_response.HasField("dynamic_metadata")

    def test_header_names_are_configurable(self) -> None:
        """Operators can rename the identity headers."""
        encoder = Encoder(AnswerSettings(client_id_header="x-app", client_name_header="x-app-name"))
        response = encode(Decision.allow(CLIENT), encoder)
        assert set(headers_of(response.ok_response.headers)) == {
            "x-app",
            "x-app-name",
            "x-client-roles",
        }


class TestEncodeDeny:
    @pytest.mark.parametrize("reason", [r for r in Reason if r is not Reason.ALLOWED])
    def test_every_denial_carries_an_explicit_status_reason_and_json_body(
        self, reason: Reason
    ) -> None:
        """The HTTP status is always set (Envoy would default to 403) and matches the table."""
        response = encode(Decision.deny(reason))
        outcome = OUTCOMES[reason]
        assert response.status.code == outcome.status.rpc_code != 0
        assert response.denied_response.status.code == outcome.status.http
        headers = headers_of(response.denied_response.headers)
        assert headers["x-ext-authz-reason"] == reason.value
        assert headers["content-type"] == "application/json"
        assert json.loads(response.denied_response.body) == {
            "error": outcome.status.error,
            "reason": reason.value,
            "message": outcome.message,
        }
        assert not response.HasField("ok_response")
        assert not response.dynamic_metadata

    @pytest.mark.parametrize(
        ("reason", "http", "rpc"),
        [
            (Reason.UNKNOWN_KEY, 401, 16),
            (Reason.MULTIPLE_CREDENTIALS, 401, 16),
            (Reason.NON_HTTP_REQUEST, 403, 7),
            (Reason.DEADLINE_EXCEEDED, 503, 14),
            (Reason.INTERNAL_ERROR, 503, 14),
        ],
    )
    def test_statuses_follow_the_reason_table(self, reason: Reason, http: int, rpc: int) -> None:
        """401 UNAUTHENTICATED, 403 PERMISSION_DENIED and 503 UNAVAILABLE."""
        response = encode(Decision.deny(reason))
        assert (response.denied_response.status.code, response.status.code) == (http, rpc)

    def test_a_401_carries_the_apikey_challenge(self) -> None:
        """WWW-Authenticate names the scheme and the configured realm, quoted."""
        headers = headers_of(encode(Decision.deny(Reason.UNKNOWN_KEY)).denied_response.headers)
        assert headers["www-authenticate"] == 'ApiKey realm="my \\"realm\\""'
        assert "retry-after" not in headers

    def test_a_503_tells_the_client_when_to_retry(self) -> None:
        """Retry-After carries the configured number of seconds."""
        headers = headers_of(encode(Decision.deny(Reason.INTERNAL_ERROR)).denied_response.headers)
        assert headers["retry-after"] == "7"
        assert "www-authenticate" not in headers

    def test_a_policy_denial_names_its_rule_but_not_the_client(self) -> None:
        """403 forbidden with the rule in a header and the body; no identity goes out."""
        response = encode(Decision.deny(Reason.FORBIDDEN, CLIENT, "admin-area"))
        assert (response.status.code, response.denied_response.status.code) == (7, 403)
        headers = headers_of(response.denied_response.headers)
        assert headers["x-ext-authz-reason"] == "forbidden"
        assert headers["x-ext-authz-rule"] == "admin-area"
        assert json.loads(response.denied_response.body)["rule"] == "admin-area"
        assert CLIENT.client_id not in str(response)
        denial = Decision.deny(Reason.FORBIDDEN, CLIENT, "admin-area")
        assert ENCODER.encode(denial) is ENCODER.encode(denial)  # built once

    def test_an_ambiguous_path_is_a_400(self) -> None:
        response = encode(Decision.deny(Reason.AMBIGUOUS_PATH))
        assert (response.status.code, response.denied_response.status.code) == (3, 400)

    def test_an_allow_is_built_once_per_client_and_key(self) -> None:
        assert ENCODER.encode(Decision.allow(CLIENT)) is ENCODER.encode(Decision.allow(CLIENT))


LIMIT = RateLimit(5, "second")
LIMITED = Client("c-5", "Limited", (), LIMIT)


def limited_allow(remaining: int, reset: int = 1) -> Decision:
    return Decision.allow(LIMITED, key_id="0123456789ab")._replace(
        quota=Quota(LIMIT, remaining, reset, shared=False)
    )


class TestEncodeRateLimits:
    def test_a_limited_clients_allow_tells_the_client_its_quota(self) -> None:
        """RateLimit headers go to the client with the upstream's response (not upstream),
        in the structured-field form of draft-ietf-httpapi-ratelimit-headers-10."""
        response = encode(limited_allow(3))
        assert [
            (o.header.key, o.header.value) for o in response.ok_response.response_headers_to_add
        ] == [("ratelimit-policy", '"client";q=5;w=1'), ("ratelimit", '"client";r=3;t=1')]
        assert set(headers_of(response.ok_response.headers)) == {"x-client-id", "x-client-name"}

    def test_the_quota_changes_per_check_and_the_cached_allow_does_not(self) -> None:
        """Each check gets its own quota; the allow built for the client is never changed."""
        first, second = encode(limited_allow(3)), encode(limited_allow(2))
        assert headers_of(second.ok_response.response_headers_to_add)["ratelimit"] == (
            '"client";r=2;t=1'
        )
        assert headers_of(first.ok_response.response_headers_to_add)["ratelimit"] == (
            '"client";r=3;t=1'
        )
        plain = encode(Decision.allow(LIMITED, key_id="0123456789ab"))
        assert not plain.ok_response.response_headers_to_add

    def test_headers_on_allowed_answers_can_be_turned_off(self) -> None:
        encoder = Encoder(AnswerSettings(), quota_headers_on_allow=False)
        assert not encode(limited_allow(3), encoder).ok_response.response_headers_to_add
        assert encoder.encode(limited_allow(3)) is encoder.encode(limited_allow(2))  # cached

    def test_the_limit_travels_in_dynamic_metadata_in_envoys_override_shape(self) -> None:
        """RateLimit.Override.DynamicMetadata: requests_per_unit and Envoy's unit name."""
        response = encode(Decision.allow(LIMITED, key_id="0123456789ab"))
        metadata = response.dynamic_metadata
        assert dict(metadata["rate_limit"]) == {"requests_per_unit": 5, "unit": "SECOND"}
        assert metadata["key_id"] == "0123456789ab"
        assert "rate_limit" not in dict(encode(Decision.allow(CLIENT)).dynamic_metadata)

    def test_a_rate_limited_check_is_a_429_with_retry_after_and_the_quota(self) -> None:
        """The same JSON body as every deny, and the headers the client needs to back off."""
        decision = Decision(
            False,
            Reason.RATE_LIMITED,
            LIMITED,
            None,
            None,
            "0123456789ab",
            Quota(LIMIT, 0, 1, shared=True),
        )
        response = encode(decision)
        assert (response.status.code, response.denied_response.status.code) == (8, 429)
        headers = headers_of(response.denied_response.headers)
        assert headers["x-ext-authz-reason"] == "rate_limited"
        assert headers["retry-after"] == "1"
        assert headers["ratelimit"] == '"client";r=0;t=1'
        assert headers["ratelimit-policy"] == '"client";q=5;w=1'
        assert json.loads(response.denied_response.body) == {
            "error": "too_many_requests",
            "reason": "rate_limited",
            "message": OUTCOMES[Reason.RATE_LIMITED].message,
        }
        assert "retry-after" not in headers_of(
            encode(Decision.deny(Reason.FORBIDDEN, CLIENT)).denied_response.headers
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain value", "plain value"),
        ("  padded  ", "padded"),
        ("evil\r\nx-admin: 1", "evil%0D%0Ax-admin: 1"),
        ("nul\x00byte", "nul%00byte"),
        ("100%", "100%25"),
        ("Zoë", "Zo%C3%AB"),
        ("x" * 300, "x" * 256),
    ],
)
def test_registry_values_are_sanitised_for_headers(value: str, expected: str) -> None:
    """No CR, LF, NUL or non-ASCII reaches a header; values are bounded in length."""
    assert sanitize(value) == expected
