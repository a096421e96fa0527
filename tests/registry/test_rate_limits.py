"""Per-client rate limits in the registry, over real HTTP, against SQLite and PostgreSQL alike:
set on registration and by PATCH (null clears), shown on reads, and carried by the client's
identity in verify answers, snapshot entries and change events, where a change of it is an
upsert for every valid key of the client."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from authz_service import apikeys
from authz_service.contract import parse_answer, parse_change, parse_entry
from authz_service.model import Client, RateLimit
from client_registry import db
from client_registry.db import Database
from tests.registry.conftest import SERVICE, Registry, read_event

pytestmark = pytest.mark.e2e
FIVE_A_SECOND = {"requests_per_unit": 5, "unit": "second"}


async def create(registry: Registry, rate_limit: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"client_name": "Limited", "email": "ops@acme.example"}
    if rate_limit is not None:
        body["rate_limit"] = rate_limit
    status, created = await registry.call("POST", "/clients", json=body)
    assert status == 201, created
    return dict(created)


async def patch(registry: Registry, client_id: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await registry.call("PATCH", f"/clients/{client_id}", json=body)


async def changes_since(registry: Registry, version: int) -> list[dict[str, Any]]:
    status, body = await registry.call("GET", f"/v1/changes?since={version}", token=SERVICE)
    assert status == 200
    return list(body["changes"])


async def current_version(registry: Registry) -> int:
    return int((await registry.call("GET", "/v1/changes", token=SERVICE))[1]["current_version"])


async def test_a_limit_set_on_registration_is_shown_and_verified(registry: Registry) -> None:
    """POST /clients with rate_limit: the answer, GET and the verify answer carry it, and the
    verify answer parses, as authz-service reads it, into the client's limit."""
    created = await create(registry, FIVE_A_SECOND)
    assert created["rate_limit"] == FIVE_A_SECOND
    status, shown = await registry.call("GET", f"/clients/{created['client_id']}")
    assert (status, shown["rate_limit"]) == (200, FIVE_A_SECOND)
    verdict = await registry.verify(created["api_key"])
    assert verdict["client"]["rate_limit"] == FIVE_A_SECOND
    client = parse_answer(verdict).result
    assert isinstance(client, Client)
    assert client.rate_limit == RateLimit(5, "second")


async def test_a_client_without_a_limit_shows_null_and_verifies_without_one(
    registry: Registry,
) -> None:
    """Management reads show rate_limit null; the identity omits it."""
    created = await create(registry)
    assert created["rate_limit"] is None
    assert "rate_limit" not in (await registry.verify(created["api_key"]))["client"]


async def test_patch_changes_the_limit_and_null_clears_it(registry: Registry) -> None:
    """PATCH rate_limit replaces it; PATCH of other fields keeps it; null removes it."""
    created = await create(registry, FIVE_A_SECOND)
    path_id = created["client_id"]
    hourly = {"requests_per_unit": 1000, "unit": "hour"}
    assert (await patch(registry, path_id, {"rate_limit": hourly}))[1]["rate_limit"] == hourly
    assert (await patch(registry, path_id, {"client_name": "Renamed"}))[1]["rate_limit"] == hourly
    assert (await registry.verify(created["api_key"]))["client"]["rate_limit"] == hourly
    status, cleared = await patch(registry, path_id, {"rate_limit": None})
    assert (status, cleared["rate_limit"]) == (200, None)
    assert "rate_limit" not in (await registry.verify(created["api_key"]))["client"]


@pytest.mark.parametrize(
    "rate_limit",
    [
        {"requests_per_unit": 0, "unit": "second"},
        {"requests_per_unit": -1, "unit": "second"},
        {"requests_per_unit": 1_000_000_001, "unit": "second"},
        {"requests_per_unit": True, "unit": "second"},
        {"requests_per_unit": 1.5, "unit": "second"},
        {"requests_per_unit": 5, "unit": "week"},
        {"requests_per_unit": 5},
        {"requests_per_unit": 5, "unit": "second", "burst": 10},
        "5/second",
        [5, "second"],
    ],
)
async def test_a_malformed_limit_is_refused_naming_rate_limit(
    registry: Registry, rate_limit: Any
) -> None:
    """400 with field rate_limit, on registration and on PATCH; nothing changes."""
    status, body = await registry.call(
        "POST",
        "/clients",
        json={"client_name": "A", "email": "a@b.example", "rate_limit": rate_limit},
    )
    assert (status, body["field"]) == (400, "rate_limit")
    created = await create(registry, FIVE_A_SECOND)
    status, body = await patch(registry, created["client_id"], {"rate_limit": rate_limit})
    assert (status, body["field"]) == (400, "rate_limit")
    assert (await registry.verify(created["api_key"]))["client"]["rate_limit"] == FIVE_A_SECOND


