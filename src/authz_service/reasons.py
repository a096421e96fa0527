"""Stable reason codes and the one table that turns each into an HTTP and gRPC status.

Reason codes are part of the public contract: they appear in the ``x-ext-authz-reason`` header,
in deny bodies, in decision logs and (later) as a metric label. Add codes; never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    ALLOWED = "allowed"
    MISSING_CREDENTIAL = "missing_credential"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    MALFORMED_CREDENTIAL = "malformed_credential"
    MULTIPLE_CREDENTIALS = "multiple_credentials"
    UNKNOWN_KEY = "unknown_key"
    KEY_DISABLED = "key_disabled"
    KEY_EXPIRED = "key_expired"
    KEY_REVOKED = "key_revoked"
    CLIENT_SUSPENDED = "client_suspended"
    FORBIDDEN = "forbidden"
    AMBIGUOUS_PATH = "ambiguous_path"
    INVALID_ROUTE_POLICY = "invalid_route_policy"
    NON_HTTP_REQUEST = "non_http_request"
    REQUEST_UNPARSABLE = "request_unparsable"
    REQUEST_TOO_LARGE = "request_too_large"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    REGISTRY_BUSY = "registry_busy"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Status:
    """How a denial travels: the HTTP status Envoy sends and the google.rpc code of the check."""

    http: int
    rpc_code: int  # google.rpc.Code
    error: str  # the "error" member of the JSON deny body


OK = Status(http=200, rpc_code=0, error="")
BAD_REQUEST = Status(http=400, rpc_code=3, error="bad_request")  # INVALID_ARGUMENT
UNAUTHORIZED = Status(http=401, rpc_code=16, error="unauthorized")  # UNAUTHENTICATED
FORBIDDEN = Status(http=403, rpc_code=7, error="forbidden")  # PERMISSION_DENIED
TOO_LARGE = Status(http=413, rpc_code=8, error="payload_too_large")  # RESOURCE_EXHAUSTED
TOO_MANY = Status(http=429, rpc_code=8, error="too_many_requests")  # RESOURCE_EXHAUSTED
UNAVAILABLE = Status(http=503, rpc_code=14, error="unavailable")  # UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    message: str


OUTCOMES: dict[Reason, Outcome] = {
    Reason.ALLOWED: Outcome(OK, "Allowed."),
    Reason.MISSING_CREDENTIAL: Outcome(
        UNAUTHORIZED, "An API key is required: send 'Authorization: ApiKey <key>'."
    ),
    Reason.UNSUPPORTED_SCHEME: Outcome(
        UNAUTHORIZED, "The Authorization header must use the ApiKey scheme."
    ),
    Reason.MALFORMED_CREDENTIAL: Outcome(UNAUTHORIZED, "The API key is malformed."),
    Reason.MULTIPLE_CREDENTIALS: Outcome(
        UNAUTHORIZED, "Send exactly one Authorization header with one API key."
    ),
    Reason.UNKNOWN_KEY: Outcome(UNAUTHORIZED, "The API key is not recognised."),
    Reason.KEY_DISABLED: Outcome(UNAUTHORIZED, "The API key is disabled."),
    Reason.KEY_EXPIRED: Outcome(UNAUTHORIZED, "The API key has expired."),
    Reason.KEY_REVOKED: Outcome(UNAUTHORIZED, "The API key has been revoked."),
    Reason.CLIENT_SUSPENDED: Outcome(FORBIDDEN, "The client is suspended."),
    Reason.FORBIDDEN: Outcome(FORBIDDEN, "This client may not make this request."),
    Reason.AMBIGUOUS_PATH: Outcome(
        BAD_REQUEST,
        "The request path is ambiguous (an encoded slash or backslash, a backslash, a path "
        "parameter or a malformed escape).",
    ),
    Reason.INVALID_ROUTE_POLICY: Outcome(
        FORBIDDEN, "This route's access requirements are invalid; no request can be allowed."
    ),
    Reason.NON_HTTP_REQUEST: Outcome(FORBIDDEN, "Only HTTP requests can be authorized by API key."),
    Reason.REQUEST_UNPARSABLE: Outcome(
        BAD_REQUEST, "The request could not be read for authorization."
    ),
    Reason.REQUEST_TOO_LARGE: Outcome(TOO_LARGE, "The request is too large to be authorized."),
    Reason.RATE_LIMITED: Outcome(TOO_MANY, "This client has sent too many requests; retry later."),
    Reason.OVERLOADED: Outcome(
        UNAVAILABLE, "Too many authorization checks are in progress; retry later."
    ),
    Reason.REGISTRY_UNAVAILABLE: Outcome(
        UNAVAILABLE, "The client registry cannot be reached; retry later."
    ),
    Reason.REGISTRY_BUSY: Outcome(
        UNAVAILABLE, "Too many key lookups are in progress; retry later."
    ),
    Reason.DEADLINE_EXCEEDED: Outcome(
        UNAVAILABLE, "Authorization could not complete in time; retry later."
    ),
    Reason.INTERNAL_ERROR: Outcome(
        UNAVAILABLE, "Authorization is temporarily unavailable; retry later."
    ),
}
