"""Composition root of the registry: settings -> database, store, HTTP API; shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from authz_service import logs
from client_registry.api import ApiSettings, build_app
from client_registry.db import Database
from client_registry.feed import ChangeFeed
from client_registry.settings import RegistrySettings
from client_registry.store import CHANGES_CHANNEL, KeyHasher, Store

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0  # seconds between prunings of the change log


def tokens(settings: RegistrySettings) -> tuple[str, str]:
    """The admin and service tokens: from settings, else from (or generated into) the file."""
    if settings.admin_token and settings.service_token:
        return settings.admin_token, settings.service_token
    path = settings.tokens_file
    if path.exists():
        stored = json.loads(path.read_text())
    else:
        stored = {
            "admin_token": secrets.token_urlsafe(32),
            "service_token": secrets.token_urlsafe(32),
        }
        _write_private(path, json.dumps(stored, indent=2) + "\n")
        log.info(
            "tokens generated", extra={"fields": {"event": "tokens_generated", "path": str(path)}}
        )
    return (
        settings.admin_token or stored["admin_token"],
        settings.service_token or stored["service_token"],
    )


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@dataclass(frozen=True)
class Running:
    """A registry serving on ``port``, and its parts (for tests and benchmarks)."""

    port: int
    db: Database
    store: Store
    feed: ChangeFeed


@contextlib.asynccontextmanager
async def running(settings: RegistrySettings) -> AsyncIterator[Running]:
    """Serve ``settings`` until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        # The port comes first: a registry that cannot bind it creates no database and no
        # tokens file.
        listener = _bind(settings.address)
        stack.callback(listener.close)
        db = Database(settings.database_url, settings.pool_size)
        stack.push_async_callback(db.aclose)
        version = await asyncio.to_thread(db.migrate)
        admin_token, service_token = tokens(settings)
        notifications = None
        if db.dialect == "postgresql":
            notifications = functools.partial(db.notifications, CHANGES_CHANNEL)
        feed = ChangeFeed(settings.feed_poll_interval, notifications)
        store = Store(db, KeyHasher(settings.pepper), settings.key_prefix, on_change=feed.wake)
        await feed.start(store)
        stack.push_async_callback(feed.close)
        prunes = {
            "change_log": lambda: store.prune(settings.change_retention, settings.change_max_rows),
            "usage_batches": lambda: store.prune_usage_batches(settings.usage_batch_retention),
        }
        for name, prune in prunes.items():
            pruner = asyncio.create_task(
                prune_forever(name, prune, PRUNE_INTERVAL), name=f"{name}-pruner"
            )
            stack.push_async_callback(_cancel, pruner)
        app = build_app(
            store,
            ApiSettings(
                admin_token=admin_token,
                service_token=service_token,
                max_grace_seconds=settings.max_grace_seconds,
                max_feed_subscribers=settings.max_feed_subscribers,
                max_snapshot_streams=settings.max_snapshot_streams,
            ),
            feed,
        )
        # handler_cancellation: a change stream whose client has gone ends at once.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2,
            handler_cancellation=True,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, listener).start()
        bound = runner.addresses[0][1]
        log.info(
            "serving",
            extra={
                "fields": {
                    "event": "serving",
                    "address": settings.address,
                    "port": bound,
                    "database": db.dialect,
                    "schema_version": version,
                    "notifications": "listen" if notifications else "poll",
                }
            },
        )
        yield Running(bound, db, store, feed)


async def serve(
    settings: RegistrySettings,
    stop: asyncio.Event | None = None,
    port_ready: asyncio.Future[int] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    async with running(settings) as registry:
        # What start-up built lives as long as the process: out of the cyclic GC's reach, so
        # that collections made by per-request garbage do not scan it (a full collection of
        # it took about 10 ms, a verify's p99 several times over).
        gc.freeze()
        if port_ready is not None:
            port_ready.set_result(registry.port)
        await stop.wait()


async def prune_forever(name: str, prune: Callable[[], Awaitable[int]], interval: float) -> None:
    """Prune every ``interval`` seconds (every replica may; pruning twice is harmless).
    ``name`` (``change_log``, ``usage_batches``) names the log events."""
    what = name.replace("_", " ")
    while True:
        try:
            dropped = await prune()
        except Exception as exc:  # the database is down: try again next time
            logs.failure(log, f"{what} not pruned", f"{name}_prune_error", exc)
        else:
            if dropped:
                log.info(
                    f"{what} pruned",
                    extra={"fields": {"event": f"{name}_pruned", "dropped": dropped}},
                )
        await asyncio.sleep(interval)


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=1024)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
