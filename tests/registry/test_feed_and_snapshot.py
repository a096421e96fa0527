"""Keeping copies in sync at scale, at small size: the streamed snapshot, versions on every
answer, change-log pruning, and change streams served from one reader per process. These are
the correctness halves of benchmarks/scale_bench.py's scenarios."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from authz_service import apikeys
from client_registry import api, feed, store
from client_registry import app as registry_app
from client_registry.settings import RegistrySettings
from tests.e2e.harness import registry_process
from tests.registry.conftest import ADMIN, SERVICE, Event, Registry, read_event, started
from tests.registry.postgres import create_database, seq_scans

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {SERVICE}"}


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    """Wait until ``condition`` holds, checking it every few milliseconds."""
    async with asyncio.timeout(within):
        for _ in itertools.count():
            if await condition():
                return
            await asyncio.sleep(0.01)


async def current_version(registry: Registry) -> int:
    status, body = await registry.call("GET", "/v1/changes", token=SERVICE)
    assert status == 200
    return int(body["current_version"])


async def snapshot(
    registry: Registry, accept: str | None = None, etag: str | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    headers = dict(AUTH)
    if accept:
        headers["Accept"] = accept
    if etag:
        headers["If-None-Match"] = etag
    async with registry.session.get(registry.base + "/v1/snapshot", headers=headers) as reply:
        return reply.status, CIMultiDict(reply.headers), await reply.read()


class TestVersions:
    async def test_changes_without_since_give_the_current_version_and_no_changes(
        self, registry: Registry
    ) -> None:
        """The cheap way to learn where the log stands."""
        await registry.create()
        status, body = await registry.call("GET", "/v1/changes", token=SERVICE)
        assert status == 200
        assert body["changes"] == []
        assert body["version"] == body["current_version"] >= 1

    async def test_every_verdict_carries_the_version_it_reflects(self, registry: Registry) -> None:
        """Valid, unknown and revoked answers name the change-log version of their snapshot:
        a revoked key's answer is at least as new as its delete event."""
        created = await registry.create()
        valid = await registry.verify_versioned(created["api_key"])
        assert valid["valid"] is True
        assert valid["version"] == await current_version(registry)
        unknown = await registry.verify_versioned(apikeys.generate())
        assert unknown["version"] == valid["version"]
        await registry.call("DELETE", f"/clients/{created['client_id']}/api-key")
        _, delta = await registry.call(
            "GET", f"/v1/changes?since={valid['version']}", token=SERVICE
        )
        (deleted,) = delta["changes"]
        revoked = await registry.verify_versioned(created["api_key"])
        assert (revoked["valid"], revoked["reason"]) == (False, "revoked")
        assert revoked["version"] == deleted["version"] > valid["version"]

    async def test_delete_events_say_why_and_whose(self, registry: Registry) -> None:
        """revoked (revoke, or regenerate without grace), suspended, deleted; with client_id."""
        revoked, regenerated, suspended, deleted = [await registry.create() for _ in range(4)]
        since = await current_version(registry)
        await registry.call("DELETE", f"/clients/{revoked['client_id']}/api-key")
        await registry.call("POST", f"/clients/{regenerated['client_id']}/api-key")
        await registry.call(
            "PATCH", f"/clients/{suspended['client_id']}", json={"status": "suspended"}
        )
        await registry.call("DELETE", f"/clients/{deleted['client_id']}")
        _, delta = await registry.call("GET", f"/v1/changes?since={since}", token=SERVICE)
        reasons = {
            (c["client_id"], c["key_hash"]): c["reason"]
            for c in delta["changes"]
            if c["op"] == "delete"
        }
        assert reasons == {
            (c["client_id"], apikeys.hash_key(c["api_key"])): reason
            for c, reason in [
                (revoked, "revoked"),
                (regenerated, "revoked"),
                (suspended, "suspended"),
                (deleted, "deleted"),
            ]
        }


