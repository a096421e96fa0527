"""The snapshot registry answers from its copy, applies changes in order, and loads snapshots
whole or not at all, entry by entry, each client held once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from authz_service import apikeys
from authz_service.contract import Change, Entry, parse_time
from authz_service.model import ApiKey, Client, Credential, RateLimit
from authz_service.reasons import Reason
from authz_service.registry import RegistryError, snapshot
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


def entry(
    key: str, identity: dict[str, Any] | None = None, valid_until: str | None = None
) -> dict[str, Any]:
    key_hash = apikeys.hash_key(key)
    return {
        "key_hash": key_hash,
        "key_id": key_hash[:12],
        "valid_until": valid_until,
        "client": IDENTITY if identity is None else identity,
    }


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


async def test_a_trailer_without_a_final_newline_ends_the_snapshot(
    serve: Callable[..., Any],
) -> None:
    """The last line of the streamed form may lack its newline, as JSON Lines allows."""
    body = ndjson({"version": 7}, entry("azk_a")) + b'{"end": true, "count": 1}'
    registry = await loaded_from(serve, web.Response(body=body, content_type=NDJSON))
    assert registry.version == 7
    assert registry.lookup(credential("azk_a")) == CLIENT


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


def streamed(version: int, *entries: dict[str, Any]) -> web.Response:
    """A well-formed streamed snapshot of these entries."""
    body = ndjson({"version": version}, *entries, {"end": True, "count": len(entries)})
    return web.Response(body=body, content_type=NDJSON, headers={"ETag": f'"v{version}"'})


async def loaded_from(serve: Callable[..., Any], *bodies: web.Response) -> SnapshotRegistry:
    """A registry following a server that answers ``bodies`` in turn; the first is loaded."""
    answers = list(bodies)

    async def handler(request: web.Request) -> web.Response:
        return answers.pop(0)

    registry = SnapshotRegistry(await serve(handler), "t")
    await registry.resync()
    return registry


def identity(client_id: str, roles: list[str], **fields: Any) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_name": client_id.upper(),
        "roles": roles,
        "status": "active",
        **fields,
    }


async def test_a_reload_replaces_the_copy_whole(serve: Callable[..., Any]) -> None:
    """After a reload, keys only in the old snapshot are unknown, new ones are found, and a
    changed client is served for its keys."""
    promoted = identity("c-1", ["admin", "r"])
    registry = await loaded_from(
        serve,
        streamed(1, entry("azk_a"), entry("azk_b")),
        streamed(2, entry("azk_b", promoted), entry("azk_c")),
    )
    await registry.resync()
    assert registry.version == 2
    assert registry.lookup(credential("azk_a")) is Reason.UNKNOWN_KEY
    assert registry.lookup(credential("azk_b")) == Client("c-1", "C-1", ("admin", "r"))
    assert registry.lookup(credential("azk_c")) == CLIENT


async def test_lookups_answer_from_the_copy_in_use_until_a_reload_is_complete(
    serve: Callable[..., Any],
) -> None:
    """While a snapshot is still arriving, the old copy answers; the new one takes over at
    once when its trailer is in."""
    midway, resume = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("If-None-Match") is None:
            return streamed(1, entry("azk_old"))
        reply = web.StreamResponse(headers={"Content-Type": NDJSON})
        await reply.prepare(request)
        await reply.write(ndjson({"version": 2}, entry("azk_new")))
        midway.set()
        await resume.wait()
        await reply.write(ndjson({"end": True, "count": 1}))
        return reply

    registry = SnapshotRegistry(await serve(handler), "t")
    await registry.resync()
    reload = asyncio.create_task(registry.resync())
    await midway.wait()
    assert registry.lookup(credential("azk_old")) == CLIENT
    assert registry.lookup(credential("azk_new")) is Reason.UNKNOWN_KEY
    resume.set()
    assert await reload == 2
    assert registry.lookup(credential("azk_old")) is Reason.UNKNOWN_KEY
    assert registry.lookup(credential("azk_new")) == CLIENT


@pytest.mark.parametrize(
    "body",
    [
        ndjson({"version": 5}, entry("azk_new"), {"key_hash": "00"}, {"end": True, "count": 2}),
        ndjson({"version": 5}, entry("azk_new"), {"end": True, "count": True}),
        ndjson({"version": 5}, {"end": True, "count": 0}, entry("azk_new")),
        ndjson({"version": 5}, entry("azk_new")) + b'{"end": true, "cou',
        ndjson({"version": 5}) + b'{"key_hash": "' + b"a" * (snapshot.MAX_LINE_BYTES + 1),
        ndjson({"version": 5}, entry("azk_new")) + b"[1] [2]\n",
        ndjson({"version": "5"}, {"end": True, "count": 0}),
        b"",
    ],
    ids=[
        "bad entry",
        "count not a number",
        "entries after the trailer",
        "trailer cut short",
        "line over the limit",
        "two documents on a line",
        "version not a number",
        "empty",
    ],
)
async def test_a_snapshot_outside_the_contract_keeps_the_copy_in_use(
    serve: Callable[..., Any], body: bytes
) -> None:
    """Any line that breaks the streamed form refuses the whole snapshot; the old copy stays."""
    registry = await loaded_from(
        serve, streamed(1, entry("azk_old")), web.Response(body=body, content_type=NDJSON)
    )
    with pytest.raises(SnapshotError, match="outside the contract"):
        await registry.resync()
    assert registry.version == 1
    assert registry.lookup(credential("azk_old")) == CLIENT
    assert registry.lookup(credential("azk_new")) is Reason.UNKNOWN_KEY


async def test_a_registry_error_keeps_the_copy_in_use(serve: Callable[..., Any]) -> None:
    """An HTTP error answer is a failed reload, never an empty copy."""
    registry = await loaded_from(serve, streamed(1, entry("azk_old")), web.Response(status=500))
    with pytest.raises(SnapshotError, match="HTTP 500"):
        await registry.resync()
    assert registry.lookup(credential("azk_old")) == CLIENT


async def test_a_connection_that_breaks_midway_keeps_the_copy_in_use() -> None:
    """A body shorter than its Content-Length (the registry went away) is a failed reload."""
    sent = ndjson({"version": 2}, entry("azk_new"))
    answers = [
        ndjson({"version": 1}, entry("azk_old"), {"end": True, "count": 1}),
        sent,
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = answers.pop(0)
        length = len(body) if answers else len(body) + 1000
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nContent-Length: {length}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        registry = SnapshotRegistry(f"http://127.0.0.1:{port}", "t")
        await registry.resync()
        with pytest.raises(SnapshotError, match="broke off"):
            await registry.resync()
    finally:
        server.close()
        await server.wait_closed()
    assert registry.version == 1
    assert registry.lookup(credential("azk_old")) == CLIENT


async def test_a_plain_json_snapshot_over_the_limit_is_refused(
    serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain form is read whole, so it is bounded; a larger registry must stream."""
    monkeypatch.setattr(snapshot, "MAX_DOCUMENT_BYTES", 1_000)
    keys = [entry(f"azk_{n}") for n in range(20)]

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"version": 2, "keys": keys})

    registry = SnapshotRegistry(await serve(handler), "t")
    with pytest.raises(SnapshotError, match="streamed form"):
        await registry.resync()
    assert not registry.ready


