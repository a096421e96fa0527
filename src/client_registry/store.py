"""The registry's operations. Each runs in one transaction and appends what it changed about
valid keys to the change log, which feeds the snapshot's delta form and the change feed.

Keys are stored only as hashes (SHA-256, or HMAC-SHA256 with a server-side pepper). The plaintext
is returned once, by the operation that creates it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from authz_service import apikeys
from client_registry.db import Database, Tx

T = TypeVar("T")
ACTIVE, SUSPENDED = "active", "suspended"
_CLIENT_COLUMNS = "client_id, name, email, roles, status, created_at, updated_at"


class NotFoundError(LookupError):
    pass


class ConflictError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    email: str
    roles: tuple[str, ...]
    status: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Key:
    """What may be shown about a key: never its hash or plaintext."""

    key_id: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Verification:
    valid: bool
    reason: str | None = None  # unknown, revoked, suspended, expired
    client: Client | None = None
    valid_until: float | None = None


class KeyHasher:
    def __init__(self, pepper: str = "") -> None:
        self._pepper = pepper.encode()

    def __call__(self, key: str) -> str:
        if self._pepper:
            return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()
        return apikeys.hash_key(key)


def key_id(key: str) -> str:
    """A short, non-secret fingerprint that names a key in listings and logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Store:
    def __init__(
        self,
        db: Database,
        hasher: KeyHasher,
        key_prefix: str = apikeys.DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._on_change = on_change
        self._hash = hasher
        self._prefix = key_prefix
        self._clock = clock

    # --- management --------------------------------------------------------------------------
    async def create_client(
        self, name: str, email: str, roles: Sequence[str]
    ) -> tuple[Client, str, Key]:
        now = self._clock()
        client = Client(
            client_id="cl_" + secrets.token_hex(8),
            name=name,
            email=email,
            roles=tuple(roles),
            status=ACTIVE,
            created_at=now,
            updated_at=now,
        )
        key = apikeys.generate(self._prefix)

        def create(tx: Tx) -> Key:
            tx.execute(
                f"INSERT INTO clients ({_CLIENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (client.client_id, name, email, json.dumps(list(roles)), ACTIVE, now, now),
            )
            return self._add_key(tx, client, key, now)

        return client, key, await self._write(create)

    async def list_clients(self, limit: int, after: str = "") -> list[Client]:
        rows = await self._db.run(
            lambda tx: tx.all(
                f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id > %s "
                "ORDER BY client_id LIMIT %s",
                (after, limit),
            )
        )
        return [_client(row) for row in rows]

    async def get_client(self, client_id: str) -> tuple[Client, list[Key]]:
        def get(tx: Tx) -> tuple[Client, list[Key]]:
            client = _get_client(tx, client_id)
            rows = tx.all(
                "SELECT key_id, created_at, expires_at, revoked_at FROM api_keys "
                "WHERE client_id = %s ORDER BY created_at",
                (client_id,),
            )
            return client, [Key(*row) for row in rows]

        return await self._db.run(get)

    async def update_client(self, client_id: str, changes: dict[str, Any]) -> Client:
        def update(tx: Tx) -> Client:
            old = _get_client(tx, client_id)
            new = Client(
                client_id=client_id,
                name=changes.get("name", old.name),
                email=changes.get("email", old.email),
                roles=tuple(changes.get("roles", old.roles)),
                status=changes.get("status", old.status),
                created_at=old.created_at,
                updated_at=self._clock(),
            )
            tx.execute(
                "UPDATE clients SET name = %s, email = %s, roles = %s, status = %s, "
                "updated_at = %s WHERE client_id = %s",
                (
                    new.name,
                    new.email,
                    json.dumps(list(new.roles)),
                    new.status,
                    new.updated_at,
                    client_id,
                ),
            )
            identity_changed = (old.name, old.roles, old.status) != (
                new.name,
                new.roles,
                new.status,
            )
            if identity_changed:  # every valid key of the client carries the new identity
                self._log_keys(tx, new, self._valid_key_hashes(tx, client_id))
            return new

        return await self._write(update)

    async def delete_client(self, client_id: str) -> None:
        def delete(tx: Tx) -> None:
            _get_client(tx, client_id)
            hashes = self._valid_key_hashes(tx, client_id)
            tx.execute("DELETE FROM api_keys WHERE client_id = %s", (client_id,))
            tx.execute("DELETE FROM clients WHERE client_id = %s", (client_id,))
            self._log(tx, [_deleted(h, client_id) for h, _ in hashes])

        await self._write(delete)

    async def revoke_key(self, client_id: str) -> None:
        """Revoke every key of the client that still validates; 409 if there is none."""

        def revoke(tx: Tx) -> None:
            _get_client(tx, client_id)
            hashes = self._valid_key_hashes(tx, client_id)
            if not hashes:
                raise ConflictError("the client has no valid API key to revoke")
            now = self._clock()
            for key_hash, _ in hashes:
                tx.execute(
                    "UPDATE api_keys SET revoked_at = %s WHERE key_hash = %s", (now, key_hash)
                )
            self._log(tx, [_deleted(h, client_id) for h, _ in hashes])

        await self._write(revoke)

    async def regenerate_key(self, client_id: str, grace: float) -> tuple[str, Key]:
        """Issue a new key. Old keys keep validating for ``grace`` seconds, then are revoked."""
        key = apikeys.generate(self._prefix)

        def regenerate(tx: Tx) -> Key:
            client = _get_client(tx, client_id)
            now = self._clock()
            old = self._valid_key_hashes(tx, client_id)
            for key_hash, _ in old:
                tx.execute(
                    "UPDATE api_keys SET revoked_at = %s WHERE key_hash = %s",
                    (now + grace, key_hash),
                )
            if grace > 0:
                self._log_keys(tx, client, old)
            else:
                self._log(tx, [_deleted(h, client_id) for h, _ in old])
            return self._add_key(tx, client, key, now)

        return key, await self._write(regenerate)

    # --- verification --------------------------------------------------------------------------
    async def verify(self, key: str) -> Verification:
        key_hash = self._hash(key)

        def verify(tx: Tx) -> Verification:
            row = tx.one(
                "SELECT expires_at, revoked_at, client_id FROM api_keys WHERE key_hash = %s",
                (key_hash,),
            )
            if row is None:
                return Verification(valid=False, reason="unknown")
            expires_at, revoked_at, client_id = row
            now = self._clock()
            if revoked_at is not None and revoked_at <= now:
                return Verification(valid=False, reason="revoked")
            if expires_at is not None and expires_at <= now:
                return Verification(valid=False, reason="expired")
            client = _get_client(tx, client_id)
            if client.status != ACTIVE:
                return Verification(valid=False, reason="suspended")
            return Verification(
                valid=True, client=client, valid_until=_earliest(expires_at, revoked_at)
            )

        return await self._db.run(verify)

    async def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """Every key that validates now, with its client, and the change-log version it reflects."""

        def snapshot(tx: Tx) -> tuple[int, list[dict[str, Any]]]:
            version = _version(tx)
            now = self._clock()
            rows = tx.all(
                f"SELECT k.key_hash, k.key_id, k.expires_at, k.revoked_at, "
                f"{', '.join('c.' + c.strip() for c in _CLIENT_COLUMNS.split(','))} "
                "FROM api_keys k JOIN clients c ON c.client_id = k.client_id "
                "WHERE c.status = %s AND (k.revoked_at IS NULL OR k.revoked_at > %s) "
                "AND (k.expires_at IS NULL OR k.expires_at > %s) ORDER BY k.key_hash",
                (ACTIVE, now, now),
            )
            return version, [
                _entry(row[0], row[1], _earliest(row[2], row[3]), _client(row[4:])) for row in rows
            ]

        return await self._db.run(snapshot)

    async def changes_since(self, version: int, limit: int) -> tuple[int, list[tuple[int, Any]]]:
        """Changes after ``version`` (at most ``limit``), and the current version."""

        def changes(tx: Tx) -> tuple[int, list[tuple[int, Any]]]:
            rows = tx.all(
                "SELECT version, payload FROM changes WHERE version > %s ORDER BY version LIMIT %s",
                (version, limit),
            )
            return _version(tx), [(int(v), json.loads(p)) for v, p in rows]

        return await self._db.run(changes)

    # --- helpers -------------------------------------------------------------------------------
    async def _write(self, operation: Callable[[Tx], T]) -> T:
        result = await self._db.run(operation, write=True)
        self._on_change()  # wake change-feed streams now rather than at their next poll
        return result

    def _add_key(self, tx: Tx, client: Client, key: str, now: float) -> Key:
        key_hash = self._hash(key)
        record = Key(key_id=key_id(key), created_at=now, expires_at=None, revoked_at=None)
        tx.execute(
            "INSERT INTO api_keys (key_hash, key_id, client_id, created_at) "
            "VALUES (%s, %s, %s, %s)",
            (key_hash, record.key_id, client.client_id, now),
        )
        self._log_keys(tx, client, [(key_hash, record.key_id)])
        return record

    def _valid_key_hashes(self, tx: Tx, client_id: str) -> list[tuple[str, str]]:
        now = self._clock()
        rows = tx.all(
            "SELECT key_hash, key_id FROM api_keys WHERE client_id = %s "
            "AND (revoked_at IS NULL OR revoked_at > %s) "
            "AND (expires_at IS NULL OR expires_at > %s)",
            (client_id, now, now),
        )
        return [(h, k) for h, k in rows]

    def _log_keys(self, tx: Tx, client: Client, keys: list[tuple[str, str]]) -> None:
        """Log the current state of ``keys``: an upsert while they validate, else a delete."""
        payloads = []
        for key_hash, kid in keys:
            row = tx.one(
                "SELECT expires_at, revoked_at FROM api_keys WHERE key_hash = %s", (key_hash,)
            )
            if client.status == ACTIVE and row is not None:
                payloads.append(
                    {
                        "op": "upsert",
                        "key_hash": key_hash,
                        "entry": _entry(key_hash, kid, _earliest(*row), client),
                    }
                )
            else:
                payloads.append(_deleted(key_hash, client.client_id))
        self._log(tx, payloads)

    def _log(self, tx: Tx, payloads: list[dict[str, Any]]) -> None:
        now = self._clock()
        for payload in payloads:
            tx.execute(
                "INSERT INTO changes (at, payload) VALUES (%s, %s)",
                (now, json.dumps(payload, sort_keys=True)),
            )


def _get_client(tx: Tx, client_id: str) -> Client:
    row = tx.one(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id = %s", (client_id,))
    if row is None:
        raise NotFoundError(f"no client {client_id!r}")
    return _client(row)


def _client(row: Sequence[Any]) -> Client:
    client_id, name, email, roles, status, created_at, updated_at = row
    return Client(client_id, name, email, tuple(json.loads(roles)), status, created_at, updated_at)


def _version(tx: Tx) -> int:
    row = tx.one("SELECT MAX(version) FROM changes")
    return int(row[0]) if row and row[0] is not None else 0


def _deleted(key_hash: str, client_id: str) -> dict[str, Any]:
    return {"op": "delete", "key_hash": key_hash, "client_id": client_id}


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def identity(client: Client) -> dict[str, Any]:
    """A client as the verification API shows it."""
    return {
        "client_id": client.client_id,
        "client_name": client.name,
        "roles": list(client.roles),
        "status": client.status,
    }


def _entry(key_hash: str, kid: str, valid_until: float | None, client: Client) -> dict[str, Any]:
    return {
        "key_hash": key_hash,
        "key_id": kid,
        "valid_until": iso(valid_until),
        "client": identity(client),
    }


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1e6):06d}Z"
    )
