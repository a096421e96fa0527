"""The registry's settings: ``REGISTRY_`` variables, config-file keys, defaults (see
``authz_service.config`` for the rules)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from authz_service import apikeys
from authz_service.config import address, between, setting

ENV_PREFIX = "REGISTRY_"


def _prefix(value: str) -> str | None:
    ok = apikeys.PREFIX_PATTERN.fullmatch(value)
    return None if ok else f"expected {apikeys.PREFIX_PATTERN.pattern}"


def _token(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{24,512}", value):
        return "at least 24 token characters (letters, digits, ._~+/=-)"
    return None


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    address: str = setting("0.0.0.0:8081", "HTTP listen address: host:port", address(False))
    database_url: str = setting(
        "sqlite:///registry.db",
        "sqlite:///path/to/file.db (default, zero set-up) or postgresql://user@host:port/db",
        secret=True,  # postgresql://user:password@host
    )
    admin_token: str = setting(
        "",
        "bearer token of the management API (empty: generated into the tokens file)",
        _token,
        secret=True,
    )
    service_token: str = setting(
        "",
        "bearer token of the verification API used by authz-service (empty: generated into "
        "the tokens file)",
        _token,
        secret=True,
    )
    tokens_file: Path = setting(
        Path("registry-tokens.json"), "where generated tokens are kept (mode 0600)"
    )
    pepper: str = setting(
        "",
        "optional server-side secret: keys are then stored as HMAC-SHA256 instead of SHA-256",
        secret=True,
    )
    key_prefix: str = setting(apikeys.DEFAULT_PREFIX, "prefix of issued keys", _prefix)
    max_grace_seconds: float = setting(
        86400.0,
        "longest grace period an old key may keep working after regeneration",
        between(0, 30 * 86400),
    )
    pool_size: int = setting(
        4,
        "database connections (PostgreSQL) for single-statement reads (verification, the change "
        "log), and as many for transactions",
        between(1, 64),
    )
    feed_poll_interval: float = setting(
        0.2,
        "seconds between polls of the change log by this process's one reader when no "
        "notification channel is up (SQLite, or PostgreSQL's LISTEN connection lost); this "
        "process's own writes, and other replicas' through LISTEN/NOTIFY, are sent at once",
        between(0.01, 10),
    )
    max_feed_subscribers: int = setting(
        1000,
        "change-feed streams served at once; more are refused with 503 and Retry-After",
        between(1, 100_000),
    )
    max_snapshot_streams: int = setting(
        4,
        "snapshots served at once (each holds a database connection of its own); more are "
        "refused with 503 and Retry-After",
        between(1, 64),
    )
    change_retention: float = setting(
        86400.0,
        "seconds the change log keeps a change (0: no age limit); a follower further behind "
        "gets 410 and reloads the snapshot",
        between(0, 365 * 86400),
    )
    change_max_rows: int = setting(
        100_000,
        "changes the change log keeps at most (0: no limit); a follower further behind gets "
        "410 and reloads the snapshot",
        between(0, 10**9),
    )
    usage_batch_retention: float = setting(
        7 * 86400.0,
        "seconds a usage batch's id is remembered: the same batch sent again within that time is "
        "counted once (authz-service retries for far less); after it, it would count again",
        between(3600, 366 * 86400),
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log level")
