"""The synchronized copy: every valid key of the client registry, by hash, in memory.

At start it loads the registry's snapshot (retrying in the background until it succeeds; until
then it is not ready and lookups are errors, so checks get 503). Then it follows the change feed,
and while the feed is down it polls the delta form, so it converges either way. Every lookup is
answered from memory, with no registry call.

The registry's key hashes must be plain SHA-256 (a registry without a pepper), since they are
compared with the SHA-256 of the presented key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from authz_service import logs
from authz_service.feed import ChangeFeed
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryError
from authz_service.registry.http import parse_identity, parse_time

log = logging.getLogger(__name__)

Record = tuple[Client, float | None]  # the client, and when the key stops validating


class SnapshotRegistry:
    def __init__(
        self,
        base_url: str,
        token: str,
        poll_interval: float,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._poll_interval = poll_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, Record] = {}
        self.version: int | None = None
        self.synced_at: float | None = None  # when the copy last took in the registry's state
        self.feed: ChangeFeed | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.version is not None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync(), name="registry-snapshot")

    async def close(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def lookup_now(self, credential: Credential) -> Client | Reason:
        if self.version is None:
            raise RegistryError("no snapshot of the registry loaded yet")
        record = self._keys.get(credential.key_hash)
        if record is None:
            return Reason.UNKNOWN_KEY
        client, valid_until = record
        if valid_until is not None and self._clock() >= valid_until:
            return Reason.KEY_REVOKED  # its grace period (or life) ended since the last change
        return client

    async def lookup(self, credential: Credential) -> Client | Reason:
        return self.lookup_now(credential)

    def find_client(self, client_id: str) -> Client | None:
        return next((c for c, _ in self._keys.values() if c.client_id == client_id), None)

    def apply_change(self, change: Mapping[str, Any]) -> None:
        version = int(change["version"])
        if self.version is not None and version <= self.version:
            return  # already applied (the feed and the delta poll can overlap)
        key_hash = str(change["key_hash"])
        if change["op"] == "upsert":
            self._keys[key_hash] = _record(change["entry"])
        elif change["op"] == "delete":
            self._keys.pop(key_hash, None)
        else:
            raise ValueError(f"unknown change op {change['op']!r}")
        self.version = version
        self.synced_at = time.time()

    async def _sync(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        async with aiohttp.ClientSession(headers=headers, timeout=self._timeout) as session:
            while True:
                try:
                    if self.version is None:
                        await self._load(session)
                    elif self.feed is None or not self.feed.connected:
                        await self._poll(session)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                    logs.failure(log, "registry snapshot not refreshed", "snapshot_error", exc)
                await asyncio.sleep(self._poll_interval)

    async def _load(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{self._base}/v1/snapshot", allow_redirects=False) as reply:
            reply.raise_for_status()
            document = await reply.json()
        keys = {str(entry["key_hash"]): _record(entry) for entry in document["keys"]}
        self._keys, self.version = keys, int(document["version"])
        self.synced_at = time.time()
        log.info(
            "registry snapshot loaded",
            extra={
                "fields": {"event": "snapshot_loaded", "version": self.version, "keys": len(keys)}
            },
        )
        if self.feed is None:
            self.feed = ChangeFeed(self._base, self._token, self.apply_change, since=self.version)
            await self.feed.start()

    async def _poll(self, session: aiohttp.ClientSession) -> None:
        async with session.get(
            f"{self._base}/v1/changes", allow_redirects=False, params={"since": str(self.version)}
        ) as reply:
            if reply.status == 410:  # the registry no longer knows our version: start over
                self.version = None
                return
            reply.raise_for_status()
            document = await reply.json()
        for change in document["changes"]:
            self.apply_change(change)


def _record(entry: Mapping[str, Any]) -> Record:
    return parse_identity(entry["client"]), parse_time(entry["valid_until"])
