"""The change feed of one registry process: a single reader of the change log feeds every change
stream the process serves, from memory.

The reader reads the log when this process commits a change (at once), when PostgreSQL notifies
that another process did (LISTEN/NOTIFY; the writer notifies inside its transaction), and
otherwise by polling: every ``poll_interval`` while there is no notification channel (SQLite, or
the LISTEN connection lost), and every few seconds as a safety net while there is. Each read is
one statement, so an idle registry costs its database next to nothing however many streams it
serves.

The newest changes stay in memory, framed once as Server-Sent Events, for every stream to send.
A stream further behind than that window reads the log itself, page by page, until it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from authz_service import logs
from client_registry.store import ChangePage, Store

log = logging.getLogger(__name__)

Notifications = Callable[[], AbstractAsyncContextManager[AsyncIterator[str]]]

RECENT_CHANGES = 4096  # changes kept in memory for the streams (about 400 bytes each)
PAGE = 1000  # changes per read of the log
POLL_WHILE_LISTENING = 5.0  # seconds: a safety net only, as notifications are not lost
_MAX_RETRY_DELAY = 30.0


@dataclass(frozen=True, slots=True)
class Frame:
    version: int
    data: bytes  # the change as one Server-Sent Event


def change_frame(version: int, change: str) -> bytes:
    return f"id: {version}\nevent: change\ndata: {change}\n\n".encode()


class ChangeFeed:
    def __init__(
        self,
        poll_interval: float,
        notifications: Notifications | None = None,
    ) -> None:
        """``notifications``: opens a channel of change notifications (PostgreSQL's LISTEN)."""
        self._poll_interval = poll_interval
        self._notifications = notifications
        self._store: Store | None = None
        self._recent: deque[Frame] = deque(maxlen=RECENT_CHANGES)
        self._floor = 0  # the version just before the oldest change in _recent
        self.version = 0  # the newest change read
        self.listening = False
        self.streams = 0
        self._published = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False
        self._ended = False
        self._first_listen = asyncio.Event()  # the channel's first attempt is over

    async def start(self, store: Store) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        self.version = self._floor = (await store.log_state()).current
        self._tasks.append(asyncio.create_task(self._read_forever(), name="change-log-reader"))
        if self._notifications is not None:
            self._tasks.append(asyncio.create_task(self._listen_forever(), name="change-listener"))
            await self._first_listen.wait()  # serve with the channel up, unless it failed

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def end_streams(self) -> None:
        """Shutting down: every stream ends now (its follower resumes elsewhere)."""
        self._ended = True
        self._publish()

    def wake(self) -> None:
        """A change was committed in this process: read the log now. Safe from any thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                loop.call_soon_threadsafe(self._wake.set)

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "streams": self.streams,
            "notifications": "listening" if self.listening else "polling",
        }

    async def follow(self, since: int, heartbeat: float) -> AsyncGenerator[bytes | None]:
        """The changes after ``since``, as SSE bytes, a batch at a time; None after ``heartbeat``
        seconds without one. Ends if the log has been pruned past the follower (it resumes and
        is then told to resync)."""
        store = self._store
        if store is None:
            raise RuntimeError("the change feed has not been started")
        last = since
        while not self._ended:
            frames = self._after(last)
            if frames is None:  # behind what is kept in memory: read the log itself
                page = await store.changes_since(last, PAGE)
                if page.state.pruned_through > last:
                    return
                frames = [Frame(v, change_frame(v, change)) for v, change in page.changes]
                if not frames:  # the log has nothing after ``last``: memory takes over from here
                    last = max(last, self._floor)
                    continue
            if frames:
                yield b"".join(frame.data for frame in frames)
                last = frames[-1].version
            elif not await self._newer_than(last, heartbeat):
                yield None

    def _after(self, last: int) -> list[Frame] | None:
        if last >= self.version:
            return []
        if last < self._floor:
            return None
        newer = []
        for frame in reversed(self._recent):
            if frame.version <= last:
                break
            newer.append(frame)
        newer.reverse()
        return newer

    async def _newer_than(self, last: int, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.version <= last and not self._ended:
                    await self._published.wait()
                return True
        return False

    async def _read_forever(self) -> None:
        while True:
            self._wake.clear()  # a wake-up from now on means another read
            try:
                await self._read()
            except Exception as exc:  # the database is down: keep polling until it is back
                if not self._failing:
                    logs.failure(log, "cannot read the change log", "change_log_error", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info(
                        "change log readable again", extra={"fields": {"event": "change_log_ok"}}
                    )
                self._failing = False
            interval = POLL_WHILE_LISTENING if self.listening else self._poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def _read(self) -> None:
        assert self._store is not None  # noqa: S101 (set by start, before this task)
        while True:
            page = await self._store.changes_since(self.version, PAGE)
            if page.state.pruned_through > self.version:
                self._skip_to(page)
                return
            for version, change in page.changes:
                if len(self._recent) == self._recent.maxlen:
                    self._floor = self._recent[0].version
                self._recent.append(Frame(version, change_frame(version, change)))
                self.version = version
            if page.changes:
                self._publish()
            if len(page.changes) < PAGE:
                return

    def _skip_to(self, page: ChangePage) -> None:
        """The log was pruned past this reader (the database was out of reach for longer than
        the log is kept): streams behind it end, and their followers resync."""
        log.warning(
            "change log pruned past this registry's reader; streams behind it end",
            extra={"fields": {"event": "change_log_gap", "version": self.version}},
        )
        self._recent.clear()
        self.version = self._floor = page.state.current
        self._publish()

    def _publish(self) -> None:
        self._published.set()
        self._published = asyncio.Event()

    async def _listen_forever(self) -> None:
        assert self._notifications is not None  # noqa: S101 (only started with a channel)
        delay = 1.0
        while True:
            try:
                async with self._notifications() as payloads:
                    self.listening = True
                    self._first_listen.set()
                    delay = 1.0
                    self._wake.set()  # what was committed before LISTEN took effect
                    log.info(
                        "listening for change notifications",
                        extra={"fields": {"event": "change_listener_connected"}},
                    )
                    async for payload in payloads:
                        if not payload.isdigit() or int(payload) > self.version:
                            self._wake.set()
            except Exception as exc:  # polling covers the gap until the channel is back
                logs.failure(
                    log,
                    "change notifications lost; polling the change log",
                    "change_listener_lost",
                    exc,
                    retry_in=delay,
                )
            finally:
                self.listening = False
                self._first_listen.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_DELAY)
