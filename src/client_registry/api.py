"""The registry's HTTP API, as documented in openapi.yaml.

Management (the ADR's endpoints, and usage reports) needs the admin token; verification
(validate, snapshot, changes, change stream) and the usage ledger's batches need the service
token. Every error is JSON: ``{"error": ..., "message": ..., "field"?: ...}``.

Nothing big is parsed or serialised on the event loop: the snapshot is produced in worker
threads, a batch at a time, change pages arrive from the store as JSON text, and usage batches
and reports are parsed and written in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from authz_service import logs
from authz_service.contract import (
    MAX_REQUESTS_PER_UNIT,
    RATE_UNITS,
    ROLE_PATTERN,
    ContractError,
    parse_rate_limit,
    parse_time,
)
from authz_service.model import RateLimit
from client_registry import usage
from client_registry.db import DatabaseError
from client_registry.feed import ChangeFeed
from client_registry.store import (
    ACTIVE,
    SUSPENDED,
    Client,
    ConflictError,
    Key,
    KeySnapshot,
    LogState,
    NotFoundError,
    Store,
    TooMuchUsageError,
    identity,
    iso,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_NAME_LENGTH = 200
MAX_EMAIL_LENGTH = 254
MAX_ROLES = 32
MAX_KEY_LENGTH = 512
# Usage batches parsed and written at once; more wait (without their bodies read) for up to
# USAGE_WAIT seconds, well within a sender's timeout, and beyond MAX_USAGE_WAITING of them, or
# that wait, get 503 and Retry-After.
MAX_USAGE_BATCHES = 4
MAX_USAGE_WAITING = 64
USAGE_WAIT = 5.0
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
NDJSON = "application/x-ndjson"
SNAPSHOT_BATCH = 2000  # entries per piece of a snapshot (about 500 KB)
_WRITE_TIMEOUT = 30.0  # seconds a stream may stall on a client that does not read
_RETRY_AFTER = (2, 10)  # seconds, spread so that refused followers do not return together
_STATUS_ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "resync_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
        retry: bool = False,
    ) -> None:
        """``extra``: more members of the error body; ``retry``: send Retry-After."""
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.extra, self.retry = extra or {}, retry


@dataclass(frozen=True)
class ApiSettings:
    admin_token: str
    service_token: str
    max_grace_seconds: float
    max_feed_subscribers: int
    max_snapshot_streams: int
    heartbeat_seconds: float = 15.0


class _Api:
    def __init__(self, store: Store, settings: ApiSettings, feed: ChangeFeed) -> None:
        self.store, self.settings, self.feed = store, settings, feed
        self.snapshots = 0
        self.usage_slots = asyncio.Semaphore(MAX_USAGE_BATCHES)
        self.usage_waiting = 0
        self.admin = _token_check(settings.admin_token)
        self.service = _token_check(settings.service_token)

    # --- management ----------------------------------------------------------------------------
    async def create_client(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await _json_body(
            request, required={"client_name", "email"}, optional={"roles", "rate_limit"}
        )
        client, key, record = await self.store.create_client(
            _name(body["client_name"]),
            _email(body["email"]),
            _roles(body.get("roles", [])),
            _rate_limit(body.get("rate_limit")),
        )
        return _json({**_client_json(client), "api_key": key, "key_id": record.key_id}, 201)

    async def list_clients(self, request: web.Request) -> web.Response:
        self.admin(request)
        limit = _int_query(request, "limit", default=100, low=1, high=1000)
        after = request.query.get("after", "")
        clients = await self.store.list_clients(limit, after)
        next_after = clients[-1].client_id if len(clients) == limit else None
        return _json({"clients": [_client_json(c) for c in clients], "next_after": next_after})

    async def get_client(self, request: web.Request) -> web.Response:
        self.admin(request)
        client, keys = await self.store.get_client(request.match_info["client_id"])
        return _json({**_client_json(client), "keys": [_key_json(k) for k in keys]})

    async def patch_client(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await _json_body(
            request, optional={"client_name", "email", "roles", "status", "rate_limit"}
        )
        changes: dict[str, Any] = {}
        if "client_name" in body:
            changes["name"] = _name(body["client_name"])
        if "email" in body:
            changes["email"] = _email(body["email"])
        if "roles" in body:
            changes["roles"] = _roles(body["roles"])
        if "status" in body:
            if body["status"] not in (ACTIVE, SUSPENDED):
                raise ApiError(400, "status must be 'active' or 'suspended'", "status")
            changes["status"] = body["status"]
        if "rate_limit" in body:  # null clears it
            changes["rate_limit"] = _rate_limit(body["rate_limit"])
        client = await self.store.update_client(request.match_info["client_id"], changes)
        return _json(_client_json(client))

    async def delete_client(self, request: web.Request) -> web.Response:
        self.admin(request)
        await self.store.delete_client(request.match_info["client_id"])
        return web.Response(status=204)

    async def revoke_key(self, request: web.Request) -> web.Response:
        self.admin(request)
        await self.store.revoke_key(request.match_info["client_id"])
        return web.Response(status=204)

    async def regenerate_key(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await _json_body(request, optional={"grace_seconds"}, allow_empty=True)
        grace = body.get("grace_seconds", 0)
        if (
            not isinstance(grace, int | float)
            or isinstance(grace, bool)
            or not 0 <= grace <= self.settings.max_grace_seconds
        ):
            raise ApiError(
                400,
                f"grace_seconds must be a number from 0 to {self.settings.max_grace_seconds:g}",
                "grace_seconds",
            )
        client_id = request.match_info["client_id"]
        key, record = await self.store.regenerate_key(client_id, float(grace))
        return _json(
            {
                "client_id": client_id,
                "api_key": key,
                "key_id": record.key_id,
                "created_at": iso(record.created_at),
                "previous_keys_valid_until": iso(record.created_at + grace),
            },
            201,
        )

    async def client_usage(self, request: web.Request) -> web.Response:
        self.admin(request)
        granularity = request.query.get("granularity", usage.DEFAULT_GRANULARITY)
        try:
            within = usage.span(
                _time_query(request, "from"), _time_query(request, "to"), granularity, time.time()
            )
        except usage.RangeError as exc:
            raise ApiError(400, str(exc), exc.field) from None
        client_id = request.match_info["client_id"]
        try:
            rows = await self.store.usage(client_id, within, usage.MAX_ROWS)
        except TooMuchUsageError:
            raise ApiError(
                400,
                f"the range holds more than {usage.MAX_ROWS} (key, {granularity}) figures: "
                "narrow it or choose a coarser granularity",
                "granularity",
            ) from None
        text = await asyncio.to_thread(lambda: json.dumps(usage.report(client_id, within, rows)))
        return web.Response(text=text, content_type="application/json")

    # --- verification --------------------------------------------------------------------------
    async def verify(self, request: web.Request) -> web.Response:
        self.service(request)
        body = await _json_body(request, required={"api_key"})
        key = body["api_key"]
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ApiError(
                400, f"api_key must be a string of 1 to {MAX_KEY_LENGTH} characters", "api_key"
            )
        result = await self.store.verify(key)
        if not result.valid or result.client is None:
            return _json({"valid": False, "reason": result.reason, "version": result.version})
        return _json(
            {
                "valid": True,
                "client": identity(result.client),
                "valid_until": iso(result.valid_until),
                "version": result.version,
            }
        )

    async def record_usage(self, request: web.Request) -> web.Response:
        """A usage ledger batch: counted once per batch id."""
        self.service(request)
        if request.content_type != "application/json":
            raise ApiError(415, "the body must be application/json")
        limit = usage.MAX_BATCH_BYTES
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"a usage batch is at most {limit} bytes")
        async with self._usage_slot():
            body = await _bounded_body(request, limit)
            try:
                batch = await asyncio.to_thread(usage.parse_batch, body)
            except usage.MalformedBatchError as exc:
                raise ApiError(400, str(exc), exc.field or None) from None
            duplicate = await self.store.record_usage(batch)
        return _json({"accepted": 0 if duplicate else batch.entries, "duplicate": duplicate})

    @contextlib.asynccontextmanager
    async def _usage_slot(self) -> AsyncIterator[None]:
        busy = ApiError(503, "too many usage batches being recorded at once", retry=True)
        if self.usage_slots.locked() and self.usage_waiting >= MAX_USAGE_WAITING:
            raise busy
        self.usage_waiting += 1
        try:
            async with asyncio.timeout(USAGE_WAIT):
                await self.usage_slots.acquire()
        except TimeoutError:
            raise busy from None
        finally:
            self.usage_waiting -= 1
        try:
            yield
        finally:
            self.usage_slots.release()

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        self.service(request)
        form = _NdjsonForm() if _accepts(request, NDJSON) else _JsonForm()
        current = (await self.store.log_state()).current
        etag = f'"v{current}"'
        if _matches(request.headers.get("If-None-Match"), etag):  # no key is read for a 304
            return web.Response(status=304, headers={"ETag": etag})
        if self.snapshots >= self.settings.max_snapshot_streams:
            raise ApiError(503, "too many snapshots being served at once", retry=True)
        self.snapshots += 1
        try:
            return await self._send_snapshot(request, _SnapshotBody(self.store, form))
        finally:
            self.snapshots -= 1

    async def _send_snapshot(self, request: web.Request, body: _SnapshotBody) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        # Every blocking step runs in a worker thread, one at a time (the cursor is not
        # shareable), and the next piece is produced while the last one is being sent. The
        # shields keep a step running when the client leaves, so that closing waits for it.
        pending: asyncio.Future[Any] = loop.run_in_executor(None, body.open)
        try:
            version = await asyncio.shield(pending)
            response = web.StreamResponse(
                headers={"ETag": f'"v{version}"', "Cache-Control": "no-store"}
            )
            response.content_type = body.form.content_type
            await response.prepare(request)
            pending = loop.run_in_executor(None, body.next)
            while (piece := await asyncio.shield(pending)) is not None:
                pending = loop.run_in_executor(None, body.next)
                await response.write(piece)
            await response.write_eof()
            return response
        finally:
            pending.add_done_callback(lambda _: _in_thread(loop, body.close))

    async def changes(self, request: web.Request) -> web.Response:
        self.service(request)
        if "since" not in request.query:  # the cheap way to learn the current version
            current = (await self.store.log_state()).current
            return _json({"version": current, "current_version": current, "changes": []})
        since = _int_query(request, "since", default=0, low=0, high=2**62)
        limit = _int_query(request, "limit", default=1000, low=1, high=10_000)
        page = await self.store.changes_since(since, limit)
        _check_since(since, page.state)
        last = page.changes[-1][0] if page.changes else page.state.current
        changes = ", ".join(change for _, change in page.changes)
        return web.Response(
            text=f'{{"version": {last}, "current_version": {page.state.current}, '
            f'"changes": [{changes}]}}',
            content_type="application/json",
        )

    async def change_stream(self, request: web.Request) -> web.StreamResponse:
        self.service(request)
        since = request.headers.get("Last-Event-ID") or request.query.get("since")
        if since is not None and not (since.isdigit() and int(since) <= 2**62):
            raise ApiError(400, "since (or Last-Event-ID) must be a change version", "since")
        if self.feed.streams >= self.settings.max_feed_subscribers:
            raise ApiError(503, "too many change-feed subscribers", retry=True)
        self.feed.streams += 1
        try:
            state = await self.store.log_state()
            start = state.current if since is None else int(since)
            _check_since(start, state)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
            )
            await response.prepare(request)
            await self._follow(request, response, start)
            return response
        finally:
            self.feed.streams -= 1

    async def _follow(self, request: web.Request, response: web.StreamResponse, start: int) -> None:
        """Send the stream until the client leaves (the handler is then cancelled), stops
        reading, or the stream must end; the client resumes with Last-Event-ID."""
        ready = json.dumps({"version": start})
        heartbeat = self.settings.heartbeat_seconds
        try:
            await _send(response, f"id: {start}\nevent: ready\ndata: {ready}\n\n".encode())
            async with contextlib.aclosing(self.feed.follow(start, heartbeat)) as changes:
                async for data in changes:
                    await _send(response, data or b": heartbeat\n\n")
        except (ConnectionError, TimeoutError, DatabaseError) as exc:
            log.info(
                "change stream ended",
                extra={"fields": {"event": "change_stream_ended", "error": type(exc).__name__}},
            )
            if request.transport is not None:
                request.transport.abort()  # nothing more can be sent: do not wait to flush it

    async def openapi(self, _: web.Request) -> web.Response:
        text = resources.files("client_registry").joinpath("openapi.yaml").read_text()
        return web.Response(text=text, content_type="application/yaml")

    async def healthz(self, _: web.Request) -> web.Response:
        return _json({"status": "ok", "change_feed": self.feed.status()})


def build_app(store: Store, settings: ApiSettings, feed: ChangeFeed) -> web.Application:
    api = _Api(store, settings, feed)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])

    async def end_streams(_: web.Application) -> None:
        feed.end_streams()  # at shutdown, once no new connection is accepted

    app.on_shutdown.append(end_streams)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/openapi.yaml", api.openapi)
    app.router.add_post("/clients", api.create_client)
    app.router.add_get("/clients", api.list_clients)
    app.router.add_get("/clients/{client_id}", api.get_client)
    app.router.add_patch("/clients/{client_id}", api.patch_client)
    app.router.add_delete("/clients/{client_id}", api.delete_client)
    app.router.add_delete("/clients/{client_id}/api-key", api.revoke_key)
    app.router.add_post("/clients/{client_id}/api-key", api.regenerate_key)
    app.router.add_get("/clients/{client_id}/usage", api.client_usage)
    app.router.add_post("/v1/keys/verify", api.verify)
    app.router.add_get("/v1/snapshot", api.snapshot)
    app.router.add_get("/v1/changes", api.changes)
    app.router.add_get("/v1/changes/stream", api.change_stream)
    app.router.add_post("/v1/usage", api.record_usage)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.field, exc.extra, exc.retry)
    except DatabaseError as exc:
        logs.failure(log, "database unavailable", "database_error", exc, path=request.path)
        return _error(503, "the registry's database is unavailable", retry=True)
    except (NotFoundError, ConflictError) as exc:
        return _error(404 if isinstance(exc, NotFoundError) else 409, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception:
        log.exception(
            "request failed",
            extra={
                "fields": {"event": "request_error", "method": request.method, "path": request.path}
            },
        )
        return _error(500, "internal error")


def _error(
    status: int,
    message: str,
    field: str | None = None,
    extra: dict[str, Any] | None = None,
    retry: bool = False,
) -> web.Response:
    body: dict[str, Any] = {
        "error": _STATUS_ERRORS.get(status, "internal_error"),
        "message": message,
        **(extra or {}),
    }
    if field:
        body["field"] = field
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="client-registry"'
    if retry:
        low, high = _RETRY_AFTER
        headers["Retry-After"] = str(low + secrets.randbelow(high - low + 1))
    return _json(body, status, headers)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _token_check(expected: str) -> Callable[[web.Request], None]:
    def check(request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "a bearer token is required")
        if not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise ApiError(403, "the token is not valid for this endpoint")

    return check


async def _json_body(
    request: web.Request,
    required: AbstractSet[str] = frozenset(),
    optional: AbstractSet[str] = frozenset(),
    allow_empty: bool = False,
) -> dict[str, Any]:
    if allow_empty and not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "the body must be application/json")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name in sorted(required - set(body)):
        raise ApiError(400, f"{name} is required", name)
    for name in sorted(set(body) - required - optional):
        raise ApiError(400, f"{name} is not a known field", name)
    return body


def _name(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_NAME_LENGTH
        or not value.isprintable()
    ):
        raise ApiError(
            400, f"client_name must be 1 to {MAX_NAME_LENGTH} printable characters", "client_name"
        )
    return value.strip()


def _email(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(value):
        raise ApiError(400, "email must be an e-mail address", "email")
    return value


def _roles(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_ROLES
        or not all(isinstance(role, str) and ROLE_PATTERN.fullmatch(role) for role in value)
    ):
        raise ApiError(
            400,
            f"roles must be a list of at most {MAX_ROLES} names matching {ROLE_PATTERN.pattern}",
            "roles",
        )
    return list(dict.fromkeys(value))


def _rate_limit(value: Any) -> RateLimit | None:
    """A client's rate limit (null: none), by the rules both sides share."""
    try:
        return parse_rate_limit(value)
    except ContractError:
        raise ApiError(
            400,
            f"rate_limit must be null or {{requests_per_unit: 1 to {MAX_REQUESTS_PER_UNIT}, "
            f"unit: {'|'.join(RATE_UNITS)}}}",
            "rate_limit",
        ) from None


