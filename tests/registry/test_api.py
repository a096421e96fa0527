"""The registry's contract, over real HTTP, against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from importlib import resources
from typing import Any

import pytest
import yaml

from authz_service import apikeys
from client_registry import api
from client_registry.store import ACTIVE
from tests.registry.conftest import ADMIN, SERVICE, Event, Registry, read_event

pytestmark = pytest.mark.e2e


class TestClients:
    async def test_registering_a_client_returns_it_with_a_key_shown_once(
        self, registry: Registry
    ) -> None:
        """201 with the client and a checksummed key; reads never show key material again."""
        created = await registry.create("Example Client", ["reader"])
        assert created["client_name"] == "Example Client"
        assert created["email"] == "ops@acme.example"
        assert created["roles"] == ["reader"]
        assert created["status"] == ACTIVE
        assert apikeys.has_valid_checksum(created["api_key"])
        status, body = await registry.call("GET", f"/clients/{created['client_id']}")
        assert status == 200
        assert created["api_key"] not in json.dumps(body)
        assert [k["key_id"] for k in body["keys"]] == [created["key_id"]]

    async def test_clients_are_listed_in_pages(self, registry: Registry) -> None:
        """limit and after page through clients in id order."""
        ids = sorted([(await registry.create(f"C{n}"))["client_id"] for n in range(3)])
        status, first = await registry.call("GET", "/clients?limit=2")
        assert status == 200
        assert [c["client_id"] for c in first["clients"]] == ids[:2]
        _, second = await registry.call("GET", f"/clients?limit=2&after={first['next_after']}")
        assert [c["client_id"] for c in second["clients"]] == ids[2:]
        assert second["next_after"] is None

    async def test_a_client_can_be_renamed_and_given_roles(self, registry: Registry) -> None:
        """PATCH changes only what it names; verification sees the new identity."""
        created = await registry.create()
        status, body = await registry.call(
            "PATCH",
            f"/clients/{created['client_id']}",
            json={"client_name": "Renamed", "roles": ["admin"]},
        )
        assert status == 200
        assert (body["client_name"], body["roles"], body["email"]) == (
            "Renamed",
            ["admin"],
            "ops@acme.example",
        )
        verdict = await registry.verify(created["api_key"])
        assert verdict["client"]["client_name"] == "Renamed"
        assert verdict["client"]["roles"] == ["admin"]

    async def test_a_deleted_client_is_gone_with_its_keys(self, registry: Registry) -> None:
        """204, then 404 on read and 'unknown' on verification."""
        created = await registry.create()
        assert (await registry.call("DELETE", f"/clients/{created['client_id']}"))[0] == 204
        assert (await registry.call("GET", f"/clients/{created['client_id']}"))[0] == 404
        assert await registry.verify(created["api_key"]) == {"valid": False, "reason": "unknown"}


class TestKeys:
    async def test_a_valid_key_verifies_with_its_client(self, registry: Registry) -> None:
        """The answer carries the identity the ext_authz service needs."""
        created = await registry.create("Acme", ["reader"])
        assert await registry.verify(created["api_key"]) == {
            "valid": True,
            "client": {
                "client_id": created["client_id"],
                "client_name": "Acme",
                "roles": ["reader"],
                "status": "active",
            },
            "valid_until": None,
        }

    async def test_an_unknown_key_does_not_verify(self, registry: Registry) -> None:
        """A well-formed key that was never issued is 'unknown'."""
        assert await registry.verify(apikeys.generate()) == {"valid": False, "reason": "unknown"}

    async def test_a_revoked_key_stops_verifying_and_revoking_twice_conflicts(
        self, registry: Registry
    ) -> None:
        """DELETE /clients/{id}/api-key: 204, then 'revoked'; a second revoke is 409."""
        created = await registry.create()
        path = f"/clients/{created['client_id']}/api-key"
        assert (await registry.call("DELETE", path))[0] == 204
        assert await registry.verify(created["api_key"]) == {"valid": False, "reason": "revoked"}
        status, body = await registry.call("DELETE", path)
        assert (status, body["error"]) == (409, "conflict")

    async def test_regenerating_without_grace_replaces_the_key_at_once(
        self, registry: Registry
    ) -> None:
        """The new key verifies; the old one is revoked immediately."""
        created = await registry.create()
        status, body = await registry.call("POST", f"/clients/{created['client_id']}/api-key")
        assert status == 201
        assert (await registry.verify(body["api_key"]))["valid"]
        assert await registry.verify(created["api_key"]) == {"valid": False, "reason": "revoked"}

    async def test_regenerating_with_grace_keeps_the_old_key_for_that_long(
        self, registry: Registry
    ) -> None:
        """Both keys verify during the grace period; then only the new one."""
        created = await registry.create()
        status, body = await registry.call(
            "POST", f"/clients/{created['client_id']}/api-key", json={"grace_seconds": 0.5}
        )
        assert status == 201
        old = await registry.verify(created["api_key"])
        assert old["valid"]
        assert old["valid_until"] == body["previous_keys_valid_until"]
        assert (await registry.verify(body["api_key"]))["valid"]
        await asyncio.sleep(0.6)
        assert await registry.verify(created["api_key"]) == {"valid": False, "reason": "revoked"}
        assert (await registry.verify(body["api_key"]))["valid"]

    async def test_a_suspended_clients_keys_stop_verifying_until_reactivated(
        self, registry: Registry
    ) -> None:
        """status suspended -> 'suspended'; active again -> valid."""
        created = await registry.create()
        path = f"/clients/{created['client_id']}"
        await registry.call("PATCH", path, json={"status": "suspended"})
        assert await registry.verify(created["api_key"]) == {"valid": False, "reason": "suspended"}
        await registry.call("PATCH", path, json={"status": "active"})
        assert (await registry.verify(created["api_key"]))["valid"]


class TestSync:
    async def test_the_snapshot_lists_valid_keys_by_hash_with_an_etag(
        self, registry: Registry
    ) -> None:
        """Only valid keys, as hashes; If-None-Match with the ETag gives 304."""
        kept = await registry.create("Kept")
        revoked = await registry.create("Revoked")
        await registry.call("DELETE", f"/clients/{revoked['client_id']}/api-key")
        async with registry.session.get(
            registry.base + "/v1/snapshot", headers={"Authorization": f"Bearer {SERVICE}"}
        ) as reply:
            assert reply.status == 200
            etag = reply.headers["ETag"]
            snapshot = await reply.json()
        assert [k["key_hash"] for k in snapshot["keys"]] == [apikeys.hash_key(kept["api_key"])]
        assert snapshot["keys"][0]["client"]["client_name"] == "Kept"
        assert etag == f'"v{snapshot["version"]}"'
        async with registry.session.get(
            registry.base + "/v1/snapshot",
            headers={"Authorization": f"Bearer {SERVICE}", "If-None-Match": etag},
        ) as reply:
            assert reply.status == 304

    async def test_changes_since_a_version_replay_onto_the_snapshot(
        self, registry: Registry
    ) -> None:
        """Applying the delta to an old snapshot gives the new snapshot."""
        first = await registry.create("First")
        _, old = await registry.call("GET", "/v1/snapshot", token=SERVICE)
        await registry.call("DELETE", f"/clients/{first['client_id']}/api-key")
        second = await registry.create("Second")
        await registry.call("POST", f"/clients/{second['client_id']}/api-key")
        status, delta = await registry.call(
            "GET", f"/v1/changes?since={old['version']}", token=SERVICE
        )
        assert status == 200
        keys = {k["key_hash"]: k for k in old["keys"]}
        for change in delta["changes"]:
            if change["op"] == "upsert":
                keys[change["key_hash"]] = change["entry"]
            else:
                keys.pop(change["key_hash"], None)
        _, new = await registry.call("GET", "/v1/snapshot", token=SERVICE)
        assert delta["version"] == new["version"]
        assert sorted(keys) == sorted(k["key_hash"] for k in new["keys"])

    async def test_a_version_ahead_of_the_registry_asks_for_a_resync(
        self, registry: Registry
    ) -> None:
        """410 resync_required when the copy's version is unknown here."""
        status, body = await registry.call("GET", "/v1/changes?since=999999", token=SERVICE)
        assert (status, body["error"]) == (410, "resync_required")

    async def test_the_change_stream_pushes_a_revocation(self, registry: Registry) -> None:
        """An SSE subscriber is told where it starts (ready), then sees the delete event."""
        created = await registry.create()
        _, snapshot = await registry.call("GET", "/v1/snapshot", token=SERVICE)
        async with registry.session.get(
            registry.base + f"/v1/changes/stream?since={snapshot['version']}",
            headers={"Authorization": f"Bearer {SERVICE}"},
        ) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            ready = await read_event(stream)
            assert ready == Event(snapshot["version"], "ready", {"version": snapshot["version"]})
            await registry.call("DELETE", f"/clients/{created['client_id']}/api-key")
            event = await asyncio.wait_for(read_event(stream), 10)
        assert (event.id, event.name) == (event.data["version"], "change")
        assert event.data["op"] == "delete"
        assert event.data["reason"] == "revoked"
        assert event.data["key_hash"] == apikeys.hash_key(created["api_key"])


