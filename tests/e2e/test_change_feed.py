"""The change-feed follower survives a registry restart and misses no change."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from authz_service.feed import ChangeFeed
from tests.e2e import harness

pytestmark = pytest.mark.e2e


async def until(condition: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"{what} within {within}s"
        await asyncio.sleep(0.02)


async def test_the_feed_reconnects_after_a_registry_restart_and_resumes(tmp_path: Path) -> None:
    """Connected, disconnected while the registry is down, connected again; the change made
    while it was away arrives (resumed from the last version it saw)."""
    port = harness.free_port()
    changes: list[Mapping[str, Any]] = []
    with harness.registry_process(tmp_path, port=port) as registry:
        feed = ChangeFeed(
            registry.url, registry.service_token(), changes.append, reconnect_delay=0.05
        )
        await feed.start()
        await until(lambda: feed.connected, 5, "connected")
        first = await asyncio.to_thread(registry.create_client, "First")
        await until(lambda: len(changes) == 1, 2, "first change")
    try:
        await until(lambda: not feed.connected, 5, "disconnected")
        with harness.registry_process(tmp_path, port=port) as registry:
            await asyncio.to_thread(
                registry.admin, "DELETE", f"/clients/{first['client_id']}/api-key"
            )
            await until(lambda: feed.connected, 5, "reconnected")
            await until(lambda: len(changes) == 2, 2, "the change made while away")
        assert [c["op"] for c in changes] == ["upsert", "delete"]
        assert changes[1]["client_id"] == first["client_id"]
    finally:
        await feed.close()