def _time_query(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        moment = parse_time(raw)
    except ContractError:
        moment = None
    if moment is None:
        raise ApiError(
            400, f"{name} must be an ISO 8601 time with its zone, e.g. 2025-01-31T00:00:00Z", name
        )
    return moment


async def _bounded_body(request: web.Request, limit: int) -> bytes:
    """The body, read as it arrives: 413 as soon as it is longer than ``limit`` (whatever
    Content-Length said, or if it said nothing)."""
    chunks, size = [], 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"a usage batch is at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


def _client_json(client: Client) -> dict[str, Any]:
    limit = client.rate_limit
    return {
        **identity(client),
        "rate_limit": None if limit is None else limit._asdict(),
        "email": client.email,
        "created_at": iso(client.created_at),
        "updated_at": iso(client.updated_at),
    }


def _key_json(key: Key) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "last_used_at": None if key.last_used_at is None else usage.iso_minute(key.last_used_at),
    }


def _check_since(since: int, state: LogState) -> None:
    """A follower at ``since`` can continue from the log, or must reload the snapshot (410)."""
    current = {"current_version": state.current}
    if since < state.pruned_through:
        raise ApiError(
            410,
            f"the change log no longer reaches back to version {since} (it starts after "
            f"{state.pruned_through}); reload the snapshot",
            extra=current,
        )
    if since > state.current:
        raise ApiError(
            410,
            f"version {since} is ahead of this registry ({state.current}); reload the snapshot",
            extra=current,
        )


