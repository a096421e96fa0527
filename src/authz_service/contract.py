"""The client registry's contract (src/client_registry/openapi.yaml), in one module.

Both sides share it: authz-service's registry backends (the validation endpoint, the snapshot,
the change feed) and its Redis tier parse with it, and the reference registry writes with it.

Parsing is strict: only the documented shapes become values, and anything else raises
``ContractError``. Its messages are ours alone and never quote what the registry sent, so that
nothing a registry answers (a key echoed back by mistake, say) can reach a log line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, NamedTuple

from authz_service.keystore import Interner
from authz_service.model import Client, RateLimit
from authz_service.reasons import Reason

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
ROLE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_NAME_LENGTH = 200
MAX_ROLES = 32
MAX_REQUESTS_PER_UNIT = 1_000_000_000
RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# The registry's refusals (verify answers) and the reasons of its delete changes, as ours.
REFUSALS = {
    "unknown": Reason.UNKNOWN_KEY,
    "revoked": Reason.KEY_REVOKED,
    "expired": Reason.KEY_EXPIRED,
    "suspended": Reason.CLIENT_SUSPENDED,
}
DELETE_REASONS = {**REFUSALS, "deleted": Reason.UNKNOWN_KEY}
_REFUSAL_NAMES = {reason: name for name, reason in REFUSALS.items()}
_IDENTITY_FIELDS = frozenset({"client_id", "client_name", "roles", "status"})
_VALID_FIELDS = frozenset({"valid", "client", "valid_until"})
_ENTRY_FIELDS = frozenset({"key_hash", "client", "valid_until"})


class ContractError(ValueError):
    """The registry sent something its contract does not allow. The message never contains
    what it sent."""

    safe_to_log = True


class Answer(NamedTuple):
    """What the registry says about one key."""

    result: Client | Reason
    valid_until: float | None = None  # when a valid key stops validating (Unix time), if set
    version: int | None = None  # the registry's change-log version the answer reflects


class Entry(NamedTuple):
    """A valid key, as a snapshot or an upsert change carries it."""

    digest: bytes  # the key's SHA-256
    client: Client
    valid_until: float | None


class Change(NamedTuple):
    """One change-log entry: a key that now validates (upsert) or no longer does (delete)."""

    version: int
    op: Literal["upsert", "delete"]
    digest: bytes
    client_id: str | None  # the key's client, when the registry says
    entry: Entry | None = None  # upserts
    reason: Reason | None = None  # deletes: why the key stopped validating


def parse_answer(document: Any, now: float | None = None) -> Answer:
    """A verify answer: one of the two documented shapes, exactly. A valid answer whose
    ``valid_until`` has passed is a refusal (``key_expired``)."""
    if not isinstance(document, dict):
        raise ContractError("the answer is not an object")
    fields = set(document) - {"version"}
    version = parse_version(document["version"]) if "version" in document else None
    if document.get("valid") is False and fields == {"valid", "reason"}:
        reason = REFUSALS.get(document["reason"]) if isinstance(document["reason"], str) else None
        if reason is None:
            raise ContractError("an invalid verdict with a reason outside the contract")
        return Answer(reason, version=version)
    if document.get("valid") is not True or fields != _VALID_FIELDS:
        raise ContractError("neither a valid nor an invalid verdict")
    client = parse_identity(document["client"])
    valid_until = parse_time(document["valid_until"])
    if valid_until is not None and valid_until <= (time.time() if now is None else now):
        return Answer(Reason.KEY_EXPIRED, version=version)
    return Answer(client, valid_until, version)


def parse_identity(document: Any, identities: Identities | None = None) -> Client:
    """A client identity of the contract; it must be active (only those validate).

    With ``identities``, an identity the same as one it holds comes back as that very client,
    and a new one is parsed with its roles shared (see ``Identities``)."""
    if identities is not None:
        known = identities.known(document)
        if known is not None:
            return known
    if not isinstance(document, dict):
        raise ContractError("the client is not an object")
    fields = set(document)
    if not (_IDENTITY_FIELDS <= fields <= _IDENTITY_FIELDS | {"rate_limit"}):
        raise ContractError("the client is not an identity of the contract")
    client_id, name, roles = document["client_id"], document["client_name"], document["roles"]
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ContractError("client_id outside the contract")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        raise ContractError("client_name outside the contract")
    if (
        not isinstance(roles, list)
        or len(roles) > MAX_ROLES
        or not all(isinstance(role, str) and ROLE_PATTERN.fullmatch(role) for role in roles)
    ):
        raise ContractError("roles outside the contract")
    if document["status"] != "active":
        raise ContractError("a valid key of a client that is not active")
    unique_roles = tuple(dict.fromkeys(roles))
    rate_limit = parse_rate_limit(document.get("rate_limit"))
    if identities is None:
        return Client(client_id, name, unique_roles, rate_limit)
    return identities.add(Client(client_id, name, identities.roles(unique_roles), rate_limit))


class Identities:
    """The clients parsed so far from one snapshot, so that each is parsed and held once.

    A snapshot repeats a client's identity with every one of its keys. An identity that is,
    field for field, the same as the last one parsed for its ``client_id`` is that client
    again: it comes back without being parsed a second time, which is most of a snapshot's
    parsing cost. Equal roles tuples of different clients are shared too (a few role sets
    cover most clients). Seeded with the clients of the copy in use, a reload keeps those
    that did not change as they are, instead of holding a second, equal copy of each.

    It holds one entry per client of the snapshot (which the copy holds anyway), and lives
    as long as one load.
    """

    __slots__ = ("_clients", "roles")

    def __init__(self, clients: Iterable[Client] = ()) -> None:
        self._clients: dict[str, Client] = {}
        self.roles = Interner[tuple[str, ...]]()
        for client in clients:
            self._clients[client.client_id] = client
            self.roles(client.roles)

    def known(self, document: Any) -> Client | None:
        """The client held for this identity's id, if the identity is exactly that client."""
        if type(document) is not dict:
            return None
        client_id = document.get("client_id")
        client = self._clients.get(client_id) if type(client_id) is str else None
        if client is None or not _same_identity(document, client):
            return None
        return client

    def add(self, client: Client) -> Client:
        """Holds ``client`` as the one for its id, in place of any other."""
        self._clients[client.client_id] = client
        return client


