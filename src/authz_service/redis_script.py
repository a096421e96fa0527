"""One Lua script in Redis, called over one pipelined connection: the rate limits' client.

A general client (redis-py) costs about 90 us of CPU per command here, more than a whole check
answered from memory; this one writes each call as one pre-encoded RESP command and reads the
replies in order as they arrive, about 15 us. Calls from many checks share the connection:
Redis answers them in the order they were sent.

- ``EVALSHA`` first; a Redis that does not know the script yet (``NOSCRIPT``: a restart, a
  failover) gets it once with ``EVAL``, which also loads it.
- Every call has a timeout. A call that times out fails, and so does the connection (and every
  call waiting on it): the next call opens a new one. A reply that arrives for a call that gave
  up is read and dropped, so the replies never get out of step.
- The URL's password (and user name) and database are honoured; ``rediss://`` is TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

MAX_REPLY_BYTES = 1 << 20  # a reply larger than this is not one of ours: the connection is reset
Reply = int | bytes | list[Any] | None


class RedisError(Exception):
    """Redis failed or answered with an error; the message is ours or Redis's own."""

    safe_to_log = True


class _Replies(asyncio.Protocol):
    """The connection: commands written as they come, replies handed to the waiting calls
    in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self._buffer = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES:
            self.fail(RedisError("a reply over the size limit"))
            return
        while self.waiting:
            try:
                parsed = _parse(self._buffer, 0)
            except RedisError as exc:
                self.fail(exc)
                return
            if parsed is None:
                return  # the rest has not arrived yet
            reply, end = parsed
            del self._buffer[:end]
            call = self.waiting.popleft()
            if not call.done():  # a call that gave up still gets its reply read
                if isinstance(reply, RedisError):
                    call.set_exception(reply)
                else:
                    call.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_waiting(RedisError("the connection to Redis was lost"))

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        call: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting.append(call)
        assert self.transport is not None  # noqa: S101 (sent only once connected)
        self.transport.write(command)
        return call

    def fail(self, error: Exception) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        self._fail_waiting(error)

    def _fail_waiting(self, error: Exception) -> None:
        while self.waiting:
            call = self.waiting.popleft()
            if not call.done():
                call.set_exception(error)


class RedisScript:
    """Calls one script with keys and arguments; use on one event loop."""

    def __init__(self, url: str, script: str, timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._setup = []
        if parts.password:
            credentials = [unquote(parts.password)]
            if parts.username:
                credentials.insert(0, unquote(parts.username))
            self._setup.append(_command("AUTH", *credentials))
        database = parts.path.strip("/")
        if database and database != "0":
            self._setup.append(_command("SELECT", database))
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._timeout = timeout
        self._connection: _Replies | None = None
        self._connecting: asyncio.Task[_Replies] | None = None

    async def call(self, keys: list[str], args: list[int | str]) -> Reply:
        """The script's reply. Raises ``RedisError`` (or ``TimeoutError``, ``OSError``)."""
        try:
            return await self._send(_command("EVALSHA", self._sha, len(keys), *keys, *args))
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._send(_command("EVAL", self._script, len(keys), *keys, *args))

    async def load(self) -> None:
        """Connect and load the script, so that the first calls need neither."""
        await self._send(_command("SCRIPT", "LOAD", self._script))

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.fail(RedisError("closed"))

    async def _send(self, command: bytes) -> Reply:
        connection = await self._connected()
        call = connection.send(command)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._timeout, self._expire, connection, call)
        try:
            return await call
        finally:
            timer.cancel()

    def _expire(self, connection: _Replies, call: asyncio.Future[Reply]) -> None:
        if not call.done():
            # Redis is slow or the connection is stuck: start afresh.
            connection.fail(TimeoutError("Redis did not answer in time"))

    async def _connected(self) -> _Replies:
        connection = self._connection
        if connection is not None and not connection.lost:
            return connection
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            _, connection = await loop.create_connection(
                _Replies,
                self._host,
                self._port,
                ssl=ssl.create_default_context() if self._tls else None,
            )
        try:
            async with asyncio.timeout(self._timeout):
                for command in self._setup:
                    await connection.send(command)
        except BaseException:
            connection.fail(RedisError("could not set up the connection"))
            raise
        self._connection = connection
        return connection


def _command(*parts: object) -> bytes:
    """A command in RESP: an array of bulk strings."""
    encoded = [str(part).encode() if not isinstance(part, bytes) else part for part in parts]
    out = [b"*%d\r\n" % len(encoded)]
    for part in encoded:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _parse(buffer: bytearray, start: int) -> tuple[Reply | RedisError, int] | None:
    """One RESP reply at ``start``: the value and where it ends, or None if incomplete."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, line, after = buffer[start : start + 1], bytes(buffer[start + 1 : line_end]), line_end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")[:200]), after
    if kind == b":":
        return _integer(line), after
    if kind == b"$":
        return _bulk(buffer, _integer(line), after)
    if kind == b"*":
        return _array(buffer, _integer(line), after)
    raise RedisError("a reply that is not RESP")


def _bulk(buffer: bytearray, length: int, start: int) -> tuple[Reply, int] | None:
    if length < 0:
        return None, start  # a null
    end = start + length
    return (bytes(buffer[start:end]), end + 2) if len(buffer) >= end + 2 else None


def _array(buffer: bytearray, count: int, start: int) -> tuple[Reply | RedisError, int] | None:
    items: list[Any] = []
    for _ in range(max(count, 0)):
        parsed = _parse(buffer, start)
        if parsed is None:
            return None
        item, start = parsed
        if isinstance(item, RedisError):
            return item, start
        items.append(item)
    return (items if count >= 0 else None), start


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RedisError("a reply that is not RESP") from None