class TestErrors:
    @pytest.mark.parametrize(
        ("kwargs", "status", "field"),
        [
            ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
            ({"json": ["a list"]}, 400, None),
            ({"json": {"email": "a@b.example"}}, 400, "client_name"),
            ({"json": {"client_name": "A"}}, 400, "email"),
            ({"json": {"client_name": "A", "email": "not-an-email"}}, 400, "email"),
            ({"json": {"client_name": "", "email": "a@b.example"}}, 400, "client_name"),
            ({"json": {"client_name": "A\nB", "email": "a@b.example"}}, 400, "client_name"),
            (
                {"json": {"client_name": "A", "email": "a@b.example", "roles": ["a b"]}},
                400,
                "roles",
            ),
            ({"json": {"client_name": "A", "email": "a@b.example", "colour": 1}}, 400, "colour"),
            ({"data": "x=1", "headers": {"Content-Type": "text/plain"}}, 415, None),
            ({"json": {"client_name": "A" * 20000, "email": "a@b.example"}}, 413, None),
        ],
    )
    async def test_bad_registrations_are_refused_naming_the_field(
        self, registry: Registry, kwargs: dict[str, Any], status: int, field: str | None
    ) -> None:
        """JSON errors with the field at fault; nothing is created."""
        got, body = await registry.call("POST", "/clients", **kwargs)
        assert got == status
        assert set(body) >= {"error", "message"}
        assert body.get("field") == field
        assert (await registry.call("GET", "/clients"))[1]["clients"] == []

    async def test_a_missing_token_is_401_with_a_challenge(self, registry: Registry) -> None:
        """No bearer token: 401 unauthorized and WWW-Authenticate."""
        async with registry.session.get(registry.base + "/clients") as reply:
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await reply.json())["error"] == "unauthorized"

    @pytest.mark.parametrize(
        ("method", "path", "token"),
        [
            ("GET", "/clients", SERVICE),
            ("GET", "/clients", "x" * 30),
            ("GET", "/v1/snapshot", ADMIN),
            ("POST", "/v1/keys/verify", ADMIN),
        ],
    )
    async def test_the_wrong_token_is_403(
        self, registry: Registry, method: str, path: str, token: str
    ) -> None:
        """Each API accepts only its own token."""
        status, body = await registry.call(method, path, token=token, json={"api_key": "k"})
        assert (status, body["error"]) == (403, "forbidden")

    @pytest.mark.parametrize(
        ("method", "suffix"),
        [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("DELETE", "/api-key"), ("POST", "/api-key")],
    )
    async def test_unknown_client_ids_are_404(
        self, registry: Registry, method: str, suffix: str
    ) -> None:
        """Every per-client endpoint answers 404 not_found for an unknown id."""
        status, body = await registry.call(method, f"/clients/cl_nope{suffix}", json={})
        assert (status, body["error"]) == (404, "not_found")

    @pytest.mark.parametrize("grace", [-1, 3601, "soon", True])
    async def test_a_grace_period_out_of_bounds_is_refused(
        self, registry: Registry, grace: object
    ) -> None:
        """grace_seconds is a number from 0 to max_grace_seconds."""
        created = await registry.create()
        status, body = await registry.call(
            "POST", f"/clients/{created['client_id']}/api-key", json={"grace_seconds": grace}
        )
        assert (status, body["field"]) == (400, "grace_seconds")

    async def test_an_oversized_key_is_refused_before_any_lookup(self, registry: Registry) -> None:
        """api_key is bounded."""
        status, body = await registry.call(
            "POST", "/v1/keys/verify", token=SERVICE, json={"api_key": "k" * 513}
        )
        assert (status, body["field"]) == (400, "api_key")


