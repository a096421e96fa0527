"""The embedded registry: a YAML file of key hashes, reloaded when it changes.

The file holds only SHA-256 hashes of keys. An invalid file at start is a start-up error; an
invalid file later is logged and the last good version keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from authz_service import apikeys
from authz_service.config import yaml_problem
from authz_service.contract import (
    CLIENT_ID_PATTERN,
    MAX_NAME_LENGTH,
    MAX_REQUESTS_PER_UNIT,
    MAX_ROLES,
    RATE_UNITS,
    ROLE_PATTERN,
    ContractError,
    parse_rate_limit,
)
from authz_service.model import Client, Credential, RateLimit
from authz_service.reasons import Reason
from authz_service.watched_file import WatchedFile

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 1
_SHA256_LENGTH = 64
_SHA256_PATTERN = re.compile(rf"[0-9a-f]{{{_SHA256_LENGTH}}}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_MIN_KEY_ID_LENGTH = 6
_ENTRY_FIELDS = frozenset(
    {"sha256", "client_id", "client_name", "roles", "enabled", "expires_at", "rate_limit"}
)
_HEADER = (
    "# authz-service keys file: SHA-256 hashes of API keys, never the keys themselves.\n"
    "# Manage it with: authz-service keys add|list|revoke|rotate (see authz-service keys --help)\n"
)


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file, the entry and the field."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    client: Client
    enabled: bool = True
    expires_at: float | None = None  # Unix time


def parse(text: str, source: str) -> dict[str, KeyRecord]:
    """Parse and validate a keys file; return its records by key hash. Warnings (see
    ``parse_with_warnings``) are logged, once per version of the file."""
    records, warnings = parse_with_warnings(text, source)
    for warning in warnings:
        log.warning(
            "keys file warning",
            extra={"fields": {"event": "keys_file_warning", "path": source, "warning": warning}},
        )
    return records


def parse_with_warnings(text: str, source: str) -> tuple[dict[str, KeyRecord], list[str]]:
    """Parse and validate a keys file; return its records by key hash, and what is valid but
    probably a mistake: no keys at all, or no ``version``."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    warnings = []
    if document is None:
        document = {"version": FORMAT_VERSION, "keys": []}
    if not isinstance(document, dict):
        raise KeysFileError(f"{source}: expected a mapping with 'version' and 'keys'")
    unknown = set(document) - {"version", "keys"}
    if unknown:
        raise KeysFileError(f"{source}: unknown top-level field {sorted(unknown)[0]!r}")
    if "version" not in document:
        warnings.append(
            f"{source}: no 'version: {FORMAT_VERSION}' line; it is read as version "
            f"{FORMAT_VERSION}, but say so, so that a later format is never misread"
        )
    elif document["version"] != FORMAT_VERSION:
        raise KeysFileError(f"{source}: version: only version {FORMAT_VERSION} is understood")
    entries = document.get("keys")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: keys: expected a list")
    if not entries:
        warnings.append(f"{source}: no keys, so every check is denied unknown_key")

    records: dict[str, KeyRecord] = {}
    clients: dict[str, tuple[Client, int]] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: keys[{index}]"
        key_hash, record = _parse_entry(entry, where)
        if key_hash in records:
            raise KeysFileError(f"{where}.sha256: the same key hash appears twice")
        client = record.client
        first, first_index = clients.setdefault(client.client_id, (client, index))
        if first.name != client.name:
            raise KeysFileError(
                f"{where}.client_name: client {client.client_id!r} is named {first.name!r} "
                f"in keys[{first_index}]"
            )
        if first.rate_limit != client.rate_limit:  # a limit is the client's, not a key's
            raise KeysFileError(
                f"{where}.rate_limit: client {client.client_id!r} has "
                f"{_limit_text(first.rate_limit)} in keys[{first_index}]"
            )
        records[key_hash] = record
    return records, warnings


