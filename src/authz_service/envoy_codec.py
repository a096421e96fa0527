"""The only module that knows Envoy's protos: CheckRequest -> Request, Decision ->
CheckResponse, and access-log messages -> UpstreamRecords. It uses the upb-backed classes from
xds-protos, which parse a CheckRequest in a few microseconds.

Wire rules (see Envoy's ext_authz filter and external_auth.proto documentation):
- Allow: ``ok_response.headers`` with ``append`` unset *overwrite* what the client sent, so a
  client cannot smuggle its own ``x-client-id``. Identity headers we have no value for are put in
  ``headers_to_remove`` for the same reason, together with ``authorization``.
- Deny: a non-OK ``status`` plus an explicit ``denied_response.status``; Envoy would send 403 if
  the HTTP status were left unset.
- Metadata goes in ``CheckResponse.dynamic_metadata``; the ``ok_response`` field of that name is
  deprecated and overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from authz_service import answers
from authz_service.answers import AnswerSettings
from authz_service.model import (
    NO_AUTHORIZATION,
    Authorization,
    Client,
    Decision,
    Quota,
    RateLimit,
    Request,
)
from authz_service.reasons import Reason

# Allow responses depend only on the client and key, and denials only on the reason and rule, so
# they are built once and reused (never mutated after building). Bounded; cleared when full.
_MAX_CACHED_ALLOWS = 10_000
_MAX_CACHED_DENIALS = 1_000
_UNANSWERABLE = Decision.deny(Reason.INTERNAL_ERROR)
_NON_HTTP = Request(is_http=False)
_TOO_LARGE = Request(is_http=True, problem=Reason.REQUEST_TOO_LARGE)
_UNPARSABLE = Request(is_http=True, problem=Reason.REQUEST_UNPARSABLE)
# The headers a check reads, besides the pseudo-headers Envoy sends as fields.
_READ_HEADERS = frozenset({"authorization", "x-request-id", "traceparent", "tracestate"})


def decode(raw: bytes, max_bytes: int) -> Request:
    """The Request in a serialised CheckRequest. Never raises: a request over ``max_bytes`` or
    one that cannot be parsed becomes a Request that the check denies (and records)."""
    if len(raw) > max_bytes:
        return _TOO_LARGE
    try:
        return _decode(CheckRequest.FromString(raw))
    except Exception:  # invalid protobuf, invalid UTF-8 in a string field, ...
        return _UNPARSABLE


def _decode(check: CheckRequest) -> Request:
    attributes = check.attributes
    request = attributes.request
    if not request.HasField("http"):
        # Envoy's network (TCP) ext_authz filter, which Istio also installs, sends no HTTP part.
        return _NON_HTTP
    http = request.http
    route = attributes.context_extensions
    raw_headers = http.header_map.headers
    if raw_headers:
        # encode_raw_headers: repeated headers arrive as separate entries, values as raw bytes.
        found: dict[str, list[str]] = {}
        for entry in raw_headers:
            name = entry.key.lower()
            if name in _READ_HEADERS:
                value = (
                    entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
                )
                found.setdefault(name, []).append(value)
        authorization = Authorization(tuple(found.get("authorization", ())))
        headers = {name: values[0] for name, values in found.items()}
    else:
        headers = http.headers
        value = headers.get("authorization")
        authorization = NO_AUTHORIZATION if value is None else Authorization((value,))
    return Request(
        is_http=True,
        authorization=authorization,
        method=http.method,
        host=http.host,
        path=http.path.partition("?")[0].partition("#")[0],
        request_id=headers.get("x-request-id", ""),
        size=max(http.size, 0),
        route=tuple(sorted(route.items())) if route else (),
        stream_id=http.id,
        traceparent=headers.get("traceparent", ""),
        tracestate=headers.get("tracestate", ""),
    )


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """One finished request from Envoy's access log; bytes are body bytes (the payload)."""

    client_id: str | None
    status: int
    request_bytes: int
    response_bytes: int
    key_id: str | None = None  # the key our Check allowed, from the same metadata


EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
HTTP_CLIENT_ID_METADATA = "x-authz-client-id"
HTTP_KEY_ID_METADATA = "x-authz-key-id"
# Envoy's RateLimitUnit names, as RateLimit.Override.DynamicMetadata parses them.
_ENVOY_RATE_UNITS = {"second": "SECOND", "minute": "MINUTE", "hour": "HOUR", "day": "DAY"}


def decode_access_logs(
    message: StreamAccessLogsMessage, client_header: str | None
) -> list[UpstreamRecord]:
    """The HTTP entries of one access-log message. The client and key are the ones our Check
    put in the dynamic metadata, or, with ``client_header``, the client is the identity
    header we set upstream (and the key unknown)."""
    records = []
    for entry in message.http_logs.log_entry:
        client_id = key_id = None
        metadata = entry.common_properties.metadata.filter_metadata
        if EXT_AUTHZ_NAMESPACE in metadata:
            fields = metadata[EXT_AUTHZ_NAMESPACE].fields
            # gRPC mode: our dynamic_metadata; HTTP mode: our answer headers, which Envoy's
            # dynamic_metadata_from_headers stores under their own names.
            value = fields.get("client_id") or fields.get(HTTP_CLIENT_ID_METADATA)
            client_id = value.string_value if value is not None else None
            value = fields.get("key_id") or fields.get(HTTP_KEY_ID_METADATA)
            key_id = value.string_value if value is not None else None
        if client_id is None and client_header:
            client_id = entry.request.request_headers.get(client_header)
        request, response = entry.request, entry.response
        records.append(
            UpstreamRecord(
                client_id=client_id or None,
                status=response.response_code.value,
                request_bytes=request.request_body_bytes,
                response_bytes=response.response_body_bytes,
                key_id=key_id or None,
            )
        )
    return records


