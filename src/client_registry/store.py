"""The registry's operations. Each runs in one transaction and appends what it changed about
valid keys to the change log, which feeds the snapshot's delta form and the change feed.

Every read that answers a follower says which change-log version it reflects, read in the same
database snapshot as the rows themselves: a follower can then tell an answer from before a change
from one after it. The log is pruned; ``change_log_state`` remembers how far, so the current
version never goes back, even when the log is empty.

Keys are stored only as hashes (SHA-256, or HMAC-SHA256 with a server-side pepper). The plaintext
is returned once, by the operation that creates it.

Usage batches are written apart from all that: they change nothing that validates, so they never
wait for the change log, and each is counted once, decided by the database (see
``record_usage``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from authz_service import apikeys
from authz_service.contract import identity_document
from authz_service.model import RateLimit
from client_registry.db import Database, Snapshot, Tx
from client_registry.usage import UPSTREAM_CLASSES, Figures, Row, Span, UsageBatch

T = TypeVar("T")
ACTIVE, SUSPENDED = "active", "suspended"
CHANGES_CHANNEL = "client_registry_changes"  # PostgreSQL NOTIFY channel: "a change was logged"
DeleteReason = Literal["revoked", "expired", "suspended", "deleted"]
_CLIENT_COLUMNS = (
    "client_id, name, email, roles, status, created_at, updated_at, rate_limit_requests, "
    "rate_limit_unit"
)
# The current version: the newest change, or where pruning stopped if the log is empty. Needs
# change_log_state as ``s`` in the FROM clause.
_VERSION = "COALESCE((SELECT MAX(version) FROM changes), s.pruned_through)"
_VERIFY = (
    f"SELECT {_VERSION}, k.key_hash, k.expires_at, k.revoked_at, "
    f"{', '.join('c.' + c.strip() for c in _CLIENT_COLUMNS.split(','))} "
    "FROM change_log_state s LEFT JOIN api_keys k ON k.key_hash = %s "
    "LEFT JOIN clients c ON c.client_id = k.client_id"
)
_PRUNE_BATCH = 5000  # rows per pruning transaction, so writers never wait long behind one
_UPSTREAM_COLUMNS = [f"upstream_{name}" for name in UPSTREAM_CLASSES]
_FIGURE_COLUMNS = ["allowed", *_UPSTREAM_COLUMNS, "request_bytes", "response_bytes"]
_ADD_MINUTES = (
    f"INSERT INTO usage_minutes (client_id, minute, key_id, {', '.join(_FIGURE_COLUMNS)}) "
    f"VALUES (%s, %s, %s{', %s' * len(_FIGURE_COLUMNS)}) "
    "ON CONFLICT (client_id, minute, key_id) DO UPDATE SET "
    + ", ".join(f"{c} = usage_minutes.{c} + excluded.{c}" for c in _FIGURE_COLUMNS)
)
_ADD_DENIED = (
    "INSERT INTO usage_denied (client_id, minute, key_id, reason, count) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (client_id, minute, key_id, reason) "
    "DO UPDATE SET count = usage_denied.count + excluded.count"
)
_LAST_USED = (
    "INSERT INTO key_last_used (key_id, client_id, minute) VALUES (%s, %s, %s) "
    "ON CONFLICT (key_id) DO UPDATE SET client_id = excluded.client_id, "
    "minute = excluded.minute WHERE excluded.minute > key_last_used.minute"
)


class NotFoundError(LookupError):
    pass


class ConflictError(RuntimeError):
    pass


class TooMuchUsageError(ValueError):
    """A usage report would hold more figures than it may."""


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    email: str
    roles: tuple[str, ...]
    status: str
    created_at: float
    updated_at: float
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class Key:
    """What may be shown about a key: never its hash or plaintext."""

    key_id: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: int | None = None  # the start of its newest minute with usage (Unix time)


@dataclass(frozen=True, slots=True)
class Verification:
    version: int  # the change-log version this answer reflects
    valid: bool
    reason: str | None = None  # unknown, revoked, suspended, expired
    client: Client | None = None
    valid_until: float | None = None


@dataclass(frozen=True, slots=True)
class LogState:
    pruned_through: int  # changes up to this version are gone from the log
    current: int


@dataclass(frozen=True, slots=True)
class ChangePage:
    state: LogState
    changes: list[tuple[int, str]]  # (version, the change as JSON text), in version order


class KeySnapshot:
    """Every key that validates now, with its client, read in one database snapshot: ``version``
    is the change-log version it reflects. Blocking: use it from a worker thread, then close it."""

    def __init__(self, snapshot: Snapshot, now: float) -> None:
        self._snapshot, self._now = snapshot, now
        self.version = int(_present(snapshot.one(f"SELECT {_VERSION} FROM change_log_state s"))[0])

    def entries(self, size: int) -> Iterator[list[str]]:
        """The entries as JSON text, ``size`` at a time, a client's keys next to each other."""
        # In client order, a merge join of two index scans starts at once and streams (key
        # order would cost a random read per key); and a client is serialised once, not per key.
        rows = self._snapshot.batches(
            "SELECT k.key_hash, k.key_id, k.expires_at, k.revoked_at, c.client_id, c.name, "
            "c.roles, c.rate_limit_requests, c.rate_limit_unit "
            "FROM api_keys k JOIN clients c ON c.client_id = k.client_id "
            "WHERE c.status = %s AND (k.revoked_at IS NULL OR k.revoked_at > %s) "
            "AND (k.expires_at IS NULL OR k.expires_at > %s) ORDER BY c.client_id",
            (ACTIVE, self._now, self._now),
            size,
        )
        dumps = json.dumps
        last_client, client = "", ""
        for batch in rows:
            entries = []
            for key_hash, kid, expires_at, revoked_at, client_id, name, roles, *limit in batch:
                if client_id != last_client:
                    # identity_document's form, written out: roles is stored as JSON already,
                    # and parsing and dumping it again for each client would add a tenth to a
                    # large snapshot's time. The tests hold the two forms equal.
                    last_client, requests, unit = client_id, *limit
                    client = (
                        f'{{"client_id": {dumps(client_id)}, "client_name": {dumps(name)}, '
                        f'"roles": {roles}, "status": "{ACTIVE}"'
                        + (
                            ""
                            if requests is None
                            else f', "rate_limit": {{"requests_per_unit": {int(requests)}, '
                            f'"unit": {dumps(unit)}}}'
                        )
                        + "}"
                    )
                entries.append(
                    f'{{"key_hash": {dumps(key_hash)}, "key_id": {dumps(kid)}, "valid_until": '
                    f"{dumps(iso(_earliest(expires_at, revoked_at)))}, "
                    f'"client": {client}}}'
                )
            yield entries

    def close(self) -> None:
        self._snapshot.close()