async def test_the_keys_of_one_client_share_one_client_object(serve: Callable[..., Any]) -> None:
    """A client repeated with each of its keys is held once, and clients with equal roles
    share one roles tuple."""
    registry = await loaded_from(
        serve,
        streamed(
            1,
            entry("azk_a1", identity("c-a", ["reader", "writer"])),
            entry("azk_b1", identity("c-b", ["reader", "writer"])),
            entry("azk_a2", identity("c-a", ["reader", "writer"]), "2030-01-01T00:00:00Z"),
            entry("azk_b2", identity("c-b", ["reader", "writer"])),
        ),
    )
    a1, a2, b1, b2 = (registry.lookup(credential(f"azk_{k}")) for k in ("a1", "a2", "b1", "b2"))
    assert isinstance(a1, Client)
    assert isinstance(b1, Client)
    assert a1 is a2
    assert b1 is b2
    assert a1.roles is b1.roles
    assert registry.find_client("c-a") is a1


async def test_a_reload_keeps_the_clients_that_did_not_change(serve: Callable[..., Any]) -> None:
    """An unchanged client is the very object it was before the reload (held once, not
    twice); a changed one is the new identity."""
    registry = await loaded_from(
        serve,
        streamed(1, entry("azk_a", identity("c-a", ["r"])), entry("azk_b", identity("c-b", []))),
        streamed(2, entry("azk_a", identity("c-a", ["r"])), entry("azk_b", identity("c-b", ["x"]))),
    )
    before_a, before_b = registry.find_client("c-a"), registry.find_client("c-b")
    await registry.resync()
    assert registry.find_client("c-a") is before_a
    assert registry.find_client("c-b") != before_b
    assert registry.lookup(credential("azk_b")) == Client("c-b", "C-B", ("x",))