async def _send(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(_WRITE_TIMEOUT):
        await response.write(data)


def _in_thread(loop: asyncio.AbstractEventLoop, work: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closing: the process is ending
        loop.run_in_executor(None, work)


def _accepts(request: web.Request, media_type: str) -> bool:
    """``media_type`` is named in Accept with a weight above zero."""
    for item in request.headers.get("Accept", "").split(","):
        kind, *params = (part.strip().lower() for part in item.split(";"))
        if kind == media_type:
            weights = [p.removeprefix("q=") for p in params if p.startswith("q=")]
            return not weights or weights[0].strip("0.") != ""
    return False


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


class _NdjsonForm:
    """One JSON value a line: the version, the entries, then a trailer with their count, so
    that a truncated stream can be told from a complete one."""

    content_type = NDJSON

    def head(self, version: int) -> str:
        return json.dumps({"version": version}) + "\n"

    def entries(self, entries: list[str], first: bool) -> str:
        return "\n".join(entries) + "\n"

    def tail(self, count: int) -> str:
        return json.dumps({"end": True, "count": count}) + "\n"


class _JsonForm:
    """The original document, ``{"version": N, "keys": [...]}``, written piece by piece."""

    content_type = "application/json"

    def head(self, version: int) -> str:
        return f'{{"version": {version}, "keys": ['

    def entries(self, entries: list[str], first: bool) -> str:
        return ("" if first else ", ") + ", ".join(entries)

    def tail(self, count: int) -> str:
        return "]}"


class _SnapshotBody:
    """The snapshot's bytes, a piece per call. Blocking: every method runs in a worker thread,
    one call at a time."""

    def __init__(self, store: Store, form: _NdjsonForm | _JsonForm) -> None:
        self._store, self.form = store, form
        self._snapshot: KeySnapshot | None = None
        self._pieces: Generator[bytes] | None = None

    def open(self) -> int:
        self._snapshot = self._store.open_snapshot()
        self._pieces = self._produce(self._snapshot)
        return self._snapshot.version

    def next(self) -> bytes | None:
        assert self._pieces is not None  # noqa: S101 (open comes first)
        return next(self._pieces, None)

    def close(self) -> None:
        try:
            if self._pieces is not None:
                with contextlib.suppress(Exception):  # its connection may be broken already
                    self._pieces.close()
        finally:
            if self._snapshot is not None:
                self._snapshot.close()

    def _produce(self, snapshot: KeySnapshot) -> Generator[bytes]:
        yield self.form.head(snapshot.version).encode()
        count = 0
        for entries in snapshot.entries(SNAPSHOT_BATCH):
            yield self.form.entries(entries, first=count == 0).encode()
            count += len(entries)
        yield self.form.tail(count).encode()