async def test_no_plaintext_key_is_stored_or_logged(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """The database holds hashes only, and no log line carries a key."""
    with caplog.at_level(logging.DEBUG):
        created = await registry.create()
        regenerated = (await registry.call("POST", f"/clients/{created['client_id']}/api-key"))[1]
        await registry.verify(created["api_key"])
    keys = [created["api_key"], regenerated["api_key"]]
    dump = database_dump(registry.settings.database_url)
    for key in keys:
        assert key not in dump
        assert key not in caplog.text
    assert apikeys.hash_key(keys[1]) in dump


def database_dump(url: str) -> str:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            return "\n".join(connection.iterdump())
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url) as connection:
        rows = []
        for table in ("clients", "api_keys", "changes"):
            rows += [repr(row) for row in connection.execute(f"SELECT * FROM {table}")]  # noqa: S608
        return "\n".join(rows)


def test_the_openapi_document_describes_every_route() -> None:
    """Each route the app serves is in openapi.yaml, with the same methods, and vice versa."""
    from client_registry.api import ApiSettings  # noqa: PLC0415
    from client_registry.feed import ChangeFeed  # noqa: PLC0415

    app = api.build_app(None, ApiSettings("a" * 24, "b" * 24, 1, 1, 1), ChangeFeed(1))  # type: ignore[arg-type]
    served: dict[str, set[str]] = {}
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            served.setdefault(route.resource.canonical, set()).add(route.method.lower())
    document = yaml.safe_load((resources.files("client_registry") / "openapi.yaml").read_text())
    documented = {
        path: {m for m in operations if m in {"get", "post", "patch", "delete", "put"}}
        for path, operations in document["paths"].items()
    }
    assert documented == served