def _same_identity(document: dict[str, Any], client: Client) -> bool:
    """Whether the identity is ``client``, field for field. Only values the contract allows
    can be equal to a client's (validated) fields, once types are pinned where Python's
    equality is loose: ``true`` and ``1.0`` are equal to ``1``."""
    roles = document.get("roles")
    if not (
        document.get("client_name") == client.name
        and document.get("status") == "active"
        and type(roles) is list
        and tuple(roles) == client.roles
    ):
        return False
    # The four fields above are all there: any other can only be the rate limit.
    others = len(document) - len(_IDENTITY_FIELDS)
    if others == 0:
        return client.rate_limit is None
    return (
        others == 1
        and "rate_limit" in document
        and _same_rate_limit(document["rate_limit"], client.rate_limit)
    )


def _same_rate_limit(document: Any, rate_limit: RateLimit | None) -> bool:
    if document is None or rate_limit is None:
        return document is None and rate_limit is None
    return (
        type(document) is dict
        and len(document) == 2
        and type(document.get("requests_per_unit")) is int
        and document["requests_per_unit"] == rate_limit.requests_per_unit
        and document.get("unit") == rate_limit.unit
    )


def parse_rate_limit(document: Any) -> RateLimit | None:
    """A client's rate limit (absent or null: none)."""
    if document is None:
        return None
    if not isinstance(document, dict) or set(document) != {"requests_per_unit", "unit"}:
        raise ContractError("rate_limit is not {requests_per_unit, unit}")
    count, unit = document["requests_per_unit"], document["unit"]
    if (
        not isinstance(count, int)
        or isinstance(count, bool)
        or not 0 < count <= MAX_REQUESTS_PER_UNIT
    ):
        raise ContractError("rate_limit.requests_per_unit outside the contract")
    if unit not in RATE_UNITS:
        raise ContractError("rate_limit.unit outside the contract")
    return RateLimit(count, unit)


