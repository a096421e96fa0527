"""Follows the client registry's change log and hands every change to its consumer (the cache of
``AUTHZ_REGISTRY=http``, or the snapshot's copy), so that each replica acts on a revocation
within a fraction of a second. The one owner of following the registry's changes.

- It streams the changes (Server-Sent Events) and resumes from the last event id it saw, as an
  EventSource does, so no change is missed across a reconnection.
- While the stream cannot be had (refused by the subscriber limit, broken, or the registry
  down), it follows the delta form (``GET /v1/changes?since=``) by polling, and says so in its
  ``mode``; it tries the stream again after a backoff (or the registry's ``Retry-After``).
- When the registry no longer has the changes after our version (410), or an event cannot be
  read, it has the consumer resync: changes may have been missed.
- A malformed event is logged and counted, never fatal; nothing the registry sent is logged.

``run`` never returns; the service supervises it (``health.supervise``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from authz_service import contract, logs
from authz_service.contract import ContractError
from authz_service.health import Health
from authz_service.registry import ChangeConsumer
from authz_service.registry.http import REJECTED

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
_MAX_DELAY = 30.0


class Mode(StrEnum):
    CONNECTING = "connecting"  # not following yet (the first resync)
    STREAMING = "streaming"
    POLLING = "polling"


class _ResyncRequiredError(Exception):
    def __init__(self, why: str = "changes_pruned") -> None:
        super().__init__(why)
        self.why = why


class _RefusedError(Exception):
    def __init__(self, retry_after: float | None) -> None:
        super().__init__("the registry refused the change stream")
        self.retry_after = retry_after


class FeedError(Exception):
    """The change log could not be read; the message is ours, never the registry's text."""

    safe_to_log = True


@dataclass(frozen=True, slots=True)
class FeedSettings:
    poll_interval: float = 1.0  # seconds between delta polls while the stream is down
    reconnect_delay: float = 1.0  # the first wait before the stream is tried again
    read_timeout: float = 60.0  # the registry sends a heartbeat well within this


