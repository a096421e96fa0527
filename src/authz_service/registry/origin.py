"""Keep-alive HTTP/1.1 connections to the registry, for its validation endpoint: a request out;
its status, content type and bounded body back. Responses are parsed by httptools.

The validation endpoint is called on the event loop for every cold lookup, where each call's
cost is paid by every check waiting there (a flood of unknown keys makes hundreds a second).
aiohttp's client spent about 350 µs of CPU per call on this machine, most of it its own
Python; this spends a fraction of that (``benchmarks/flood_bench.py``). It does only what the
endpoint needs: no redirects (a 3xx is a status like any other, which the caller refuses), no
cookies, proxies or compression. The change feed and the snapshot, which call rarely and
stream, keep aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

MAX_HEADER_BYTES = 16 * 1024  # of a response's headers, together
MAX_IDLE = 64  # kept-alive connections waiting for a request


class UnsentError(ConnectionError):
    """The request never reached the registry: the connection failed, or a kept-alive one was
    closed before any answer came (as a server closes idle connections). A call without side
    effects can be made again."""


class InvalidResponseError(Exception):
    """What came back is not an HTTP response within our bounds."""

    safe_to_log = True  # its text is ours


class Reply(NamedTuple):
    status: int
    content_type: str  # the media type, lowercase, without its parameters
    body: bytes


class Origin:
    """``base_url``'s scheme, host and port; request paths are appended to its path. Each
    ``headers`` value is sent with every request."""

    def __init__(self, base_url: str, headers: Mapping[str, str], *, max_body: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        if any(not f"{n}{v}".isprintable() or ":" in n for n, v in headers.items()):
            raise ValueError("header names and values must be printable")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        fixed = {"Host": parts.netloc.rpartition("@")[2], **headers}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._max_body = max_body
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> Reply:
        """One request and its reply. Cancelled (the caller's deadline), its connection is
        closed, never reused with an answer still on its way."""
        if self._closed:
            raise UnsentError("the registry client is closed")
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        connection = self._take_idle()
        reused = connection is not None
        if connection is None:
            connection = await self._connect()
        try:
            reply = await connection.exchange(head.encode("latin-1") + b"\r\n" + body)
        except UnsentError:
            connection.abort()
            if reused:  # the registry closed it, as it may have closed the others (a restart)
                self._drop_idle()
            raise
        except BaseException:
            connection.abort()
            raise
        if connection.reusable and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.abort()
        return reply

    def close(self) -> None:
        self._closed = True
        self._drop_idle()

    def _drop_idle(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely closed
            if connection.open:
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._max_body),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        except OSError as exc:
            raise UnsentError(f"cannot connect: {type(exc).__name__}") from None
        return connection


class _Connection(asyncio.Protocol):
    """One connection, one request at a time."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[Reply] | None = None
        self._answering = False  # the reply has begun
        self._content_type = ""
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self.reusable = False

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def exchange(self, request: bytes) -> asyncio.Future[Reply]:
        if self._transport is None or self._transport.is_closing():
            raise UnsentError("the connection is closed")
        self._reply = asyncio.get_running_loop().create_future()
        self._answering, self._content_type, self._header_bytes = False, "", 0
        self._body, self._body_bytes, self.reusable = [], 0, False
        self._transport.write(request)
        return self._reply

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._answering:
            self._fail(InvalidResponseError("the connection closed before the answer ended"))
        else:
            self._fail(UnsentError("the connection closed before any answer"))

    def data_received(self, data: bytes) -> None:
        if self._reply is None or self._reply.done():
            self.abort()  # nothing was asked: not a server we understand
            return
        self._answering = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidResponseError("an upgrade instead of an answer"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(
                cause
                if isinstance(cause, InvalidResponseError)
                else InvalidResponseError("an answer that is not HTTP")
            )

    # --- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise InvalidResponseError("an answer's headers over the size limit")
        if name.lower() == b"content-type":
            media_type = value.partition(b";")[0].strip().lower()
            self._content_type = media_type.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            raise InvalidResponseError("an answer over the size limit")
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._answering = False
            return
        self.reusable = self._parser.should_keep_alive()
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(Reply(status, self._content_type, b"".join(self._body)))

    def _fail(self, error: Exception) -> None:
        self.abort()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)
