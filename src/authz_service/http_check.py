"""The HTTP face of the check: Envoy's ext_authz ``http_service`` mode, on the event loop.

Envoy sends the original method, its ``path_prefix`` followed by the original path (query
included), the host, and the headers its ``allowed_headers`` lists; no body unless
``with_request_body`` is set. It reads our answer: a 200 is an allow (the headers listed in
``allowed_upstream_headers`` go upstream, replacing the client's own, and
``x-envoy-auth-headers-to-remove`` removes the key and any identity header we have no value
for); any other status is a deny, passed to the client with the headers listed in
``allowed_client_headers`` and our body. Identity for access logs travels in ``x-authz-*``
headers that Envoy turns into dynamic metadata (``dynamic_metadata_from_headers``).

This module only translates: HTTP -> Request -> the check core -> Decision -> HTTP, with the
same answers as the gRPC transport (``answers``). A route's own requirements come in
``x-authz-route-*`` headers, which the route's ``headers_to_add`` sets; they can only restrict
(no header relaxes a route: per-route dry-run is for gRPC's context_extensions only).

Bounded: header count and bytes, body bytes, requests per connection waiting to be answered,
idle and read timeouts. Every request gets an explicit answer, even one that cannot be read
(400 or 413, which the check core records like any other): never a dropped connection, which
Envoy's ``failure_mode_allow`` could turn into an allow. HTTP/1.1 with keep-alive; Envoy keeps
a pool of connections, one check at a time on each.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import NamedTuple, cast

import httptools

from authz_service import answers
from authz_service.answers import AnswerSettings
from authz_service.core import Checker
from authz_service.envoy_codec import HTTP_CLIENT_ID_METADATA, HTTP_KEY_ID_METADATA
from authz_service.health import supervise
from authz_service.model import Authorization, Client, Decision, Request
from authz_service.reasons import Reason

log = logging.getLogger(__name__)

MAX_HEADERS = 100  # Envoy's own default limit on request headers
MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 16  # requests read ahead of their answers on one connection
# The route requirements a route's headers_to_add may set, as context_extensions names them.
ROUTE_HEADERS = {
    "x-authz-route-required-roles": "required_roles",
    "x-authz-route-allowed-clients": "allowed_clients",
    "x-authz-route-rule-id": "rule_id",
}
_REPEATED_ROUTE = (("repeated_route_header", "true"),)  # closes the route (an unknown key)
# Answer headers that Envoy's dynamic_metadata_from_headers turns into metadata.
_METADATA = (HTTP_CLIENT_ID_METADATA, "x-authz-client-name", HTTP_KEY_ID_METADATA)
_KEPT = {  # the request headers read, by the name httptools gives (bytes)
    name.encode(): name
    for name in (
        "authorization",
        "host",
        "x-request-id",
        "traceparent",
        "tracestate",
        "x-envoy-expected-rq-timeout-ms",
        *ROUTE_HEADERS,
    )
}
_ROUTE_NAMES = frozenset(ROUTE_HEADERS)
_MAX_CACHED = 10_000
_UNANSWERABLE = Decision.deny(Reason.INTERNAL_ERROR)


def _as_envoy_does(error: UnicodeError) -> tuple[str, int]:
    # Envoy's gRPC mode sends each byte that is not UTF-8 as "!"; so does this transport.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "!" * (error.end - error.start), error.end


codecs.register_error("authz_envoy", _as_envoy_does)


@dataclass(frozen=True, slots=True)
class HttpCheckSettings:
    path_prefix: str = ""  # Envoy's http_service path_prefix, removed before the policy sees it
    max_body_bytes: int = 1 << 20  # the largest body accepted (with_request_body)
    idle_timeout: float = 300.0  # seconds a kept-alive connection may wait for a request
    read_timeout: float = 10.0  # seconds a request may take to arrive once it has begun


class _Message(NamedTuple):
    whole: bytes
    split: int  # where the headers end: per-check headers go there


class Responses:
    """The answer bytes, each built once per client and key (allows) or reason and rule. A
    rate-limited client's answers carry its quota, which changes with every check: the
    RateLimit headers are put into the cached answer (on an allow only with
    ``quota_headers_on_allow``; Envoy passes them to the client when its
    ``allowed_client_headers_on_success`` lists them)."""

    def __init__(self, settings: AnswerSettings, quota_headers_on_allow: bool = True) -> None:
        self._settings = settings
        self._quota_on_allow = quota_headers_on_allow
        self._allows: dict[tuple[Client | None, str | None], _Message] = {}
        self._denials: dict[tuple[Reason, str | None], _Message] = {}

    def of(self, decision: Decision) -> bytes:
        """The answer. Never raises: one that cannot be built is the internal-error denial."""
        try:
            return self._of(decision)
        except Exception as exc:
            answers.log_unanswerable(decision, exc)
            return self._of(_UNANSWERABLE)

    def _of(self, decision: Decision) -> bytes:
        quota = decision.quota
        if decision.allowed:
            allow_key = (decision.client, decision.key_id)
            found = self._allows.get(allow_key)
            if found is None:
                if len(self._allows) >= _MAX_CACHED:
                    self._allows.clear()
                found = self._allows[allow_key] = self._allow(*allow_key)
            if quota is None or not self._quota_on_allow:
                return found.whole
            return _with_headers(found, answers.quota_headers(quota, limited=False))
        deny_key = (decision.reason, decision.rule)
        found = self._denials.get(deny_key)
        if found is None:
            if len(self._denials) >= _MAX_CACHED:
                self._denials.clear()
            found = self._denials[deny_key] = self._deny(*deny_key)
        if quota is None:
            return found.whole
        return _with_headers(found, answers.quota_headers(quota, limited=True))

    def _allow(self, client: Client | None, key_id: str | None) -> _Message:
        headers, remove = answers.identity(client, self._settings)
        lines = list(headers)
        if client is not None:
            values = (client.client_id, client.name, key_id or "")
            lines += [
                (name, answers.sanitize(v)) for name, v in zip(_METADATA, values, strict=True) if v
            ]
        lines.append(("x-envoy-auth-headers-to-remove", ",".join(remove)))
        return _message(200, lines, b"")

    def _deny(self, reason: Reason, rule: str | None) -> _Message:
        status, _, headers, body, _ = answers.denial(reason, rule, self._settings)
        return _message(status, list(headers), body.encode())


def _message(status: int, headers: list[tuple[str, str]], body: bytes) -> _Message:
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    head += [f"{name}: {value}" for name, value in headers]
    top = ("\r\n".join(head) + "\r\n").encode("latin-1")
    return _Message(top + f"content-length: {len(body)}\r\n\r\n".encode() + body, len(top))


def _with_headers(message: _Message, headers: answers.Headers) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1")
    whole, split = message
    return whole[:split] + lines + whole[split:]


class _UnreadableError(Exception):
    """The request cannot be read: answered with ``reason`` and the connection closed."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _Connection(asyncio.Protocol):
    """One connection from Envoy: requests parsed as they arrive, answered in order."""

    def __init__(self, server: HttpCheckServer) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[tuple[Request, float | None]] = deque()  # read, not yet answered
        self._waiting: asyncio.Future[Decision] | None = None  # a check waiting for the registry
        self._waiting_head = False  # ... for a HEAD request
        self._paused = False
        self._closing = False
        self.active_at = self._loop.time()  # when data last arrived (for the timeouts)
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, list[str]] = {}
        self._header_count = 0
        self._header_bytes = 0
        self._body_bytes = 0
        self.reading = False  # a request has begun and is not complete

    @property
    def idle(self) -> bool:
        return not self.reading and self._waiting is None and not self._queue

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport, as served
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.active_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            # A bound reached in a callback comes wrapped in the parser's own error.
            cause = error.__context__
            self.refuse(
                cause.reason if isinstance(cause, _UnreadableError) else Reason.REQUEST_UNPARSABLE
            )

    # --- httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.reading = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every header of every check: kept short.
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _UnreadableError(Reason.REQUEST_TOO_LARGE)
        kept = _KEPT.get(name.lower())
        if kept is not None:
            values = self._headers.get(kept)
            if values is None:
                self._headers[kept] = [_text(value)]
            else:
                values.append(_text(value))

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._server.settings.max_body_bytes:
            raise _UnreadableError(Reason.REQUEST_TOO_LARGE)

    def on_message_complete(self) -> None:
        self._queue.append(self._server.read(self._parser.get_method(), self._url, self._headers))
        self._reset()
        if not self._parser.should_keep_alive():
            self._closing = True
        self._answer_in_order()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _UnreadableError(Reason.REQUEST_TOO_LARGE)

    # --- answering, in order --------------------------------------------------------------------
    def _answer_in_order(self) -> None:
        """Answer every request read, in order: at once when the check is decided from memory,
        else when its decision arrives (the requests behind it wait, reading paused)."""
        while self._waiting is None and self._queue:
            request, time_remaining = self._queue.popleft()
            outcome = self._server.checker.check_on_loop(request, time_remaining)
            head = request.method == "HEAD"
            if isinstance(outcome, Decision):
                self._write(outcome, head)
            else:
                self._waiting, self._waiting_head = outcome, head
                self._server.started()
                outcome.add_done_callback(self._decided)
        transport = self._transport
        if transport is None:
            return
        if self._closing and self._waiting is None and not self._queue:
            transport.close()
        elif len(self._queue) >= MAX_PIPELINED and not self._paused:
            transport.pause_reading()
            self._paused = True
        elif self._paused and len(self._queue) < MAX_PIPELINED:
            transport.resume_reading()
            self._paused = False

    def _decided(self, outcome: asyncio.Future[Decision]) -> None:
        self._waiting = None
        self._server.finished()
        if not outcome.cancelled():
            self._write(outcome.result(), self._waiting_head)
        self._answer_in_order()

    def _write(self, decision: Decision, head: bool) -> None:
        if self._transport is not None:
            answer = self._server.responses.of(decision)
            if head:  # an answer to HEAD has no body (RFC 9110), or Envoy reads it as the next
                answer = answer[: answer.index(b"\r\n\r\n") + 4]
            self._transport.write(answer)

    def refuse(self, reason: Reason) -> None:
        """Answer a request that cannot be read (after those before it), then close."""
        self._closing = True
        self._reset()
        self._queue.append((Request(is_http=True, problem=reason), None))
        self._answer_in_order()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class HttpCheckServer:
    def __init__(
        self,
        checker: Checker,
        answer_settings: AnswerSettings,
        settings: HttpCheckSettings,
        quota_headers_on_allow: bool = True,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.settings = settings
        self.connections: set[_Connection] = set()
        self.checker = checker
        self.responses = Responses(answer_settings, quota_headers_on_allow)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._in_progress = 0  # checks waiting for the registry, on every connection
        self._quiet = asyncio.Event()  # set when the last one is answered (for shutdown)

    async def start(self, address: str) -> int:
        """Listen on ``host:port`` or ``unix:/path``; return the port (0 for a socket)."""
        if address.startswith("unix:"):
            path = _fresh_socket_path(address.removeprefix("unix:"))
            self._server = await self.loop.create_unix_server(lambda: _Connection(self), path)
            port = 0
        else:
            host, _, bind = address.rpartition(":")
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host.strip("[]"), int(bind), reuse_address=True
            )
            port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = supervise("http-check-timeouts", self._sweep)
        return port

    async def stop(self, grace: float) -> None:
        """Stop accepting; give checks in progress ``grace`` seconds; close what is left."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._in_progress:
            self._quiet.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), grace)
        for connection in list(self.connections):
            connection.close()
        await self._server.wait_closed()

    def started(self) -> None:
        self._in_progress += 1

    def finished(self) -> None:
        self._in_progress -= 1
        if not self._in_progress:
            self._quiet.set()

    async def _sweep(self) -> None:
        """Apply the timeouts: a request that has begun must arrive within read_timeout (else
        it is answered 400 and the connection closed); an idle connection is closed after
        idle_timeout. One timer for every connection, rather than one per request."""
        settings = self.settings
        period = min(1.0, settings.read_timeout / 4, settings.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = self.loop.time()
            for connection in list(self.connections):
                quiet_for = now - connection.active_at
                if connection.reading and quiet_for > settings.read_timeout:
                    connection.refuse(Reason.REQUEST_UNPARSABLE)
                elif connection.idle and quiet_for > settings.idle_timeout:
                    connection.close()

    def read(
        self, method: bytes | None, url: bytes, headers: dict[str, list[str]]
    ) -> tuple[Request, float | None]:
        """The Request in Envoy's check request, and the time Envoy gives the check (its
        ext_authz timeout, which it sends as x-envoy-expected-rq-timeout-ms)."""
        target = _text(url)
        prefix = self.settings.path_prefix
        problem = None
        if prefix:
            if target.startswith(prefix + "/"):
                target = target[len(prefix) :]
            else:  # not a check request of the Envoy configured with this prefix
                problem = Reason.REQUEST_UNPARSABLE
        route: tuple[tuple[str, str], ...] = ()
        if not _ROUTE_NAMES.isdisjoint(headers):
            if any(len(headers.get(name, ())) > 1 for name in ROUTE_HEADERS):
                route = _REPEATED_ROUTE
            else:
                route = tuple(
                    sorted(
                        (key, headers[name][0])
                        for name, key in ROUTE_HEADERS.items()
                        if name in headers
                    )
                )
        return Request(
            is_http=True,
            authorization=Authorization(tuple(headers.get("authorization", ()))),
            method=(method or b"").decode("latin-1"),
            host=_first(headers, "host"),
            path=target.partition("?")[0].partition("#")[0],
            request_id=_first(headers, "x-request-id"),
            route=route,
            traceparent=_first(headers, "traceparent"),
            tracestate=_first(headers, "tracestate"),
            problem=problem,
        ), _seconds(_first(headers, "x-envoy-expected-rq-timeout-ms"))


def _fresh_socket_path(path: str) -> str:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()  # a socket left by an earlier run
    return path


def _first(headers: dict[str, list[str]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "authz_envoy")


def _seconds(milliseconds: str) -> float | None:
    return int(milliseconds) / 1000 if milliseconds.isdigit() and len(milliseconds) < 10 else None