class ChangeFeed:
    def __init__(
        self,
        base_url: str,
        token: str,
        consumer: ChangeConsumer,
        health: Health,
        settings: FeedSettings,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._consumer = consumer
        self._health = health
        self._settings = settings
        self.mode = Mode.CONNECTING
        self.version: int | None = None  # the last change (or snapshot) version taken in
        self.last_event_at: float | None = None
        self.malformed_events = 0
        self.resyncs = 0

    @property
    def connected(self) -> bool:
        return self.mode is Mode.STREAMING

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=5, sock_read=self._settings.read_timeout
        )
        self.mode = Mode.CONNECTING
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as session:
            await self._resync(session, "start")
            delay = self._settings.reconnect_delay
            while True:
                try:
                    await self._stream(session)  # returns only by raising
                except _ResyncRequiredError as required:
                    await self._resync(session, required.why)
                    continue
                except _RefusedError as refused:
                    retry_in = refused.retry_after or delay
                    log.warning(
                        "change stream refused by the registry; following by polling",
                        extra={"fields": {"event": "feed_refused", "retry_in": retry_in}},
                    )
                except Exception as exc:  # the stream broke: poll meanwhile, never stop
                    if self.mode is Mode.STREAMING:  # it broke after working: no backoff yet
                        delay = self._settings.reconnect_delay
                    retry_in = delay
                    logs.failure(
                        log,
                        "registry change stream down; following by polling",
                        "feed_disconnected",
                        exc,
                        retry_in=retry_in,
                    )
                self.mode = Mode.POLLING
                recovered = await self._poll_for(session, retry_in)
                # Back from an outage: the stream at once, and a backoff that starts afresh.
                delay = self._settings.reconnect_delay if recovered else min(delay * 2, _MAX_DELAY)

    async def _stream(self, session: aiohttp.ClientSession) -> None:
        headers = {"Accept": "text/event-stream"}
        if self.version is not None:
            headers["Last-Event-ID"] = str(self.version)
        async with session.get(
            f"{self._base}/v1/changes/stream", headers=headers, allow_redirects=False
        ) as reply:
            self._check_status(reply)
            self.mode = Mode.STREAMING
            log.info(
                "registry change feed connected",
                extra={"fields": {"event": "feed_connected", "version": self.version}},
            )
            event, event_id, data = "message", None, []
            async for line in reply.content:
                if len(line) > MAX_EVENT_BYTES:
                    raise FeedError("a change-stream line over the size limit")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text:
                    field, _, value = text.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        event = value
                    elif field == "id":
                        event_id = value
                    elif field == "data":
                        data.append(value)
                    continue
                # A blank line dispatches the event.
                if data or event_id is not None:
                    await self._dispatch(session, event, event_id, "\n".join(data))
                event, event_id, data = "message", None, []
            raise FeedError("the registry ended the change stream")

    async def _dispatch(
        self, session: aiohttp.ClientSession, event: str, event_id: str | None, data: str
    ) -> None:
        if event == "change":
            try:
                change = contract.parse_change(json.loads(data))
            except (ContractError, ValueError, RecursionError) as exc:
                self._malformed(exc)
                self._take_id(event_id)
                await self._resync(session, "malformed_event")
                return
            self._consumer.apply(change)
            self.last_event_at = time.time()
            self.version = change.version
            self._take_id(event_id)
        elif event_id is not None:  # "ready", or any other event: only its position counts
            self._take_id(event_id)

    def _take_id(self, event_id: str | None) -> None:
        if event_id is not None and event_id.isdigit() and len(event_id) < 20:
            self.version = int(event_id)

    async def _poll_for(self, session: aiohttp.ClientSession, seconds: float) -> bool:
        """Follow the delta form for ``seconds``, or until the registry answers again after a
        poll it did not answer (then True: the stream is worth trying at once)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        unanswered = False
        while True:
            try:
                await self._poll(session)
            except _ResyncRequiredError as required:
                await self._resync(session, required.why)
            except Exception as exc:
                unanswered = True
                logs.failure(log, "registry change log not read", "feed_poll_failed", exc)
            else:
                if unanswered:
                    return True
            if loop.time() >= until:
                return False
            await asyncio.sleep(min(self._settings.poll_interval, max(0, until - loop.time())))

    async def _poll(self, session: aiohttp.ClientSession) -> None:
        if self.version is None:
            self.version = await self._current_version(session)
            return
        while True:
            document = await self._changes(session, {"since": str(self.version)})
            for item in document["changes"]:
                try:
                    change = contract.parse_change(item)
                except (ContractError, ValueError, RecursionError) as exc:
                    # As on the stream: it may have been a revocation, so start afresh rather
                    # than ask for the same page again and again.
                    self._malformed(exc)
                    raise _ResyncRequiredError("malformed_event") from None
                self._consumer.apply(change)
                self.version = change.version
                self.last_event_at = time.time()
            if not document["changes"]:
                return

    def _malformed(self, exc: Exception) -> None:
        self.malformed_events += 1
        log.error(
            "malformed change event; resyncing, as it may have been a revocation",
            extra={"fields": {"event": "feed_malformed_event", "error": str(exc)}},
        )

    async def _resync(self, session: aiohttp.ClientSession, why: str) -> None:
        """Have the consumer start afresh; retried until it succeeds. A consumer that keeps no
        version of its own (a cache) then follows on from the registry's current version, as
        learnt before it started afresh: the version the feed had may be gone from the change
        log (410), and no change after the one learnt may be missed."""
        delay = self._settings.reconnect_delay
        while True:
            try:
                current = await self._current_version(session)
                version = await self._consumer.resync()
                self.version = current if version is None else version
            except Exception as exc:
                logs.failure(
                    log, "resync with the registry failed", "feed_resync_failed", exc, reason=why
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
                continue
            self.resyncs += 1
            log.info(
                "resynced with the registry",
                extra={
                    "fields": {"event": "feed_resynced", "reason": why, "version": self.version}
                },
            )
            return

    async def _current_version(self, session: aiohttp.ClientSession) -> int:
        document = await self._changes(session, {"limit": "1"})
        return contract.parse_version(document.get("current_version"))

    async def _changes(
        self, session: aiohttp.ClientSession, params: dict[str, str]
    ) -> dict[str, Any]:
        async with session.get(
            f"{self._base}/v1/changes", params=params, allow_redirects=False
        ) as reply:
            self._check_status(reply)
            document = await reply.json()
        if not isinstance(document, dict) or not isinstance(document.get("changes"), list):
            raise FeedError("a change log outside the contract")
        return document

    def _check_status(self, reply: aiohttp.ClientResponse) -> None:
        if reply.status in (401, 403):
            problem = REJECTED.format(status=reply.status)
            self._health.report("registry", problem)
            raise FeedError(problem)
        if reply.status == 410:
            raise _ResyncRequiredError
        if reply.status == 503:
            raise _RefusedError(_retry_after(reply.headers.get("Retry-After")))
        if reply.status != 200:
            raise FeedError(f"the change log answered HTTP {reply.status}")
        self._health.report("registry", None)


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.isdigit():
        return None
    return min(float(value), _MAX_DELAY)