def _parse_entry(entry: Any, where: str) -> tuple[str, KeyRecord]:
    if not isinstance(entry, dict):
        raise KeysFileError(f"{where}: expected a mapping")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise KeysFileError(f"{where}.{sorted(unknown)[0]}: unknown field")

    def text(name: str, pattern: re.Pattern[str] | None = None) -> str:
        value = entry.get(name)
        if not isinstance(value, str) or not value:
            raise KeysFileError(f"{where}.{name}: required, a non-empty string")
        if pattern is not None and not pattern.fullmatch(value):
            raise KeysFileError(f"{where}.{name}: {value!r} does not match {pattern.pattern}")
        return value

    key_hash = _key_hash(entry.get("sha256"), f"{where}.sha256")
    client_id = text("client_id", CLIENT_ID_PATTERN)
    name = text("client_name")
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise KeysFileError(f"{where}.client_name: at most {MAX_NAME_LENGTH} printable characters")
    roles = entry.get("roles", [])
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise KeysFileError(f"{where}.roles: expected a list of at most {MAX_ROLES} roles")
    for role in roles:
        if not isinstance(role, str) or not ROLE_PATTERN.fullmatch(role):
            raise KeysFileError(f"{where}.roles: {role!r} does not match {ROLE_PATTERN.pattern}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise KeysFileError(f"{where}.enabled: expected true or false")
    expires_at = _parse_expiry(entry.get("expires_at"), f"{where}.expires_at")
    try:
        rate_limit = parse_rate_limit(entry.get("rate_limit"))
    except ContractError:
        raise KeysFileError(
            f"{where}.rate_limit: expected {{requests_per_unit: 1-{MAX_REQUESTS_PER_UNIT}, "
            f"unit: {'|'.join(RATE_UNITS)}}}"
        ) from None
    client = Client(client_id, name, tuple(dict.fromkeys(roles)), rate_limit)
    return key_hash, KeyRecord(client=client, enabled=enabled, expires_at=expires_at)


def _limit_text(limit: RateLimit | None) -> str:
    return "no rate_limit" if limit is None else f"{limit.requests_per_unit}/{limit.unit}"


def _key_hash(value: object, where: str) -> str:
    # A wrong value is never repeated in the error: it may be the key itself, or part of it.
    if not isinstance(value, str) or not value:
        raise KeysFileError(f"{where}: required, a non-empty string")
    if _SHA256_PATTERN.fullmatch(value):
        return value
    if value.startswith("sha256:") and _SHA256_PATTERN.fullmatch(value[len("sha256:") :]):
        raise KeysFileError(f"{where}: write the hash without its 'sha256:' prefix")
    if not _HEX.fullmatch(value):
        raise KeysFileError(
            f"{where}: this looks like a key, not its hash (value not shown); store the key's "
            "SHA-256 as 64 lower-case hex characters, as 'authz-service keys add' does"
        )
    if len(value) == _SHA256_LENGTH:
        raise KeysFileError(f"{where}: write the hash in lower case")
    raise KeysFileError(
        f"{where}: expected the 64 hex characters of a SHA-256, got {len(value)} (value not shown)"
    )


def _parse_expiry(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise KeysFileError(f"{where}: expected an ISO 8601 timestamp") from None
    if not isinstance(value, datetime):
        raise KeysFileError(f"{where}: expected an ISO 8601 timestamp")
    if value.tzinfo is None:  # YAML timestamps without an offset are UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def add_key(
    path: Path,
    client_id: str,
    client_name: str,
    roles: tuple[str, ...] = (),
    prefix: str = apikeys.DEFAULT_PREFIX,
    *,
    rate_limit: RateLimit | None = None,
) -> str:
    """Generate a key, append its hash to the keys file (created if missing), return the key.
    A client's rate limit is the client's: without ``rate_limit``, a new key of a client that
    has one gets it too."""
    key = apikeys.generate(prefix)

    def add(entries: list[dict[str, Any]]) -> None:
        limit: Any = rate_limit._asdict() if rate_limit is not None else None
        if limit is None:
            limit = next(
                (e.get("rate_limit") for e in entries if e.get("client_id") == client_id), None
            )
        entries.append(_new_entry(key, client_id, client_name, roles, limit))

    _edit(path, add, missing_ok=True)
    return key


def revoke_key(path: Path, key_id_or_prefix: str) -> tuple[str, str, bool]:
    """Disable the one key whose hash starts with ``key_id_or_prefix``; return its key id, its
    client id, and whether it was enabled until now. The entry stays, so listings show it."""
    wanted = _key_id_argument(key_id_or_prefix)

    def revoke(entries: list[dict[str, Any]]) -> tuple[str, str, bool]:
        matches = [e for e in entries if str(e.get("sha256", "")).startswith(wanted)]
        if not matches:
            raise KeysFileError(f"{path}: no key id starts with {wanted!r} (see 'keys list')")
        if len(matches) > 1:
            raise KeysFileError(f"{path}: {len(matches)} keys start with {wanted!r}; give more")
        (entry,) = matches
        was_enabled = entry.get("enabled", True) is True
        entry["enabled"] = False
        return apikeys.key_id(entry["sha256"]), str(entry["client_id"]), was_enabled

    return _edit(path, revoke)


def rotate_key(
    path: Path,
    client_id: str,
    old_keys_expire_at: float | None = None,
    prefix: str = apikeys.DEFAULT_PREFIX,
    now: float | None = None,
) -> tuple[str, list[str]]:
    """Give a client a new key (same name and roles as its latest entry) and retire its other
    usable keys: disabled at once, or, with ``old_keys_expire_at`` (Unix time), expiring then
    unless they expire sooner. Return the new key and the key ids of the retired ones."""
    now = time.time() if now is None else now
    key = apikeys.generate(prefix)

    def rotate(entries: list[dict[str, Any]]) -> list[str]:
        own = [e for e in entries if e.get("client_id") == client_id]
        if not own:
            raise KeysFileError(
                f"{path}: no key for client {client_id!r}; create one with 'keys add'"
            )
        retired = []
        for entry in own:
            expires_at = _parse_expiry(entry.get("expires_at"), "expires_at")
            if entry.get("enabled", True) is not True or (
                expires_at is not None and expires_at <= now
            ):
                continue
            if old_keys_expire_at is None:
                entry["enabled"] = False
            elif expires_at is None or old_keys_expire_at < expires_at:
                entry["expires_at"] = format_expiry(old_keys_expire_at)
            retired.append(apikeys.key_id(entry["sha256"]))
        latest = own[-1]
        roles = tuple(latest.get("roles") or ())
        entries.append(
            _new_entry(key, client_id, str(latest["client_name"]), roles, latest.get("rate_limit"))
        )
        return retired

    return key, _edit(path, rotate)


def _new_entry(
    key: str,
    client_id: str,
    client_name: str,
    roles: tuple[str, ...],
    rate_limit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "sha256": apikeys.hash_key(key),
        "client_id": client_id,
        "client_name": client_name,
        "enabled": True,
    }
    if roles:
        entry["roles"] = list(roles)
    if rate_limit is not None:
        entry["rate_limit"] = dict(rate_limit)
    return entry


def _key_id_argument(value: str) -> str:
    if not _HEX.fullmatch(value):
        raise KeysFileError(
            "this looks like a key, not a key id (value not shown); give the key id that "
            "'authz-service keys list' shows"
        )
    if len(value) < _MIN_KEY_ID_LENGTH:
        raise KeysFileError(f"a key id has at least {_MIN_KEY_ID_LENGTH} hex characters")
    return value.lower()


def format_expiry(unix_time: float) -> str:
    """A Unix time as the keys file writes ``expires_at``: ISO 8601, UTC, whole seconds."""
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _edit(path: Path, change: Callable[[list[dict[str, Any]]], T], missing_ok: bool = False) -> T:
    """Apply ``change`` to the entries of a valid keys file and write the result, only if it is
    valid too. The file is rewritten in the canonical form, with a version."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not missing_ok:
            raise KeysFileError(f"{path}: keys file not found") from None
        text = ""
    parse_with_warnings(text, str(path))  # refuse to build on a file that is already invalid
    document = yaml.safe_load(text) or {}
    entries: list[dict[str, Any]] = document.get("keys") or []
    result = change(entries)
    new_text = _HEADER + yaml.safe_dump(
        {"version": FORMAT_VERSION, "keys": entries}, sort_keys=False, allow_unicode=True
    )
    parse_with_warnings(new_text, str(path))  # the change must be valid before it is written
    _write_atomically(path, new_text)
    return result


def _write_atomically(path: Path, text: str) -> None:
    # Write-then-rename so that a reloading server never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class StaticFileRegistry:
    """Serves lookups from memory; the file is polled and reloaded when it changes."""

    def __init__(
        self,
        path: Path,
        reload_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = WatchedFile(path, _parse_by_digest, reload_interval, "keys_file", len)
        self._file.value = {}
        self._clock = clock
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Load the file (any error is fatal here) and start watching it."""
        try:
            self._file.load()
        except FileNotFoundError:
            raise KeysFileError(
                f"{self._file.path}: keys file not found (setting AUTHZ_KEYS_FILE); create one "
                "with 'authz-service keys add --client-id ID --client-name NAME'"
            ) from None
        self._ready = True
        self._file.watch()

    async def close(self) -> None:
        await self._file.close()

    def lookup(self, credential: Credential) -> Client | Reason:
        record = self._file.value.get(credential.digest)
        if record is None:
            return Reason.UNKNOWN_KEY
        if not record.enabled:
            return Reason.KEY_DISABLED
        if record.expires_at is not None and self._clock() >= record.expires_at:
            return Reason.KEY_EXPIRED
        return record.client

    def find_client(self, client_id: str) -> Client | None:
        return next(
            (r.client for r in self._file.value.values() if r.client.client_id == client_id), None
        )

    def invalidate(self, digest: bytes | None, client_id: str | None) -> None:
        return None  # nothing cached: the file is the copy, reloaded as it changes


def _parse_by_digest(text: str, source: str) -> dict[bytes, KeyRecord]:
    return {bytes.fromhex(key_hash): record for key_hash, record in parse(text, source).items()}