class TestSnapshot:
    @pytest.fixture(autouse=True)
    def small_batches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(api, "SNAPSHOT_BATCH", 2)  # several pieces from a few keys

    async def test_the_streamed_snapshot_equals_the_json_form(self, registry: Registry) -> None:
        """NDJSON: the version line, one entry a line, a trailer with the count; the same
        entries, ETag and version as the JSON document."""
        for n in range(5):
            await registry.create(f"C{n}", ["reader"])
        revoked = await registry.create("Revoked")
        await registry.call("DELETE", f"/clients/{revoked['client_id']}/api-key")
        status, headers, body = await snapshot(registry)
        assert (status, headers["Content-Type"]) == (200, "application/json")
        document = json.loads(body)
        status, streamed_headers, streamed = await snapshot(registry, "application/x-ndjson")
        assert (status, streamed_headers["Content-Type"]) == (200, "application/x-ndjson")
        lines = [json.loads(line) for line in streamed.decode().splitlines()]
        assert lines[0] == {"version": document["version"]}
        assert lines[-1] == {"end": True, "count": 5}
        assert lines[1:-1] == document["keys"]
        assert streamed_headers["ETag"] == headers["ETag"] == f'"v{document["version"]}"'
        assert revoked["api_key"] not in streamed.decode()

    @pytest.mark.parametrize("accept", [None, "application/x-ndjson"])
    async def test_an_unchanged_snapshot_is_a_304(
        self, registry: Registry, accept: str | None
    ) -> None:
        """If-None-Match with the current version's ETag gives 304 (either form); after a
        change, the full snapshot again."""
        created = await registry.create()
        _, headers, _ = await snapshot(registry, accept)
        status, again, body = await snapshot(registry, accept, etag=headers["ETag"])
        assert (status, again["ETag"], body) == (304, headers["ETag"], b"")
        await registry.call("DELETE", f"/clients/{created['client_id']}/api-key")
        status, changed, _ = await snapshot(registry, accept, etag=headers["ETag"])
        assert status == 200
        assert changed["ETag"] != headers["ETag"]

    async def test_an_empty_registry_streams_a_version_and_a_trailer(
        self, registry: Registry
    ) -> None:
        """No keys: two lines, and the JSON form an empty list."""
        _, _, streamed = await snapshot(registry, "application/x-ndjson")
        assert [json.loads(line) for line in streamed.splitlines()] == [
            {"version": 0},
            {"end": True, "count": 0},
        ]
        _, _, body = await snapshot(registry)
        assert json.loads(body) == {"version": 0, "keys": []}

    async def test_snapshots_beyond_the_limit_are_refused_with_retry_after(
        self,
        registry_settings: RegistrySettings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While one snapshot is being produced, a second (limit 1) gets 503 and Retry-After;
        once it is done, the next one is served."""
        release, producing = threading.Event(), threading.Event()
        entries = store.KeySnapshot.entries

        def held(self: store.KeySnapshot, size: int) -> Iterator[list[str]]:
            producing.set()
            release.wait(30)
            yield from entries(self, size)

        monkeypatch.setattr(store.KeySnapshot, "entries", held)
        async with started(registry_settings, max_snapshot_streams=1) as registry:
            await registry.create()
            first = asyncio.create_task(snapshot(registry, "application/x-ndjson"))
            await asyncio.to_thread(producing.wait, 30)
            status, headers, body = await snapshot(registry)
            assert status == 503
            assert json.loads(body)["error"] == "unavailable"
            assert 1 <= int(headers["Retry-After"]) <= 10
            release.set()
            assert (await first)[0] == 200
            assert (await snapshot(registry))[0] == 200

    async def test_a_snapshot_whose_client_leaves_is_closed_and_frees_its_slot(
        self,
        registry_settings: RegistrySettings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The client goes after the first entries: the database snapshot is closed (its
        connection released), and the one slot serves the next snapshot."""
        release, closed = threading.Event(), threading.Event()
        entries, close = store.KeySnapshot.entries, store.KeySnapshot.close

        def held(self: store.KeySnapshot, size: int) -> Iterator[list[str]]:
            for n, batch in enumerate(entries(self, size)):
                if n == 1:
                    release.wait(30)
                yield batch

        def closing(self: store.KeySnapshot) -> None:
            close(self)
            closed.set()

        monkeypatch.setattr(store.KeySnapshot, "entries", held)
        monkeypatch.setattr(store.KeySnapshot, "close", closing)
        async with started(registry_settings, max_snapshot_streams=1) as registry:
            for n in range(5):
                await registry.create(f"C{n}")
            async with (
                aiohttp.ClientSession() as leaving,
                leaving.get(
                    registry.base + "/v1/snapshot",
                    headers={**AUTH, "Accept": "application/x-ndjson"},
                ) as reply,
            ):
                assert json.loads(await reply.content.readline()) == {
                    "version": await current_version(registry)
                }
            release.set()
            assert await asyncio.to_thread(closed.wait, 30)

            async def served() -> bool:
                return (await snapshot(registry))[0] == 200

            await eventually(served)


class TestPruning:
    async def test_a_follower_behind_the_pruned_log_is_told_to_resync(
        self, registry: Registry
    ) -> None:
        """After pruning, since older than the log is 410 resync_required with the current
        version, for the delta form and the stream alike; since at the cut still works."""
        for n in range(4):
            await registry.create(f"C{n}")
        current = await current_version(registry)
        assert await registry.running.store.prune(retention=0, max_rows=1) == current - 1
        for path in ("/v1/changes?since=0", "/v1/changes/stream?since=0"):
            status, body = await registry.call("GET", path, token=SERVICE)
            assert (status, body["error"], body["current_version"]) == (
                410,
                "resync_required",
                current,
            )
        status, body = await registry.call("GET", f"/v1/changes?since={current - 1}", token=SERVICE)
        assert status == 200
        assert [c["version"] for c in body["changes"]] == [current]

    async def test_the_version_survives_an_emptied_log_and_a_restart(
        self, registry_settings: RegistrySettings
    ) -> None:
        """Pruned to nothing, the log keeps its version; the next change comes after it."""
        async with started(registry_settings) as registry:
            created = await registry.create()
            await registry.call("DELETE", f"/clients/{created['client_id']}/api-key")
            current = await current_version(registry)
            assert await registry.running.store.prune(retention=1e-9, max_rows=0) == current
        async with started(registry_settings) as registry:
            assert await current_version(registry) == current
            assert (await registry.verify_versioned(created["api_key"]))["version"] == current
            _, _, streamed = await snapshot(registry, "application/x-ndjson")
            assert json.loads(streamed.splitlines()[0]) == {"version": current}
            await registry.create()
            assert await current_version(registry) == current + 1

    async def test_pruning_keeps_what_is_young_enough_and_within_the_count(
        self, registry: Registry
    ) -> None:
        """Nothing to drop under either limit: the log stays whole."""
        for n in range(3):
            await registry.create(f"C{n}")
        assert await registry.running.store.prune(retention=3600, max_rows=10) == 0
        _, body = await registry.call("GET", "/v1/changes?since=0", token=SERVICE)
        assert len(body["changes"]) == 3

    async def test_the_registry_prunes_by_itself(
        self, registry: Registry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """prune_forever applies the retention settings on its interval."""
        for n in range(3):
            await registry.create(f"C{n}")
        store = registry.running.store
        pruner = asyncio.create_task(
            registry_app.prune_forever("change_log", lambda: store.prune(0, 1), 0.01)
        )
        try:

            async def pruned() -> bool:
                status, _ = await registry.call("GET", "/v1/changes?since=0", token=SERVICE)
                return status == 410

            await eventually(pruned)
        finally:
            pruner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pruner


class TestStreams:
    async def test_a_stream_without_since_starts_at_the_current_version(
        self, registry: Registry
    ) -> None:
        """The ready event names where it starts; only later changes follow."""
        await registry.create()
        current = await current_version(registry)
        async with registry.session.get(
            registry.base + "/v1/changes/stream", headers=AUTH
        ) as stream:
            assert await read_event(stream) == Event(current, "ready", {"version": current})
            created = await registry.create()
            event = await asyncio.wait_for(read_event(stream), 10)
        assert (event.id, event.data["op"]) == (current + 1, "upsert")
        assert event.data["entry"]["client"]["client_id"] == created["client_id"]

    async def test_a_stream_replays_the_log_from_last_event_id(
        self, registry_settings: RegistrySettings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Changes from before this process started (read from the database) and those it has
        in memory (beyond a small window, read from the database too) arrive in order, each
        once, as /v1/changes lists them."""
        monkeypatch.setattr(feed, "RECENT_CHANGES", 2)
        async with started(registry_settings) as registry:
            for n in range(3):
                await registry.create(f"Before{n}")
        async with started(registry_settings) as registry:
            for n in range(5):
                await registry.create(f"After{n}")
            _, log = await registry.call("GET", "/v1/changes?since=0", token=SERVICE)
            async with registry.session.get(
                registry.base + "/v1/changes/stream", headers={**AUTH, "Last-Event-ID": "1"}
            ) as stream:
                assert (await read_event(stream)).name == "ready"
                events = [await asyncio.wait_for(read_event(stream), 10) for _ in range(7)]
        assert [e.data for e in events] == log["changes"][1:]
        assert [e.id for e in events] == list(range(2, 9))

    async def test_a_version_ahead_of_the_registry_is_refused_before_streaming(
        self, registry: Registry
    ) -> None:
        """410 with the current version, as for the delta form."""
        status, body = await registry.call("GET", "/v1/changes/stream?since=999", token=SERVICE)
        assert (status, body["error"], body["current_version"]) == (410, "resync_required", 0)

    async def test_a_subscriber_beyond_the_limit_gets_retry_after(
        self, registry_settings: RegistrySettings
    ) -> None:
        """503 unavailable with a Retry-After of a few seconds."""
        async with (
            started(registry_settings, max_feed_subscribers=1) as registry,
            registry.session.get(registry.base + "/v1/changes/stream", headers=AUTH) as first,
        ):
            await read_event(first)
            async with registry.session.get(
                registry.base + "/v1/changes/stream", headers=AUTH
            ) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"] == "unavailable"
                assert 1 <= int(refused.headers["Retry-After"]) <= 10

    async def test_a_stream_whose_client_left_frees_its_slot_quietly(
        self, registry_settings: RegistrySettings, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The stream is cancelled when its client goes, well before any heartbeat would
        find out: the one slot is free for the next subscriber, and nothing is logged above
        INFO."""
        async with started(registry_settings, max_feed_subscribers=1) as registry:
            async with (
                aiohttp.ClientSession() as gone,
                gone.get(registry.base + "/v1/changes/stream", headers=AUTH) as stream,
            ):
                await read_event(stream)
                assert registry.running.feed.streams == 1

            async def freed() -> bool:
                return registry.running.feed.streams == 0

            await eventually(freed, within=10)  # heartbeats, which would also find out: 15 s
            async with registry.session.get(
                registry.base + "/v1/changes/stream", headers=AUTH
            ) as next_one:
                assert next_one.status == 200
        assert [r for r in caplog.records if r.levelno > logging.INFO] == []

    async def test_many_streams_get_each_change_from_one_reader(self, registry: Registry) -> None:
        """Twenty streams see the same events, in the same order."""
        since = await current_version(registry)
        streams = [
            await registry.session.get(
                registry.base + f"/v1/changes/stream?since={since}", headers=AUTH
            )
            for _ in range(20)
        ]
        try:
            for stream in streams:
                await read_event(stream)
            assert registry.running.feed.streams == 20
            for n in range(3):
                await registry.create(f"C{n}")
            seen = [
                [(await asyncio.wait_for(read_event(s), 10)).id for _ in range(3)] for s in streams
            ]
        finally:
            for stream in streams:
                stream.close()
        assert seen == [[since + 1, since + 2, since + 3]] * 20


def settings_for(url: str, tmp_path: Path) -> RegistrySettings:
    return RegistrySettings(
        address="127.0.0.1:0",
        database_url=url,
        admin_token=ADMIN,
        service_token=SERVICE,
        tokens_file=tmp_path / "tokens.json",
        feed_poll_interval=0.05,
    )


async def test_a_write_in_one_sqlite_registry_reaches_another_by_polling(tmp_path: Path) -> None:
    """Two registries on one SQLite file: the second has no notification channel, and finds
    the first one's change by polling."""
    settings = settings_for(f"sqlite:///{tmp_path / 'shared.db'}", tmp_path)
    async with started(settings) as writer, started(settings) as follower:
        assert follower.running.feed.status()["notifications"] == "polling"
        async with follower.session.get(
            follower.base + "/v1/changes/stream", headers=AUTH
        ) as stream:
            await read_event(stream)
            created = await writer.create()
            event = await asyncio.wait_for(read_event(stream), 10)
    assert event.data["entry"]["client"]["client_id"] == created["client_id"]


def test_a_write_reaches_a_stream_of_another_process_by_notification(
    tmp_path: Path, postgres: str
) -> None:
    """Two `client-registry serve` processes on one PostgreSQL database: a revocation through
    one reaches the other's stream through LISTEN/NOTIFY, though its poll interval is the
    longest there is."""
    env = {
        "REGISTRY_DATABASE_URL": create_database(postgres, "notified"),
        "REGISTRY_SERVICE_TOKEN": SERVICE,  # the admin token is generated into each workdir
        "REGISTRY_FEED_POLL_INTERVAL": "10",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        registry_process(tmp_path / "a", env=env) as writer,
        registry_process(tmp_path / "b", env=env) as follower,
    ):

        async def scenario() -> tuple[dict[str, Any], dict[str, Any], Event]:
            async with aiohttp.ClientSession(headers=AUTH) as session:
                async with session.get(follower.url + "/healthz") as health:
                    status = (await health.json())["change_feed"]
                async with session.get(follower.url + "/v1/changes/stream") as stream:
                    await read_event(stream)
                    created = dict(writer.create_client("Notified"))
                    event = await asyncio.wait_for(read_event(stream), 4)  # polls: every 10 s
            return status, created, event

        status, created, event = asyncio.run(scenario())
    assert status["notifications"] == "listening"
    assert event.data["entry"]["client"]["client_id"] == created["client_id"]


async def test_a_lost_notification_channel_falls_back_to_polling_until_it_is_back(
    tmp_path: Path, postgres: str
) -> None:
    """With its LISTEN connection killed, a registry still learns of another's writes (by
    polling), and listens again once it reconnects."""
    import psycopg  # noqa: PLC0415

    settings = settings_for(create_database(postgres, "relisten"), tmp_path)
    async with started(settings) as writer, started(settings) as follower:
        feed = follower.running.feed
        assert feed.listening
        with psycopg.connect(settings.database_url, autocommit=True) as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            )

        async def polling() -> bool:
            return not feed.listening

        await eventually(polling)
        async with follower.session.get(
            follower.base + "/v1/changes/stream", headers=AUTH
        ) as stream:
            await read_event(stream)
            created = await writer.create()
            event = await asyncio.wait_for(read_event(stream), 10)
        assert event.data["entry"]["client"]["client_id"] == created["client_id"]

        async def listening() -> bool:
            return feed.listening

        await eventually(listening)


INDEXED_TABLES = ("api_keys", "clients", "changes")


def test_the_hot_queries_use_indexes(tmp_path: Path, postgres: str) -> None:
    """With sequential scans priced out, verification, the change log and pruning read
    api_keys, clients and changes through indexes only (the migrations create them). Counted
    from pg_stat_user_tables, which every connection reports to when it closes."""
    import psycopg  # noqa: PLC0415

    url = create_database(postgres, "indexed")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("ALTER DATABASE indexed SET enable_seqscan = off")
    settings = settings_for(url, tmp_path)

    async def prepare() -> dict[str, Any]:
        async with started(settings) as registry:
            return await registry.create()

    async def scenario(created: dict[str, Any]) -> None:
        async with started(settings) as registry:
            await registry.verify(created["api_key"])
            await registry.verify(apikeys.generate())
            await registry.call("GET", "/v1/changes?since=0", token=SERVICE)
            await registry.call("GET", "/v1/changes", token=SERVICE)
            await registry.call("GET", f"/clients/{created['client_id']}")
            await registry.running.store.prune(retention=3600, max_rows=10)

    created = asyncio.run(prepare())
    before = seq_scans(url, INDEXED_TABLES)
    asyncio.run(scenario(created))
    assert seq_scans(url, INDEXED_TABLES) == before


def test_serve_leaves_nothing_behind_when_its_port_is_taken(tmp_path: Path) -> None:
    """Exit status 1 naming the problem; no database and no tokens file created."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "client_registry", "serve"],
            cwd=tmp_path,
            env={**os.environ, "REGISTRY_ADDRESS": f"127.0.0.1:{taken.getsockname()[1]}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
