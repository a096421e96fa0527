"""Follows the client registry's change feed (Server-Sent Events) and hands every change to a
callback, so that each replica evicts revoked or changed keys within a fraction of a second.

It resumes from the last version it saw after a disconnection (``Last-Event-ID``), so no change
is missed; while it is disconnected, cached entries still expire with their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from authz_service import logs

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
_MAX_RECONNECT_DELAY = 30.0


class ChangeFeed:
    def __init__(
        self,
        base_url: str,
        token: str,
        on_change: Callable[[Mapping[str, Any]], None],
        reconnect_delay: float = 1.0,
        since: int | None = None,
    ) -> None:
        """``since``: the version to follow from (default: the registry's current one)."""
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._on_change = on_change
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.last_event_at: float | None = None
        self.version: int | None = since

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-change-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=60)
        delay = self._reconnect_delay
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as session:
            while True:
                try:
                    if self.version is None:
                        self.version = await self._current_version(session)
                    await self._follow(session)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    logs.failure(
                        log,
                        "registry change feed disconnected; reconnecting",
                        "feed_disconnected",
                        exc,
                        retry_in=delay,
                    )
                finally:
                    if self.connected:  # it worked for a while: start backing off afresh
                        delay = self._reconnect_delay
                    self.connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RECONNECT_DELAY)

    async def _current_version(self, session: aiohttp.ClientSession) -> int:
        async with session.get(
            f"{self._base}/v1/changes", params={"since": "0", "limit": "1"}, allow_redirects=False
        ) as reply:
            reply.raise_for_status()
            return int((await reply.json())["current_version"])

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        async with session.get(
            f"{self._base}/v1/changes/stream",
            allow_redirects=False,
            headers={"Last-Event-ID": str(self.version), "Accept": "text/event-stream"},
        ) as reply:
            reply.raise_for_status()
            self.connected = True
            log.info(
                "registry change feed connected",
                extra={"fields": {"event": "feed_connected", "version": self.version}},
            )
            event = b""
            while line := await reply.content.readline():
                if len(line) > MAX_EVENT_BYTES:
                    raise ValueError("change event over the size limit")
                if line.startswith(b"event: "):
                    event = line[len(b"event: ") :].strip()
                if line.startswith(b"data: ") and event == b"change":  # not "ready"
                    change = json.loads(line[len(b"data: ") :])
                    self._on_change(change)
                    self.version = int(change["version"])
                    self.last_event_at = time.time()