class KeyHasher:
    def __init__(self, pepper: str = "") -> None:
        self._pepper = pepper.encode()

    def __call__(self, key: str) -> str:
        if self._pepper:
            return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()
        return apikeys.hash_key(key)


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
        self, name: str, email: str, roles: Sequence[str], rate_limit: RateLimit | None = None
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
            rate_limit=rate_limit,
        )
        key = apikeys.generate(self._prefix)

        def create(tx: Tx) -> Key:
            tx.execute(
                f"INSERT INTO clients ({_CLIENT_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    client.client_id,
                    name,
                    email,
                    json.dumps(list(roles)),
                    ACTIVE,
                    now,
                    now,
                    *_limit_columns(rate_limit),
                ),
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
                "SELECT k.key_id, k.created_at, k.expires_at, k.revoked_at, u.minute "
                "FROM api_keys k LEFT JOIN key_last_used u ON u.key_id = k.key_id "
                "WHERE k.client_id = %s ORDER BY k.created_at",
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
                rate_limit=changes.get("rate_limit", old.rate_limit),
            )
            tx.execute(
                "UPDATE clients SET name = %s, email = %s, roles = %s, status = %s, "
                "updated_at = %s, rate_limit_requests = %s, rate_limit_unit = %s "
                "WHERE client_id = %s",
                (
                    new.name,
                    new.email,
                    json.dumps(list(new.roles)),
                    new.status,
                    new.updated_at,
                    *_limit_columns(new.rate_limit),
                    client_id,
                ),
            )
            identity_changed = (old.name, old.roles, old.status, old.rate_limit) != (
                new.name,
                new.roles,
                new.status,
                new.rate_limit,
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
            self._log(tx, [_deleted(h, client_id, "deleted") for h, _ in hashes])

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
            self._log(tx, [_deleted(h, client_id, "revoked") for h, _ in hashes])

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
                self._log(tx, [_deleted(h, client_id, "revoked") for h, _ in old])
            return self._add_key(tx, client, key, now)

        return key, await self._write(regenerate)

    # --- usage ---------------------------------------------------------------------------------
    async def record_usage(self, batch: UsageBatch) -> bool:
        """Count a batch, unless its id has been counted already: True if so (nothing is
        counted then). The id is inserted in the same transaction as the figures, so of two
        processes racing with one batch, the second waits on the first's insert and then finds
        it: a batch is counted once, or, if the transaction fails, not at all. Rows are written
        in key order, so that batches touching the same rows never deadlock."""
        now = self._clock()
        minutes, denied = [], []
        last_used: dict[str, tuple[str, int]] = {}
        for (client_id, minute, kid), figures in sorted(batch.usage.items()):
            upstream = [figures.upstream.get(name, 0) for name in UPSTREAM_CLASSES]
            minutes.append(
                (
                    client_id,
                    minute,
                    kid,
                    figures.allowed,
                    *upstream,
                    figures.request_bytes,
                    figures.response_bytes,
                )
            )
            denied += [
                (client_id, minute, kid, reason, count)
                for reason, count in sorted(figures.denied.items())
                if count
            ]
            if last_used.get(kid, ("", -1))[1] < minute:
                last_used[kid] = (client_id, minute)

        def record(tx: Tx) -> bool:
            inserted = tx.execute(
                "INSERT INTO usage_batches (batch_id, source, received_at, entries) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (batch_id) DO NOTHING",
                (batch.batch_id, batch.source, now, batch.entries),
            )
            if not inserted:
                return True
            tx.execute_many(_ADD_MINUTES, minutes)
            tx.execute_many(_ADD_DENIED, denied)
            tx.execute_many(_LAST_USED, [(k, c, m) for k, (c, m) in sorted(last_used.items())])
            return False

        return await self._db.run(record, write=True, logged=False)

    async def usage(self, client_id: str, within: Span, max_rows: int) -> list[Row]:
        """The client's usage in ``within``, per key and bucket, in key then time order: of a
        client the registry has, or had (its usage outlives it). ``TooMuchUsageError`` beyond
        ``max_rows`` (key, bucket) figures."""
        params = (client_id, within.start, within.end, max_rows + 1)
        where = "WHERE client_id = %s AND minute >= %s AND minute < %s"
        # Integer division on both dialects (minutes are never negative); hours and days are
        # whole multiples of them in Unix time, which has no leap seconds.
        bucket = f"minute / {int(within.bucket)} * {int(within.bucket)}"

        def read(tx: Tx) -> list[Row]:
            if (
                tx.one("SELECT 1 FROM clients WHERE client_id = %s", (client_id,)) is None
                and tx.one("SELECT 1 FROM usage_minutes WHERE client_id = %s LIMIT 1", (client_id,))
                is None
            ):
                raise NotFoundError(f"no client {client_id!r}, and no usage of one")
            sums = ", ".join(f"SUM({c})" for c in _FIGURE_COLUMNS)
            rows = tx.all(
                f"SELECT key_id, {bucket}, {sums} FROM usage_minutes {where} "
                "GROUP BY 1, 2 ORDER BY 1, 2 LIMIT %s",
                params,
            )
            denied = tx.all(
                f"SELECT key_id, {bucket}, reason, SUM(count) FROM usage_denied "
                f"{where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT %s",
                params,
            )
            if len(rows) > max_rows or len(denied) > max_rows:
                raise TooMuchUsageError(f"more than {max_rows} figures")
            return _usage_rows(rows, denied)

        return await self._db.run(read)

    async def prune_usage_batches(self, retention: float) -> int:
        """Forget the ids of batches counted more than ``retention`` seconds ago; return how
        many. A batch sent again after that is counted again."""
        cut = self._clock() - retention
        dropped = 0
        while True:
            count = await self._db.run(
                lambda tx: tx.execute(
                    "DELETE FROM usage_batches WHERE batch_id IN (SELECT batch_id FROM "
                    "usage_batches WHERE received_at < %s ORDER BY received_at LIMIT %s)",
                    (cut, _PRUNE_BATCH),
                ),
                write=True,
                logged=False,
            )
            dropped += count
            if count < _PRUNE_BATCH:
                return dropped

    # --- verification --------------------------------------------------------------------------
    async def verify(self, key: str) -> Verification:
        # One statement, so that the version and the rows come from one snapshot of the database.
        rows = await self._db.query(_VERIFY, (self._hash(key),))
        row = _present(rows[0] if rows else None)
        version, found, expires_at, revoked_at = int(row[0]), row[1], row[2], row[3]
        if found is None:
            return Verification(version, valid=False, reason="unknown")
        now = self._clock()
        if revoked_at is not None and revoked_at <= now:
            return Verification(version, valid=False, reason="revoked")
        if expires_at is not None and expires_at <= now:
            return Verification(version, valid=False, reason="expired")
        client = _client(row[4:])
        if client.status != ACTIVE:
            return Verification(version, valid=False, reason="suspended")
        return Verification(
            version, valid=True, client=client, valid_until=_earliest(expires_at, revoked_at)
        )

    def open_snapshot(self) -> KeySnapshot:
        """Blocking (a worker thread's job): a consistent snapshot of every valid key."""
        snapshot = self._db.snapshot()
        try:
            return KeySnapshot(snapshot, self._clock())
        except BaseException:
            snapshot.close()
            raise

    async def log_state(self) -> LogState:
        return (await self.changes_since(None, 1)).state

    async def changes_since(self, version: int | None, limit: int) -> ChangePage:
        """Changes after ``version`` (at most ``limit``; none for None), with the log's state as
        of the same snapshot."""
        rows = await self._db.query(
            f"SELECT s.pruned_through, {_VERSION}, c.version, c.payload "
            "FROM change_log_state s LEFT JOIN (SELECT version, payload FROM changes "
            "WHERE version > %s ORDER BY version LIMIT %s) c ON 1 = 1 ORDER BY c.version",
            (-1 if version is None else version, 0 if version is None else limit),
        )
        first = _present(rows[0] if rows else None)
        return ChangePage(
            LogState(int(first[0]), int(first[1])),
            [(int(v), _with_version(int(v), p)) for _, _, v, p in rows if v is not None],
        )

    async def prune(self, retention: float, max_rows: int) -> int:
        """Drop changes older than ``retention`` seconds and beyond the newest ``max_rows`` (0:
        no limit of that kind); return how many were dropped. Followers from before the cut
        get 410 and reload the snapshot."""
        now = self._clock()

        def target(tx: Tx) -> tuple[int, int]:
            row = _present(tx.one(f"SELECT s.pruned_through, {_VERSION} FROM change_log_state s"))
            pruned, cut = int(row[0]), int(row[0])
            if max_rows:
                newest_dropped = tx.one(
                    "SELECT version FROM changes ORDER BY version DESC LIMIT 1 OFFSET %s",
                    (max_rows,),
                )
                cut = max(cut, int(newest_dropped[0])) if newest_dropped else cut
            if retention:
                # The first change young enough to keep, walking the log in version order:
                # only the rows to be dropped are visited on the way.
                kept = tx.one(
                    "SELECT version FROM changes WHERE version > %s AND at >= %s "
                    "ORDER BY version LIMIT 1",
                    (cut, now - retention),
                )
                cut = int(kept[0]) - 1 if kept else int(row[1])
            return pruned, cut

        pruned, cut = await self._db.run(target)
        dropped = 0
        while pruned < cut:
            upto = min(cut, pruned + _PRUNE_BATCH)

            def drop(tx: Tx, upto: int = upto) -> int:
                count = tx.execute("DELETE FROM changes WHERE version <= %s", (upto,))
                tx.execute(
                    "UPDATE change_log_state SET pruned_through = %s WHERE pruned_through < %s",
                    (upto, upto),
                )
                return count

            dropped += await self._db.run(drop, write=True)
            pruned = upto
        return dropped

    # --- helpers -------------------------------------------------------------------------------
    async def _write(self, operation: Callable[[Tx], T]) -> T:
        # on_change runs in the worker thread right after the commit, so change streams wake
        # now rather than at their next poll, even if the request was abandoned meanwhile.
        return await self._db.run(operation, write=True, committed=self._on_change)

    def _add_key(self, tx: Tx, client: Client, key: str, now: float) -> Key:
        key_hash = self._hash(key)
        record = Key(
            key_id=apikeys.key_id(apikeys.digest(key)),
            created_at=now,
            expires_at=None,
            revoked_at=None,
        )
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
                reason: DeleteReason = "deleted" if row is None else "suspended"
                payloads.append(_deleted(key_hash, client.client_id, reason))
        self._log(tx, payloads)

    def _log(self, tx: Tx, payloads: list[dict[str, Any]]) -> None:
        now = self._clock()
        last = None
        for payload in payloads:
            last = tx.one(
                "INSERT INTO changes (at, payload) VALUES (%s, %s) RETURNING version",
                (now, json.dumps(payload, sort_keys=True)),
            )
        if last is not None:  # other registry processes read the log when this commits
            tx.notify(CHANGES_CHANNEL, str(last[0]))


def _get_client(tx: Tx, client_id: str) -> Client:
    row = tx.one(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id = %s", (client_id,))
    if row is None:
        raise NotFoundError(f"no client {client_id!r}")
    return _client(row)


def _client(row: Sequence[Any]) -> Client:
    client_id, name, email, roles, status, created_at, updated_at, requests, unit = row
    return Client(
        client_id,
        name,
        email,
        tuple(json.loads(roles)),
        status,
        created_at,
        updated_at,
        _rate_limit(requests, unit),
    )


def _rate_limit(requests: int | None, unit: str | None) -> RateLimit | None:
    return None if requests is None or unit is None else RateLimit(int(requests), unit)


def _limit_columns(rate_limit: RateLimit | None) -> tuple[int | None, str | None]:
    return (None, None) if rate_limit is None else (rate_limit.requests_per_unit, rate_limit.unit)


def _usage_rows(rows: list[tuple[Any, ...]], denied: list[tuple[Any, ...]]) -> list[Row]:
    """Figures from the sums of usage_minutes and usage_denied (PostgreSQL sums to numeric)."""
    reasons: dict[tuple[str, int], dict[str, int]] = {}
    for kid, start, reason, count in denied:
        reasons.setdefault((kid, int(start)), {})[reason] = int(count)
    classes = len(UPSTREAM_CLASSES)
    result = []
    for kid, start, allowed, *sums in rows:
        upstream = {name: int(n) for name, n in zip(UPSTREAM_CLASSES, sums, strict=False) if n}
        figures = Figures(
            int(allowed),
            reasons.get((kid, int(start)), {}),
            upstream,
            int(sums[classes]),
            int(sums[classes + 1]),
        )
        result.append((kid, int(start), figures))
    return result


def _with_version(version: int, payload: str) -> str:
    """A logged change as the feed shows it: its payload (a JSON object) with its version. Text
    is spliced rather than parsed and dumped again: pages of thousands are sent this way."""
    rest = payload.strip()[1:].lstrip()
    return f'{{"version": {version}' + (", " + rest if rest != "}" else "}")


def _present(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if row is None:  # migration 2 inserts the one row; it is never deleted
        raise RuntimeError("change_log_state has no row: the registry's schema is damaged")
    return row


def _deleted(key_hash: str, client_id: str, reason: DeleteReason) -> dict[str, Any]:
    return {"op": "delete", "key_hash": key_hash, "client_id": client_id, "reason": reason}


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def identity(client: Client) -> dict[str, Any]:
    """A client as the verification API shows it."""
    return identity_document(
        client.client_id, client.name, client.roles, client.status, client.rate_limit
    )


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
