"""What an answer says, whichever transport carries it: the identity an allow sends upstream,
and a deny's status, headers and JSON body. The gRPC codec (``envoy_codec``) and the HTTP
transport (``http_check``) only put these on their wire, so both modes answer alike.

- Identity headers overwrite what the client sent (see each transport), and an identity header
  we have no value for is removed, so that a client cannot supply its own; so is the key.
- Values from the registry are sanitised: CR, LF, NUL, ``%`` and non-ASCII are percent-encoded,
  and at most 256 characters are kept (Envoy's header validation would otherwise turn the
  request into a 500).
- A deny carries an explicit HTTP status, ``content-type``, ``cache-control: no-store``,
  ``x-ext-authz-reason`` and, when a rule decided, ``x-ext-authz-rule``; a 401 adds the
  ``www-authenticate`` challenge and a 503 ``retry-after``.
- A rate-limited client's answers carry its quota in the structured-field form of
  draft-ietf-httpapi-ratelimit-headers-10: ``RateLimit-Policy: "client";q=<requests>;w=<window
  seconds>`` and ``RateLimit: "client";r=<requests left>;t=<seconds until one more>``. A 429
  adds ``retry-after``, the same seconds as ``t``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

from authz_service import logs
from authz_service.contract import RATE_UNITS
from authz_service.model import Client, Decision, Quota, RateLimit
from authz_service.reasons import OUTCOMES, UNAUTHORIZED, UNAVAILABLE, Reason

log = logging.getLogger(__name__)

MAX_HEADER_VALUE_LENGTH = 256
QUOTA_POLICY = "client"  # the name of the one quota policy: each client's own rate limit
QUOTA_HEADER = "ratelimit"  # what is left now: the one header that changes with every check
# Printable ASCII except "%": everything else is percent-encoded.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class AnswerSettings:
    client_id_header: str = "x-client-id"
    client_name_header: str = "x-client-name"
    client_roles_header: str = "x-client-roles"
    realm: str = "authz-service"
    retry_after_seconds: int = 1


class Identity(NamedTuple):
    """What an allow sends upstream: headers to set, and headers to remove."""

    headers: Headers
    remove: tuple[str, ...]


class Denial(NamedTuple):
    status: int  # the HTTP status the client gets
    rpc_code: int  # the google.rpc code of a gRPC CheckResponse
    headers: Headers
    body: str  # JSON: {"error", "reason", "message"[, "rule"]}
    reason: Reason  # the reason it gives


def log_unanswerable(decision: Decision, exc: Exception) -> None:
    """Say that a decision's answer could not be built (it is then denied, 503): the error's
    type, not its text, which may quote what the registry sent."""
    logs.failure(
        log, "the answer could not be built; denying", "answer_error", exc,
        reason=decision.reason.value,
    )  # fmt: skip


def identity(client: Client | None, settings: AnswerSettings) -> Identity:
    names = (settings.client_id_header, settings.client_name_header, settings.client_roles_header)
    if client is None:
        return Identity((), ("authorization", *names))
    values = (client.client_id, client.name, ",".join(client.roles))
    headers = tuple(
        (name, sanitize(value)) for name, value in zip(names, values, strict=True) if value
    )
    absent = tuple(name for name, value in zip(names, values, strict=True) if not value)
    return Identity(headers, (*absent, "authorization"))


def denial(reason: Reason, rule: str | None, settings: AnswerSettings) -> Denial:
    """A deny's status, gRPC code, headers and body. A reason that only ever allows is no
    answer for a deny: such a deny, a bug, says 503 ``internal_error``, never OK."""
    if OUTCOMES[reason].status.rpc_code == 0:
        reason, rule = Reason.INTERNAL_ERROR, None
    outcome = OUTCOMES[reason]
    status = outcome.status
    headers = [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
        ("x-ext-authz-reason", reason.value),
    ]
    body = {"error": status.error, "reason": reason.value, "message": outcome.message}
    if rule is not None:  # rule ids come from the policy file or Envoy's route, never a client
        headers.append(("x-ext-authz-rule", rule))
        body["rule"] = rule
    if status is UNAUTHORIZED:
        realm = settings.realm.replace("\\", "\\\\").replace('"', '\\"')
        headers.append(("www-authenticate", f'ApiKey realm="{realm}"'))
    if status is UNAVAILABLE:
        headers.append(("retry-after", str(settings.retry_after_seconds)))
    return Denial(status.http, status.rpc_code, tuple(headers), json.dumps(body), reason)


def quota_headers(quota: Quota, limited: bool) -> Headers:
    """The RateLimit headers of a rate-limited client's answer (``limited``: a 429, which adds
    ``retry-after``)."""
    headers = (("ratelimit-policy", quota_policy(quota.limit)), (QUOTA_HEADER, quota_now(quota)))
    return (("retry-after", str(quota.reset)), *headers) if limited else headers


def quota_policy(limit: RateLimit) -> str:
    """The ``RateLimit-Policy`` value: the same on every answer to the client."""
    return f'"{QUOTA_POLICY}";q={limit.requests_per_unit};w={RATE_UNITS[limit.unit]}'


def quota_now(quota: Quota) -> str:
    """The ``RateLimit`` value: what is left now."""
    if quota.reset:  # t is optional: a full bucket gets no more
        return f'"{QUOTA_POLICY}";r={quota.remaining};t={quota.reset}'
    return f'"{QUOTA_POLICY}";r={quota.remaining}'


def sanitize(value: str) -> str:
    """Make a registry-supplied string safe as an HTTP header value."""
    value = value.strip()
    if not (value.isascii() and value.isprintable() and "%" not in value):
        value = quote(value, safe=_SAFE, errors="replace")  # a lone surrogate becomes "?"
    return value[:MAX_HEADER_VALUE_LENGTH]
