"""The registry's HTTP API, as documented in openapi.yaml.

Management (the ADR's endpoints) needs the admin token; verification (validate, snapshot,
changes, change stream) needs the service token. Every error is JSON:
``{"error": ..., "message": ..., "field"?: ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from authz_service.contract import ROLE_PATTERN
from client_registry.store import (
    ACTIVE,
    SUSPENDED,
    Client,
    ConflictError,
    Key,
    NotFoundError,
    Store,
    identity,
    iso,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_NAME_LENGTH = 200
MAX_EMAIL_LENGTH = 254
MAX_ROLES = 32
MAX_KEY_LENGTH = 512
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_HEARTBEAT_SECONDS = 15.0
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
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass(frozen=True)
class ApiSettings:
    admin_token: str
    service_token: str
    max_grace_seconds: float
    feed_poll_interval: float
    max_feed_subscribers: int


class Feed:
    """Wakes change-feed streams when this replica writes; others are found by polling."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), within)


class _Api:
    def __init__(self, store: Store, settings: ApiSettings, feed: Feed) -> None:
        self.store, self.settings, self.feed = store, settings, feed
        self.subscribers = asyncio.Semaphore(settings.max_feed_subscribers)
        self.admin = _token_check(settings.admin_token)
        self.service = _token_check(settings.service_token)

    # --- management ----------------------------------------------------------------------------
    async def create_client(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await _json_body(request, required={"client_name", "email"}, optional={"roles"})
        client, key, record = await self.store.create_client(
            _name(body["client_name"]), _email(body["email"]), _roles(body.get("roles", []))
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
        body = await _json_body(request, optional={"client_name", "email", "roles", "status"})
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
            return _json({"valid": False, "reason": result.reason})
        return _json(
            {
                "valid": True,
                "client": identity(result.client),
                "valid_until": iso(result.valid_until),
            }
        )

    async def snapshot(self, request: web.Request) -> web.Response:
        self.service(request)
        version, keys = await self.store.snapshot()
        etag = f'"v{version}"'
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return _json({"version": version, "keys": keys}, headers={"ETag": etag})

    async def changes(self, request: web.Request) -> web.Response:
        self.service(request)
        since = _int_query(request, "since", default=0, low=0, high=2**62)
        limit = _int_query(request, "limit", default=1000, low=1, high=10_000)
        current, rows = await self.store.changes_since(since, limit)
        if since > current:
            raise ApiError(
                410, f"version {since} is ahead of this registry ({current}); reload the snapshot"
            )
        return _json(
            {
                "version": rows[-1][0] if rows else current,
                "current_version": current,
                "changes": [{"version": v, **payload} for v, payload in rows],
            }
        )

    async def change_stream(self, request: web.Request) -> web.StreamResponse:
        self.service(request)
        since = request.headers.get("Last-Event-ID") or request.query.get("since", "0")
        if not since.isdigit():
            raise ApiError(400, "since (or Last-Event-ID) must be a change version", "since")
        if self.subscribers.locked():
            raise ApiError(503, "too many change-feed subscribers")
        async with self.subscribers:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
            )
            await response.prepare(request)
            last, idle = int(since), 0.0
            await response.write(b": connected\n\n")
            while True:
                _, rows = await self.store.changes_since(last, 1000)
                for version, payload in rows:
                    data = json.dumps({"version": version, **payload}, sort_keys=True)
                    await response.write(f"id: {version}\nevent: change\ndata: {data}\n\n".encode())
                    last, idle = version, 0.0
                if not rows:
                    await self.feed.wait(self.settings.feed_poll_interval)
                    idle += self.settings.feed_poll_interval
                    if idle >= _HEARTBEAT_SECONDS:
                        await response.write(b": heartbeat\n\n")
                        idle = 0.0

    async def openapi(self, _: web.Request) -> web.Response:
        text = resources.files("client_registry").joinpath("openapi.yaml").read_text()
        return web.Response(text=text, content_type="application/yaml")

    async def healthz(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})


def build_app(store: Store, settings: ApiSettings, feed: Feed) -> web.Application:
    api = _Api(store, settings, feed)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/openapi.yaml", api.openapi)
    app.router.add_post("/clients", api.create_client)
    app.router.add_get("/clients", api.list_clients)
    app.router.add_get("/clients/{client_id}", api.get_client)
    app.router.add_patch("/clients/{client_id}", api.patch_client)
    app.router.add_delete("/clients/{client_id}", api.delete_client)
    app.router.add_delete("/clients/{client_id}/api-key", api.revoke_key)
    app.router.add_post("/clients/{client_id}/api-key", api.regenerate_key)
    app.router.add_post("/v1/keys/verify", api.verify)
    app.router.add_get("/v1/snapshot", api.snapshot)
    app.router.add_get("/v1/changes", api.changes)
    app.router.add_get("/v1/changes/stream", api.change_stream)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.field)
    except NotFoundError as exc:
        return _error(404, str(exc))
    except ConflictError as exc:
        return _error(409, str(exc))
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


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "error": _STATUS_ERRORS.get(status, "internal_error"),
        "message": message,
    }
    if field:
        body["field"] = field
    headers = {"WWW-Authenticate": 'Bearer realm="client-registry"'} if status == 401 else None
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


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


def _client_json(client: Client) -> dict[str, Any]:
    return {
        **identity(client),
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
    }