def parse_entry(document: Any, identities: Identities | None = None) -> Entry:
    """A snapshot entry (or an upsert's entry); ``identities`` as for ``parse_identity``."""
    if not isinstance(document, dict) or not document.keys() >= _ENTRY_FIELDS:
        raise ContractError("an entry without key_hash, client and valid_until")
    return Entry(
        parse_digest(document["key_hash"]),
        parse_identity(document["client"], identities),
        parse_time(document["valid_until"]),
    )


def parse_change(document: Any) -> Change:
    """A change event, from the change log or its stream."""
    if not isinstance(document, dict):
        raise ContractError("the change is not an object")
    version = parse_version(document.get("version"))
    op = document.get("op")
    digest = parse_digest(document.get("key_hash"))
    client_id = document.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id)
    ):
        raise ContractError("client_id outside the contract")
    if op == "upsert":
        entry = parse_entry(document.get("entry"))
        if entry.digest != digest:
            raise ContractError("an upsert whose entry is another key's")
        return Change(version, "upsert", digest, entry.client.client_id, entry=entry)
    if op == "delete":
        reason = document.get("reason", "revoked")
        mapped = DELETE_REASONS.get(reason) if isinstance(reason, str) else None
        if mapped is None:
            raise ContractError("a delete with a reason outside the contract")
        return Change(version, "delete", digest, client_id, reason=mapped)
    raise ContractError("a change whose op is neither upsert nor delete")


def parse_digest(value: Any) -> bytes:
    """A key hash of the contract: 64 lower-case hex digits (one per snapshot entry, so the
    check is a round trip rather than a regular expression)."""
    try:
        digest = bytes.fromhex(value) if isinstance(value, str) and len(value) == 64 else b""
    except ValueError:
        digest = b""
    if len(digest) != 32 or digest.hex() != value:  # the round trip refuses A-F and spaces
        raise ContractError("key_hash is not 64 lower-case hex digits")
    return digest


def parse_time(value: Any) -> float | None:
    """An ISO 8601 timestamp with a time zone (or null), as Unix time."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise ContractError("a timestamp that is not an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ContractError("a timestamp that is not ISO 8601") from None
    if moment.tzinfo is None:
        raise ContractError("a timestamp without a time zone")
    return moment.timestamp()


def format_time(moment: float | None) -> str | None:
    """Unix time as the contract writes it: ISO 8601, UTC, microseconds."""
    if moment is None:
        return None
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
    return f"{seconds}.{int(moment % 1 * 1e6):06d}Z"


def identity_document(
    client_id: str,
    name: str,
    roles: tuple[str, ...],
    status: str,
    rate_limit: RateLimit | None = None,
) -> dict[str, Any]:
    """A client identity as the registry writes it (verify answers, entries, changes)."""
    document: dict[str, Any] = {
        "client_id": client_id,
        "client_name": name,
        "roles": list(roles),
        "status": status,
    }
    if rate_limit is not None:
        document["rate_limit"] = {
            "requests_per_unit": rate_limit.requests_per_unit,
            "unit": rate_limit.unit,
        }
    return document


def answer_document(answer: Answer) -> dict[str, Any]:
    """A verify answer as the contract writes it (the shared cache tier stores answers so)."""
    result = answer.result
    document: dict[str, Any]
    if isinstance(result, Client):
        identity = identity_document(
            result.client_id, result.name, result.roles, "active", result.rate_limit
        )
        document = {
            "valid": True,
            "client": identity,
            "valid_until": format_time(answer.valid_until),
        }
    else:
        document = {"valid": False, "reason": _REFUSAL_NAMES.get(result, "unknown")}
    if answer.version is not None:
        document["version"] = answer.version
    return document


def parse_version(value: Any) -> int:
    """A change-log version."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ContractError("a version that is not a non-negative integer")
    return value
