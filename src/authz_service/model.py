"""The values that travel along the request path. Immutable, small, and free of Envoy types.

The ones made on every check (Request, Credential, Decision) are NamedTuples: as immutable as
frozen dataclasses, and three to four times cheaper to build, which the per-check CPU budget
notices. Client is a dataclass, built once per client and shared; Trace is filled in as a check
proceeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from authz_service.reasons import Reason

if TYPE_CHECKING:
    from authz_service.tracing import CheckSpan

REDACTED = "[redacted]"

Route = tuple[tuple[str, str], ...]


class Authorization:
    """A request's Authorization values, as received. They carry the key, so every text form
    is "[redacted]", and it cannot be serialised: a Request handed to a log call, a repr or a
    serialiser by mistake never shows them. ``reveal()`` gives them, to find the key."""

    __slots__ = ("_values",)

    def __init__(self, values: tuple[str, ...] = ()) -> None:
        self._values = values

    def reveal(self) -> tuple[str, ...]:
        return self._values

    def __bool__(self) -> bool:
        return bool(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Authorization) and other._values == self._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Authorization({REDACTED})" if self._values else "Authorization()"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Authorization values cannot be serialised")


NO_AUTHORIZATION = Authorization()


class Request(NamedTuple):
    """What the check needs from one request to authorize, whichever transport brought it."""

    is_http: bool
    authorization: Authorization = NO_AUTHORIZATION  # every Authorization value, as received
    method: str = ""
    host: str = ""
    path: str = ""  # without query string or fragment
    request_id: str = ""  # x-request-id when Envoy sends it (joins Envoy's access log)
    size: int = 0  # request body bytes, when Envoy reports them
    route: Route = ()  # the route's own requirements (Envoy's context_extensions), sorted
    stream_id: str = ""  # Envoy's own id of the request (the CheckRequest's http.id)
    traceparent: str = ""  # W3C trace context of the caller, when sent
    tracestate: str = ""
    # Set by a transport that could not read the request (unparsable, too large): the check is
    # then denied with this reason, and still logged and counted like any other.
    problem: Reason | None = None


class ApiKey:
    """An API key as presented. Every text form of it is "[redacted]": a key handed to a log
    call, an f-string or a serialiser by mistake never shows. ``reveal()`` gives the key, for
    the one place that must send it on (the registry's validation endpoint)."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def reveal(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"ApiKey({REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("an API key cannot be serialised")


class Credential(NamedTuple):
    """An API key taken from a request."""

    key: ApiKey
    digest: bytes  # the key's SHA-256: the only form in which keys are stored or cached
    key_id: str  # the first 12 hex digits of the digest: names the key in logs; not secret

    @property
    def key_hash(self) -> str:
        """The digest in hex, as the registry contract writes it."""
        return self.digest.hex()


class RateLimit(NamedTuple):
    """A client's rate limit, as the registry sets it."""

    requests_per_unit: int
    unit: str  # second, minute, hour or day


class Quota(NamedTuple):
    """Where a rate-limited client stands after one check: for its RateLimit headers and the
    decision log."""

    limit: RateLimit
    remaining: int  # whole requests available now
    reset: int  # seconds until one more request is available (0: none will be added)
    shared: bool  # counted in the replicas' shared bucket (Redis), not this replica's own


@dataclass(frozen=True, slots=True)
class Client:
    """A registered API client, as the registry describes it. Made once per client and shared
    by all of its keys."""

    client_id: str
    name: str
    roles: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None


@dataclass(slots=True)
class Trace:
    """How one check was decided, for the decision log: never key material."""

    key_id: str | None = None  # a non-secret fingerprint of the key (start of its SHA-256)
    resolution: str | None = None  # "memory" or "registry"
    registry_seconds: float | None = None
    policy_path: str | None = None  # the normalised path the policy rules compared
    span: CheckSpan | None = None  # the check's span, with tracing on (tracing.py)
    rate_limit_seconds: float | None = None  # the wait for the shared rate-limit bucket


class Decision(NamedTuple):
    """The single outcome of a check; the codec and the logs read only this."""

    allowed: bool
    reason: Reason
    client: Client | None = None  # on a deny too, when the client is known (a 403)
    rule: str | None = None  # the policy rule that decided, if one did
    dry_run_rule: str | None = None  # a dry-run rule that would have denied this allow
    key_id: str | None = None  # the presented key's fingerprint, once it passed the offline check
    quota: Quota | None = None  # a rate-limited client's standing, once its limit was applied

    @classmethod
    def allow(
        cls,
        client: Client | None,
        reason: Reason = Reason.ALLOWED,
        rule: str | None = None,
        dry_run_rule: str | None = None,
        key_id: str | None = None,
    ) -> Decision:
        return cls(True, reason, client, rule, dry_run_rule, key_id)

    @classmethod
    def deny(
        cls,
        reason: Reason,
        client: Client | None = None,
        rule: str | None = None,
        key_id: str | None = None,
    ) -> Decision:
        return cls(False, reason, client, rule, None, key_id)
