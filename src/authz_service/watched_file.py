"""A configuration file that is parsed at start and again whenever it changes.

At start, any error is fatal (the caller turns it into a start-up error). Later, a file that
cannot be read or parsed is logged once and the last good version keeps serving. Used by the
keys file and the policy file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from authz_service.health import supervise

log = logging.getLogger(__name__)

T = TypeVar("T")


class WatchedFile(Generic[T]):
    def __init__(
        self,
        path: Path,
        parse: Callable[[str, str], T],
        reload_interval: float,
        event: str,
        size: Callable[[T], int],
    ) -> None:
        """``parse(text, source)`` validates a version of the file and raises ValueError on a bad
        one; ``event`` prefixes the log events (``<event>_loaded``, ``<event>_rejected``);
        ``size`` counts the entries of a version, for those log lines."""
        self.path = path
        self._parse = parse
        self._reload_interval = reload_interval
        self._event = event
        self._size = size
        self._signature: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.value: T

    def load(self) -> T:
        """Read and parse the file now; raises FileNotFoundError, OSError or ValueError."""
        self._load(self._stat())
        return self.value

    def watch(self) -> None:
        """Poll the file from now on (call within the event loop, after ``load``)."""
        if self._reload_interval > 0:
            self._watcher = supervise(f"{self._event}-watcher", self._watch)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    def _stat(self) -> tuple[int, int, int]:
        # stat() follows symlinks, so a Kubernetes ConfigMap/Secret swap is seen as a change.
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, signature: tuple[int, int, int]) -> None:
        self.value = self._parse(self.path.read_text(), str(self.path))
        self._signature = signature
        log.info(
            f"{self._event.replace('_', ' ')} loaded",
            extra={
                "fields": {
                    "event": f"{self._event}_loaded",
                    "path": str(self.path),
                    "entries": self._size(self.value),
                }
            },
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                signature = await asyncio.to_thread(self._stat)
                if signature != self._signature:
                    await asyncio.to_thread(self._load, signature)
            except (OSError, ValueError) as exc:
                # Remember the bad version so the error is logged once, not every poll.
                with contextlib.suppress(OSError):
                    self._signature = self._stat()
                log.error(
                    f"{self._event.replace('_', ' ')} not reloaded; keeping the last good version",
                    extra={
                        "fields": {
                            "event": f"{self._event}_rejected",
                            "path": str(self.path),
                            "error": str(exc),
                            "entries": self._size(self.value),
                        }
                    },
                )
