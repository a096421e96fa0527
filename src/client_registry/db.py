"""One small database API over SQLite (the zero-set-up default) and PostgreSQL (several registry
replicas on one database), with versioned migrations.

Operations are plain functions over a ``Tx``, run in a worker thread inside one transaction: they
commit together or not at all, so a crash never leaves half a change acknowledged. SQL is written
once, with ``%s`` placeholders, and adapted for SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]


class DatabaseError(RuntimeError):
    """The database cannot be used; the message says why."""


class Tx:
    """A transaction: execute statements and read rows."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(self._adapt(sql), tuple(params))
        return int(self._cursor.rowcount)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cursor.execute(self._adapt(sql), tuple(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(self._adapt(sql), tuple(params))
        return [tuple(row) for row in self._cursor.fetchall()]

    def _adapt(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.dialect == "sqlite" else sql


# Versioned schema migrations, applied in order and recorded in schema_migrations. Never edit a
# released one: add the next version. ``{serial}`` is the dialect's auto-increment key.
_SERIAL: dict[Dialect, str] = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE clients (
            client_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            email TEXT NOT NULL,
            roles TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE api_keys (
            key_hash TEXT PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            client_id TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        );
        CREATE INDEX api_keys_by_client ON api_keys (client_id);
        CREATE TABLE changes (
            version {serial},
            at DOUBLE PRECISION NOT NULL,
            payload TEXT NOT NULL
        );
    """,
    ),
]


class Database:
    """A bounded pool of connections; ``run`` executes one operation in one transaction."""

    def __init__(self, url: str, pool_size: int = 4, timeout: float = 5.0) -> None:
        self.dialect, self._target = _parse_url(url)
        self._timeout = timeout
        size = 1 if self.dialect == "sqlite" else pool_size  # SQLite has a single writer anyway
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue(maxsize=size)
        for _ in range(size):
            self._idle.put(None)  # connections are opened on first use

    async def run(self, operation: Callable[[Tx], T], write: bool = False) -> T:
        return await asyncio.to_thread(self.run_sync, operation, write)

    def run_sync(self, operation: Callable[[Tx], T], write: bool = False) -> T:
        try:
            connection = self._idle.get(timeout=self._timeout)
        except queue.Empty:
            raise DatabaseError("no database connection free within the timeout") from None
        try:
            connection = connection or self._connect()
            result = self._transaction(connection, operation, write)
        except Exception:
            _close_quietly(connection)
            connection = None  # a failed connection is replaced on next use
            raise
        finally:
            self._idle.put(connection)
        return result

    def migrate(self) -> int:
        """Apply pending migrations; return the schema version."""

        def apply(tx: Tx) -> int:
            if tx.dialect == "postgresql":
                # Replicas starting together: one migrates, the others wait for it.
                tx.execute("SELECT pg_advisory_xact_lock(727272)")
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            row = tx.one("SELECT MAX(version) FROM schema_migrations")
            current = row[0] if row and row[0] is not None else 0
            for version, template in MIGRATIONS:
                if version > current:
                    script = template.format(serial=_SERIAL[tx.dialect])
                    for statement in filter(str.strip, script.split(";")):
                        tx.execute(statement)
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                        (version, time.time()),
                    )
                    current = version
            return int(current)

        # Not a "write": the change log it would lock may not exist yet; the advisory lock
        # (PostgreSQL) and SQLite's single writer serialise migrations instead.
        return self.run_sync(apply)

    def close(self) -> None:
        while not self._idle.empty():
            _close_quietly(self._idle.get_nowait())

    def _connect(self) -> Any:
        try:
            return self._open()
        except DatabaseError:
            raise
        except Exception as exc:  # the driver's own error types differ; the message is the point
            raise DatabaseError(f"cannot open the {self.dialect} database: {exc}") from exc

    def _open(self) -> Any:
        if self.dialect == "sqlite":
            connection = sqlite3.connect(
                self._target, check_same_thread=False, isolation_level=None, timeout=self._timeout
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=FULL")  # an acknowledged write is on disk
            return connection
        try:
            import psycopg  # noqa: PLC0415 (PostgreSQL is optional)
        except ImportError:
            raise DatabaseError(
                "a postgresql:// database needs the postgresql extra: "
                "pip install 'authz-service[postgresql]'"
            ) from None
        return psycopg.connect(self._target, connect_timeout=max(1, int(self._timeout)))

    def _transaction(self, connection: Any, operation: Callable[[Tx], T], write: bool) -> T:
        cursor = connection.cursor()
        try:
            if self.dialect == "sqlite":
                # IMMEDIATE takes the write lock up front, so writers queue instead of failing.
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            elif write:
                # Writers take turns on the change log, so change versions become visible in
                # the order they were numbered and a reader following it never skips one.
                cursor.execute("LOCK TABLE changes IN SHARE ROW EXCLUSIVE MODE")
            result = operation(Tx(cursor, self.dialect))
            connection.commit() if self.dialect == "postgresql" else cursor.execute("COMMIT")
        except BaseException:
            if self.dialect == "sqlite":
                if connection.in_transaction:
                    cursor.execute("ROLLBACK")
            else:
                connection.rollback()
            raise
        else:
            return result
        finally:
            cursor.close()


def _parse_url(url: str) -> tuple[Dialect, str]:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise DatabaseError("sqlite URL without a file: use sqlite:///path/to/registry.db")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise DatabaseError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:/// or postgresql://"
    )


def _close_quietly(connection: Any) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail too
            connection.close()
