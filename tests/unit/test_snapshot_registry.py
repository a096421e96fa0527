"""The snapshot registry answers from its copy, applies changes in order, and loads snapshots
whole or not at all."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from authz_service import apikeys
from authz_service.contract import Change, Entry, parse_time
from authz_service.model import ApiKey, Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryError
from authz_service.registry.snapshot import NDJSON, SnapshotError, SnapshotRegistry

CLIENT = Client("c-1", "One", ("r",))
IDENTITY = {"client_id": "c-1", "client_name": "One", "roles": ["r"], "status": "active"}


def credential(key: str) -> Credential:
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, digest[:6].hex())


def upsert(version: int, key: str, valid_until: str | None = None) -> Change:
    digest = apikeys.digest(key)
    entry = Entry(digest, CLIENT, parse_time(valid_until))
    return Change(version, "upsert", digest, "c-1", entry)


def delete(version: int, key: str) -> Change:
    return Change(version, "delete", apikeys.digest(key), "c-1", reason=Reason.KEY_REVOKED)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def loaded(clock: Clock | None = None) -> SnapshotRegistry:
    registry = SnapshotRegistry("http://registry", "t", clock=clock or Clock())
    registry.version = 0  # as after loading an empty snapshot
    return registry


def test_before_the_first_snapshot_lookups_are_errors_not_refusals() -> None:
    """Not knowing is not 'unknown': the check gets 503 until the copy is loaded."""
    registry = SnapshotRegistry("http://registry", "t")
    assert not registry.ready
    with pytest.raises(RegistryError):
        registry.lookup(credential("azk_a"))


def test_upserts_and_deletes_change_the_answer() -> None:
    """A key appears with its client, and disappears as unknown."""
    registry = loaded()
    registry.apply(upsert(1, "azk_a"))
    assert registry.lookup(credential("azk_a")) == CLIENT
    registry.apply(delete(2, "azk_a"))
    assert registry.lookup(credential("azk_a")) is Reason.UNKNOWN_KEY
    assert registry.version == 2


def test_changes_already_in_the_copy_are_skipped() -> None:
    """A change the snapshot already reflects (or a repeated one) is ignored."""
    registry = loaded()
    registry.apply(delete(5, "azk_a"))
    registry.apply(upsert(4, "azk_a"))
    assert registry.lookup(credential("azk_a")) is Reason.UNKNOWN_KEY


def test_a_key_past_its_valid_until_is_refused_without_a_change() -> None:
    """A grace period ends on time even if no change event comes."""
    clock = Clock()
    registry = loaded(clock)
    registry.apply(upsert(1, "azk_old", valid_until="2030-01-01T00:00:00.000000Z"))
    clock.now = 1893456000.0 - 1
    assert isinstance(registry.lookup(credential("azk_old")), Client)
    clock.now += 1
    assert registry.lookup(credential("azk_old")) is Reason.KEY_REVOKED


# --- loading, from a registry on loopback -------------------------------------------------------


def entry(key: str) -> dict[str, Any]:
    key_hash = apikeys.hash_key(key)
    return {"key_hash": key_hash, "key_id": key_hash[:12], "valid_until": None, "client": IDENTITY}


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """Serve a snapshot handler on a port of its own; yields its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Any) -> str:
        app = web.Application()
        app.router.add_get("/v1/snapshot", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def ndjson(*lines: Any) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def test_a_streamed_snapshot_is_loaded_line_by_line(serve: Callable[..., Any]) -> None:
    """The streamed form: header, one entry per line, a trailer with the count."""

    async def handler(request: web.Request) -> web.Response:
        assert NDJSON in request.headers["Accept"]
        body = ndjson({"version": 7}, entry("azk_a"), entry("azk_b"), {"end": True, "count": 2})
        return web.Response(body=body, content_type=NDJSON, headers={"ETag": '"v7"'})

    registry = SnapshotRegistry(await serve(handler), "t")
    assert await registry.resync() == 7
    assert registry.lookup(credential("azk_b")) == CLIENT


async def test_a_snapshot_cut_short_keeps_the_copy_in_use(serve: Callable[..., Any]) -> None:
    """No trailer (a broken connection) or a wrong count: refused; the old copy stays."""
    bodies = [
        ndjson({"version": 8}, entry("azk_a")),
        ndjson({"version": 8}, entry("azk_a"), {"end": True, "count": 5}),
    ]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies.pop(0), content_type=NDJSON)

    registry = SnapshotRegistry(await serve(handler), "t")
    registry.version = 3
    registry.apply(upsert(4, "azk_old"))
    for _ in range(2):
        with pytest.raises(SnapshotError):
            await registry.resync()
        assert registry.version == 4
        assert registry.lookup(credential("azk_old")) == CLIENT


async def test_an_unchanged_snapshot_is_not_loaded_again(serve: Callable[..., Any]) -> None:
    """The copy's version goes out as If-None-Match; a 304 keeps the copy."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("If-None-Match"))
        return web.Response(status=304)

    registry = SnapshotRegistry(await serve(handler), "t")
    registry.version = 9
    assert await registry.resync() == 9
    assert seen == ['"v9"']


async def test_the_plain_json_form_is_loaded_too(serve: Callable[..., Any]) -> None:
    """A small registry may answer with one JSON document."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"version": 2, "keys": [entry("azk_a")]})

    registry = SnapshotRegistry(await serve(handler), "t")
    assert await registry.resync() == 2
    assert registry.lookup(credential("azk_a")) == CLIENT