@pytest.mark.parametrize(
    ("first", "again"),
    [
        (
            {"rate_limit": {"requests_per_unit": 1, "unit": "second"}},
            {"rate_limit": {"requests_per_unit": True, "unit": "second"}},
        ),
        (
            {"rate_limit": {"requests_per_unit": 1, "unit": "second"}},
            {"rate_limit": {"requests_per_unit": 1.0, "unit": "second"}},
        ),
        ({}, {"status": "suspended"}),
        ({}, {"email": "x@example.com"}),
        ({}, {"roles": "r"}),
    ],
    ids=["a count of true", "a count of 1.0", "not active", "an unknown field", "roles not a list"],
)
async def test_a_repeated_identity_is_as_strictly_checked_as_the_first(
    serve: Callable[..., Any], first: dict[str, Any], again: dict[str, Any]
) -> None:
    """An identity that only looks like one already seen (equal in Python, not in JSON) is
    parsed, and refused, like any other."""
    good = identity("c-a", ["r"], **first)
    bad = {**good, **again}
    registry = await loaded_from(
        serve, streamed(1, entry("azk_old")), streamed(2, entry("azk_a", good), entry("azk_b", bad))
    )
    with pytest.raises(SnapshotError, match="outside the contract"):
        await registry.resync()
    assert registry.version == 1


async def test_repeated_identities_with_a_rate_limit_or_duplicate_roles_load_as_the_first(
    serve: Callable[..., Any],
) -> None:
    """A rate limit, a null one, and roles listed twice over come out as parsing gives."""
    limited = identity("c-l", ["r"], rate_limit={"requests_per_unit": 5, "unit": "minute"})
    unlimited = identity("c-u", ["r", "r"], rate_limit=None)
    registry = await loaded_from(
        serve,
        streamed(
            1,
            entry("azk_l1", limited),
            entry("azk_l2", limited),
            entry("azk_u1", unlimited),
            entry("azk_u2", unlimited),
        ),
    )
    assert registry.lookup(credential("azk_l2")) == Client(
        "c-l", "C-L", ("r",), RateLimit(5, "minute")
    )
    assert registry.lookup(credential("azk_u2")) == Client("c-u", "C-U", ("r",))


async def test_a_snapshot_keys_valid_until_ends_it_on_time(serve: Callable[..., Any]) -> None:
    """A key in its grace period validates until its valid_until, then is refused."""
    clock = Clock()

    async def handler(request: web.Request) -> web.Response:
        return streamed(1, entry("azk_old", valid_until="2030-01-01T00:00:00.000000Z"))

    registry = SnapshotRegistry(await serve(handler), "t", clock=clock)
    await registry.resync()
    clock.now = 1893456000.0 - 1
    assert registry.lookup(credential("azk_old")) == CLIENT
    clock.now += 1
    assert registry.lookup(credential("azk_old")) is Reason.KEY_REVOKED


def test_a_client_is_found_by_id_until_its_last_key_goes() -> None:
    """find_client answers from the copy: the client while it has a key, then nothing."""
    registry = loaded()
    registry.apply(upsert(1, "azk_a"))
    registry.apply(upsert(2, "azk_b", valid_until="2030-01-01T00:00:00.000000Z"))
    registry.apply(delete(3, "azk_a"))
    assert registry.find_client("c-1") == CLIENT
    registry.apply(delete(4, "azk_b"))
    assert registry.find_client("c-1") is None
