"""Composition root of the registry: settings -> database, store, HTTP API; shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
from pathlib import Path

from aiohttp import web

from client_registry.api import ApiSettings, Feed, build_app
from client_registry.db import Database
from client_registry.settings import RegistrySettings
from client_registry.store import KeyHasher, Store

log = logging.getLogger(__name__)


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
    admin_token, service_token = tokens(settings)
    db = Database(settings.database_url, settings.pool_size)
    version = await asyncio.to_thread(db.migrate)
    feed = Feed()
    store = Store(db, KeyHasher(settings.pepper), settings.key_prefix, on_change=feed.notify)
    app = build_app(
        store,
        ApiSettings(
            admin_token=admin_token,
            service_token=service_token,
            max_grace_seconds=settings.max_grace_seconds,
            feed_poll_interval=settings.feed_poll_interval,
            max_feed_subscribers=settings.max_feed_subscribers,
        ),
        feed,
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    host, _, port = settings.address.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
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
            }
        },
    )
    if port_ready is not None:
        port_ready.set_result(bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        db.close()