class Encoder:
    """Serialised CheckResponses, each built and serialised at most once per client and key
    (allows) or per reason and rule (denials). A rate-limited client's answers carry its
    quota, which changes with every check. On an allow (with ``quota_headers_on_allow``), the
    cached answer has every header but the last, ``RateLimit``, which is appended as a
    serialised message of its own: a message followed by another parses as their merge, and
    a repeated field's entries append. A 429 is a copy of a cached one with its per-check
    values set."""

    def __init__(self, settings: AnswerSettings, quota_headers_on_allow: bool = True) -> None:
        self._settings = settings
        self._quota_on_allow = quota_headers_on_allow
        self._denials: dict[tuple[Reason, str | None], bytes] = {}
        self._allows: dict[tuple[Client | None, str | None], bytes] = {}
        self._limited_allows: dict[tuple[Client | None, str | None], bytes] = {}
        self._limited_denials: dict[RateLimit, CheckResponse] = {}

    def encode(self, decision: Decision) -> bytes:
        """The serialised answer. Never raises: an answer that cannot be built (a bug, or a
        value no check foresaw) is the internal-error denial, never a gRPC error."""
        try:
            return self._encode(decision)
        except Exception as exc:
            answers.log_unanswerable(decision, exc)
            return self._encode(_UNANSWERABLE)

    def _encode(self, decision: Decision) -> bytes:
        quota = decision.quota
        if not decision.allowed:
            if quota is not None:
                return self._limited_denial(quota)
            key = (decision.reason, decision.rule)
            denial = self._denials.get(key)
            if denial is None:
                if len(self._denials) >= _MAX_CACHED_DENIALS:
                    self._denials.clear()
                denial = self._denials[key] = self._build_denial(*key).SerializeToString()
            return denial
        allow_key = (decision.client, decision.key_id)
        if quota is not None and self._quota_on_allow:
            return self._limited_allow(allow_key, quota)
        response = self._allows.get(allow_key)
        if response is None:
            if len(self._allows) >= _MAX_CACHED_ALLOWS:
                self._allows.clear()
            response = self._allows[allow_key] = self._build_allow(*allow_key).SerializeToString()
        return response

    def _limited_allow(self, allow_key: tuple[Client | None, str | None], quota: Quota) -> bytes:
        template = self._limited_allows.get(allow_key)
        if template is None:
            if len(self._limited_allows) >= _MAX_CACHED_ALLOWS:
                self._limited_allows.clear()
            response = self._build_allow(*allow_key)
            constant = answers.quota_headers(quota, limited=False)[:-1]  # all but RateLimit
            _add_headers(response.ok_response.response_headers_to_add, constant)
            template = self._limited_allows[allow_key] = response.SerializeToString()
        now = CheckResponse()
        header = now.ok_response.response_headers_to_add.add().header
        header.key, header.value = answers.QUOTA_HEADER, answers.quota_now(quota)
        answer: bytes = template + now.SerializeToString()
        return answer

    def _limited_denial(self, quota: Quota) -> bytes:
        template = self._limited_denials.get(quota.limit)
        if template is None:
            if len(self._limited_denials) >= _MAX_CACHED_DENIALS:
                self._limited_denials.clear()
            template = self._build_denial(Reason.RATE_LIMITED, None)
            _add_headers(template.denied_response.headers, answers.quota_headers(quota, True))
            self._limited_denials[quota.limit] = template
        response = CheckResponse()
        response.CopyFrom(template)
        headers = response.denied_response.headers
        headers[-3].header.value = str(quota.reset)  # retry-after
        headers[-1].header.value = answers.quota_now(quota)
        answer: bytes = response.SerializeToString()
        return answer

    def _build_allow(self, client: Client | None, key_id: str | None) -> CheckResponse:
        response = CheckResponse()
        response.status.code = 0
        ok = response.ok_response
        headers, remove = answers.identity(client, self._settings)
        ok.headers.extend(
            HeaderValueOption(header=HeaderValue(key=name, value=value)) for name, value in headers
        )
        ok.headers_to_remove.extend(remove)
        if client is not None:
            metadata: dict[str, object] = {
                "client_id": client.client_id,
                "client_name": client.name,
            }
            if key_id is not None:
                metadata["key_id"] = key_id
            if client.rate_limit is not None:
                # The shape of Envoy's RateLimit.Override.DynamicMetadata, for operators who
                # enforce the limit in Envoy's global rate-limit service instead.
                metadata["rate_limit"] = {
                    "requests_per_unit": client.rate_limit.requests_per_unit,
                    "unit": _ENVOY_RATE_UNITS[client.rate_limit.unit],
                }
            response.dynamic_metadata.update(metadata)
        return response

    def _build_denial(self, reason: Reason, rule: str | None) -> CheckResponse:
        response = CheckResponse()
        status, rpc_code, headers, body, given = answers.denial(reason, rule, self._settings)
        response.status.code = rpc_code
        response.status.message = given.value
        denied = response.denied_response
        denied.status.code = status
        denied.headers.extend(
            HeaderValueOption(header=HeaderValue(key=name, value=value)) for name, value in headers
        )
        denied.body = body
        return response


def _add_headers(options: Any, headers: answers.Headers) -> None:
    """Add headers (for the client: on an allow, Envoy adds ``response_headers_to_add`` to
    the upstream's response)."""
    options.extend(HeaderValueOption(header=HeaderValue(key=k, value=v)) for k, v in headers)
