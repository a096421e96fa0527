"""One small database API over SQLite (the zero-set-up default) and PostgreSQL (several registry
replicas on one database), with versioned migrations.

Operations are plain functions over a ``Tx``, run in a worker thread inside one transaction: they
commit together or not at all, so a crash never leaves half a change acknowledged. A read
operation sees one snapshot of the database throughout (PostgreSQL: REPEATABLE READ READ ONLY).
A read that is one statement runs without a transaction (one round trip; a statement sees one
snapshot by itself), on the event loop for PostgreSQL. Long reads (the snapshot) get a
connection of their own and a read-only snapshot of the whole database. SQL is written once,
with ``%s`` placeholders, and adapted for SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]
Row = tuple[Any, ...]


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

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cursor.execute(self._adapt(sql), tuple(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cursor.execute(self._adapt(sql), tuple(params))
        return [tuple(row) for row in self._cursor.fetchall()]

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for each of ``rows`` (pipelined by PostgreSQL's driver)."""
        if rows:
            self._cursor.executemany(self._adapt(sql), [tuple(row) for row in rows])

    def notify(self, channel: str, payload: str) -> None:
        """Tell other processes listening on ``channel``, at commit (PostgreSQL only: SQLite has
        no such channel, and its followers poll)."""
        if self.dialect == "postgresql":
            self._cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def _adapt(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.dialect == "sqlite" else sql


class Snapshot(Tx):
    """A read-only view of the whole database as of one moment, on a connection of its own, for
    reads too long to hold a pooled connection. Blocking: use it from a worker thread."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        super().__init__(connection.cursor(), dialect)
        self._connection = connection

    def batches(self, sql: str, params: Sequence[Any], size: int) -> Iterator[list[Row]]:
        """The rows of one query, ``size`` at a time, from a server-side cursor (PostgreSQL), so
        that no more than a batch is ever held in memory."""
        if self.dialect == "postgresql":
            cursor = self._connection.cursor(name="snapshot")
        else:
            cursor = self._connection.cursor()
        try:
            cursor.execute(self._adapt(sql), tuple(params))
            while rows := cursor.fetchmany(size):
                yield [tuple(row) for row in rows]
        finally:
            cursor.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the transaction only read: nothing to keep
            self._cursor.execute("ROLLBACK")
        _close_quietly(self._connection)


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
    (
        # The change log is pruned; what was pruned is remembered, so that the current version
        # survives an empty log and a follower from before the cut is told to resync. Pruning
        # walks the log in version order (by age too), so the primary key serves it.
        2,
        """
        CREATE TABLE change_log_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            pruned_through BIGINT NOT NULL
        );
        INSERT INTO change_log_state (id, pruned_through) VALUES (1, 0)
    """,
    ),
    (
        # Per-client rate limits, and the usage ledger. A usage row is one key's figures for
        # one minute (Unix seconds of its start), summed over every batch that named it;
        # denials, an open set of reasons, have rows of their own. The figures are kept by the
        # ids the batches name, not tied to clients or keys: a deleted client's last minutes
        # stay billable. usage_batches remembers the batch ids counted (for a while), which is
        # what counts a batch once; key_last_used is each key's newest minute with usage.
        3,
        """
        ALTER TABLE clients ADD COLUMN rate_limit_requests BIGINT
            CHECK (rate_limit_requests > 0);
        ALTER TABLE clients ADD COLUMN rate_limit_unit TEXT
            CHECK (rate_limit_unit IN ('second', 'minute', 'hour', 'day'));
        CREATE TABLE usage_batches (
            batch_id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            entries INTEGER NOT NULL
        );
        CREATE INDEX usage_batches_by_age ON usage_batches (received_at);
        CREATE TABLE usage_minutes (
            client_id TEXT NOT NULL,
            minute BIGINT NOT NULL,
            key_id TEXT NOT NULL,
            allowed BIGINT NOT NULL,
            upstream_1xx BIGINT NOT NULL,
            upstream_2xx BIGINT NOT NULL,
            upstream_3xx BIGINT NOT NULL,
            upstream_4xx BIGINT NOT NULL,
            upstream_5xx BIGINT NOT NULL,
            upstream_unknown BIGINT NOT NULL,
            request_bytes BIGINT NOT NULL,
            response_bytes BIGINT NOT NULL,
            PRIMARY KEY (client_id, minute, key_id)
        );
        CREATE TABLE usage_denied (
            client_id TEXT NOT NULL,
            minute BIGINT NOT NULL,
            key_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (client_id, minute, key_id, reason)
        );
        CREATE TABLE key_last_used (
            key_id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            minute BIGINT NOT NULL
        )
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
        self._idle_async: asyncio.LifoQueue[Any] = asyncio.LifoQueue(maxsize=size)
        self._open_slots = self._open_async_slots = size  # not closed yet, in use or idle
        for _ in range(size):
            self._idle.put(None)  # connections are opened on first use
            self._idle_async.put_nowait(None)

    async def run(
        self,
        operation: Callable[[Tx], T],
        write: bool = False,
        committed: Callable[[], None] | None = None,
        *,
        logged: bool = True,
    ) -> T:
        """Run ``operation`` in one transaction in a worker thread. ``committed`` is then called
        in that thread, even if the caller was cancelled meanwhile (the write happened). A write
        that is not ``logged`` never appends to the change log, and so does not take turns on
        it with those that do."""
        return await asyncio.to_thread(self.run_sync, operation, write, committed, logged=logged)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """The rows of one statement, without a transaction around it: one round trip, and
        still a consistent read, since a statement sees one snapshot by itself. PostgreSQL
        answers it on the event loop (the hot path, verification, skips the hop to a thread
        and back); SQLite in a worker thread."""
        if self.dialect == "sqlite":
            return await asyncio.to_thread(self.run_sync, lambda tx: tx.all(sql, params), None)
        # A caller that gives up (its client left) does not cut the query short, so the
        # connection goes back to the pool in a known state.
        task = asyncio.ensure_future(self._query(sql, params))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:
            async with asyncio.timeout(self._timeout):
                connection = await self._idle_async.get()
        except TimeoutError:
            raise DatabaseError("no database connection free within the timeout") from None
        try:
            connection = connection or await self._connect_async()
            cursor = await connection.execute(sql, tuple(params))
            return [tuple(row) for row in await cursor.fetchall()]
        except Exception:
            await _close_quietly_async(connection)
            connection = None  # a failed connection is replaced on next use
            raise
        finally:
            self._idle_async.put_nowait(connection)

    def run_sync(
        self,
        operation: Callable[[Tx], T],
        write: bool | None = False,
        committed: Callable[[], None] | None = None,
        *,
        logged: bool = True,
    ) -> T:
        """``write`` None: a single statement without a transaction (see ``query``)."""
        try:
            connection = self._idle.get(timeout=self._timeout)
        except queue.Empty:
            raise DatabaseError("no database connection free within the timeout") from None
        try:
            connection = connection or self._connect()
            if write is None:
                result = self._statement(connection, operation)
            else:
                result = self._transaction(connection, operation, write, logged)
        except Exception:
            _close_quietly(connection)
            connection = None  # a failed connection is replaced on next use
            raise
        finally:
            self._idle.put(connection)
        if committed is not None:
            committed()
        return result

    def snapshot(self) -> Snapshot:
        """Open a read-only snapshot on a new connection (blocking); the caller closes it."""
        connection = self._connect()
        try:
            cursor = connection.cursor()
            if self.dialect == "postgresql":
                cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                # Compiling a long read's plan costs more at its start than it saves.
                cursor.execute("SET LOCAL jit = off")
            else:
                cursor.execute("BEGIN")  # SQLite's snapshot starts at the first read
            cursor.close()
        except Exception:
            _close_quietly(connection)
            raise
        return Snapshot(connection, self.dialect)

    @contextlib.asynccontextmanager
    async def notifications(self, channel: str) -> AsyncIterator[AsyncIterator[str]]:
        """Listen on ``channel`` (PostgreSQL) on a connection of its own, on the event loop; the
        iterator yields each payload and raises when the connection fails."""
        if self.dialect != "postgresql":
            raise DatabaseError("only PostgreSQL has notifications")
        connection = await self._connect_async()
        try:
            await connection.execute(f'LISTEN "{channel}"')
            yield (notify.payload async for notify in connection.notifies())
        finally:
            await connection.close()

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

        # Not logged: the change log it would lock may not exist yet; the advisory lock
        # (PostgreSQL) and SQLite's single writer serialise migrations instead.
        return self.run_sync(apply, write=True, logged=False)

    def close(self) -> None:
        """Close the pool's connections, those in use too once they are given back (within
        the timeout): an operation cut short (its task cancelled at shutdown) still ends in
        its thread and returns its connection after this starts. The pool lends none after."""
        deadline = time.monotonic() + self._timeout
        while self._open_slots:
            try:
                connection = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return  # still in use: its thread holds it past the timeout
            self._open_slots -= 1
            _close_quietly(connection)

    async def aclose(self) -> None:
        """``close``, and the same for the event loop's connections (a shielded query may
        still be running)."""
        await asyncio.to_thread(self.close)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                while self._open_async_slots:
                    connection = await self._idle_async.get()
                    self._open_async_slots -= 1
                    await _close_quietly_async(connection)

    def _connect(self) -> Any:
        try:
            return self._open()
        except DatabaseError:
            raise
        except Exception as exc:  # the driver's own error types differ; the message is the point
            raise DatabaseError(f"cannot open the {self.dialect} database: {exc}") from exc

    async def _connect_async(self) -> Any:
        import psycopg  # noqa: PLC0415 (PostgreSQL is optional; _connect has said so)

        try:
            return await psycopg.AsyncConnection.connect(
                self._target, autocommit=True, **self._connect_options()
            )
        except Exception as exc:
            raise DatabaseError(f"cannot open the {self.dialect} database: {exc}") from exc

    def _connect_options(self) -> dict[str, Any]:
        # Keepalives find a connection whose peer vanished without a reset (a listener would
        # otherwise wait forever on a dead socket).
        return {
            "connect_timeout": max(1, int(self._timeout)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }

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
        # Autocommit, so that a single-statement read is one round trip; transactions are
        # explicit (BEGIN ... COMMIT) for both dialects.
        return psycopg.connect(self._target, autocommit=True, **self._connect_options())

    def _statement(self, connection: Any, operation: Callable[[Tx], T]) -> T:
        cursor = connection.cursor()
        try:
            return operation(Tx(cursor, self.dialect))
        finally:
            cursor.close()

    def _transaction(
        self, connection: Any, operation: Callable[[Tx], T], write: bool, logged: bool
    ) -> T:
        cursor = connection.cursor()
        try:
            if self.dialect == "sqlite":
                # IMMEDIATE takes the write lock up front, so writers queue instead of failing.
                # A read's snapshot (WAL) starts at its first statement and lasts to its end.
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            elif not write:
                # Every statement of a read sees the same snapshot; read-only transactions
                # at this level never fail to serialise.
                cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            else:
                cursor.execute("BEGIN")
                if logged:
                    # Writers take turns on the change log, so change versions become visible
                    # in the order they were numbered and a reader following it never skips one.
                    cursor.execute("LOCK TABLE changes IN SHARE ROW EXCLUSIVE MODE")
            result = operation(Tx(cursor, self.dialect))
            cursor.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):  # a broken connection is dropped by the caller
                cursor.execute("ROLLBACK")
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


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded query's outcome as seen: the caller who wanted it may have left."""
    if not task.cancelled():
        task.exception()


async def _close_quietly_async(connection: Any) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.close()
