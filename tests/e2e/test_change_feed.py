"""The change feed against the real registry: it survives a registry restart and misses no
change, resuming from the last event id it saw."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from authz_service.contract import Change
from authz_service.feed import ChangeFeed, FeedSettings
from authz_service.health import Health
from tests.e2e import harness

pytestmark = pytest.mark.e2e


class Recorder:
    """A ChangeConsumer that keeps what it is given."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.resyncs = 0

    def apply(self, change: Change) -> None:
        self.changes.append(change)

    async def resync(self) -> None:
        self.resyncs += 1


async def until(condition: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"{what} within {within}s"
        await asyncio.sleep(0.02)


async def test_the_feed_reconnects_after_a_registry_restart_and_resumes(tmp_path: Path) -> None:
    """Connected, disconnected while the registry is down (following by polling), connected
    again; the change made while it was away arrives, once."""
    port = harness.free_port()
    recorder = Recorder()
    settings = FeedSettings(poll_interval=0.05, reconnect_delay=0.05)
    with harness.registry_process(tmp_path, port=port) as registry:
        feed = ChangeFeed(registry.url, registry.service_token(), recorder, Health(), settings)
        task = asyncio.create_task(feed.run())
        await until(lambda: feed.connected, 5, "connected")
        first = await asyncio.to_thread(registry.create_client, "First")
        await until(lambda: len(recorder.changes) == 1, 2, "first change")
    try:
        await until(lambda: feed.mode == "polling", 5, "disconnected")
        with harness.registry_process(tmp_path, port=port) as registry:
            await asyncio.to_thread(
                registry.admin, "DELETE", f"/clients/{first['client_id']}/api-key"
            )
            await until(lambda: len(recorder.changes) == 2, 5, "the change made while away")
            await until(lambda: feed.connected, 5, "reconnected")
        assert [c.op for c in recorder.changes] == ["upsert", "delete"]
        assert recorder.changes[1].client_id == first["client_id"]
        assert feed.version == recorder.changes[1].version
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