async def test_snapshot_entries_carry_the_limit(registry: Registry) -> None:
    """Limited clients' entries carry it, others' do not; both parse as the contract has it,
    and each entry's client is the identity its verify answer has."""
    limited = await create(registry, FIVE_A_SECOND)
    plain = await create(registry)
    _, snapshot = await registry.call("GET", "/v1/snapshot", token=SERVICE)
    limits = {
        entry["client"]["client_id"]: parse_entry(entry).client.rate_limit
        for entry in snapshot["keys"]
    }
    assert limits == {limited["client_id"]: RateLimit(5, "second"), plain["client_id"]: None}
    identities = {entry["client"]["client_id"]: entry["client"] for entry in snapshot["keys"]}
    for created in (limited, plain):
        verified = (await registry.verify(created["api_key"]))["client"]
        assert identities[created["client_id"]] == verified


async def test_changing_the_limit_upserts_every_valid_key_of_the_client(
    registry: Registry,
) -> None:
    """A client with two valid keys (a regeneration's grace period): setting, changing and
    clearing its limit each log an upsert for both keys, with the new identity; a revoked key
    of the client gets none."""
    created = await create(registry)
    client_id = created["client_id"]
    path = f"/clients/{client_id}/api-key"
    second = (await registry.call("POST", path, json={"grace_seconds": 0}))[1]
    third = (await registry.call("POST", path, json={"grace_seconds": 600}))[1]
    valid = {apikeys.hash_key(second["api_key"]), apikeys.hash_key(third["api_key"])}
    for rate_limit, expected in [
        (FIVE_A_SECOND, RateLimit(5, "second")),
        ({"requests_per_unit": 7, "unit": "day"}, RateLimit(7, "day")),
        (None, None),
    ]:
        since = await current_version(registry)
        assert (await patch(registry, client_id, {"rate_limit": rate_limit}))[0] == 200
        changes = [parse_change(c) for c in await changes_since(registry, since)]
        assert {c.op for c in changes} == {"upsert"}
        assert {c.digest.hex() for c in changes} == valid
        assert {c.entry.client.rate_limit for c in changes if c.entry} == {expected}


async def test_setting_the_same_limit_again_logs_no_change(registry: Registry) -> None:
    """Nothing that validates changed: no event for the followers to apply."""
    created = await create(registry, FIVE_A_SECOND)
    since = await current_version(registry)
    assert (await patch(registry, created["client_id"], {"rate_limit": FIVE_A_SECOND}))[0] == 200
    assert await changes_since(registry, since) == []


async def test_a_change_event_of_a_new_limit_reaches_the_stream(registry: Registry) -> None:
    """The upsert arrives on the change stream, as replicas follow it."""
    created = await create(registry)
    since = await current_version(registry)
    async with registry.session.get(
        registry.base + f"/v1/changes/stream?since={since}",
        headers={"Authorization": f"Bearer {SERVICE}"},
    ) as stream:
        await read_event(stream)
        await patch(registry, created["client_id"], {"rate_limit": FIVE_A_SECOND})
        event = await read_event(stream)
    change = parse_change(event.data)
    assert change.op == "upsert"
    assert change.digest.hex() == apikeys.hash_key(created["api_key"])
    assert change.entry is not None
    assert change.entry.client.rate_limit == RateLimit(5, "second")


def test_a_database_from_before_rate_limits_keeps_its_clients_without_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 on a registry of schema 2: its clients are kept, with no limit."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:2])
    old = Database(url)
    assert old.migrate() == 2
    old.run_sync(
        lambda tx: tx.execute(
            "INSERT INTO clients (client_id, name, email, roles, status, created_at, "
            "updated_at) VALUES ('cl_old', 'Old', 'o@example.com', '[]', 'active', 0, 0)"
        ),
        write=True,
    )
    old.close()
    monkeypatch.undo()
    new = Database(url)
    assert new.migrate() == len(db.MIGRATIONS)
    new.close()
    with sqlite3.connect(tmp_path / "old.db") as connection:
        row = connection.execute(
            "SELECT client_id, rate_limit_requests, rate_limit_unit FROM clients"
        ).fetchone()
    assert row == ("cl_old", None, None)
