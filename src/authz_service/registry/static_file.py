"""The embedded registry: a YAML file of key hashes, reloaded when it changes.

The file holds only SHA-256 hashes of keys. An invalid file at start is a start-up error; an
invalid file later is logged and the last good version keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from authz_service import apikeys
from authz_service.contract import CLIENT_ID_PATTERN, MAX_NAME_LENGTH, MAX_ROLES, ROLE_PATTERN
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.watched_file import WatchedFile

FORMAT_VERSION = 1
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_MAX_NAME_LENGTH = MAX_NAME_LENGTH
_MAX_ROLES = MAX_ROLES
_ENTRY_FIELDS = frozenset({"sha256", "client_id", "client_name", "roles", "enabled", "expires_at"})
_HEADER = (
    "# authz-service keys file: SHA-256 hashes of API keys, never the keys themselves.\n"
    "# Add a key with: authz-service keys add --client-id ID --client-name NAME [--roles r1,r2]\n"
)


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file, the entry and the field."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    client: Client
    enabled: bool = True
    expires_at: float | None = None  # Unix time


def parse(text: str, source: str) -> dict[str, KeyRecord]:
    """Parse and validate a keys file; return its records by key hash."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{source}: not valid YAML: {exc}") from None
    if document is None:
        document = {"version": FORMAT_VERSION, "keys": []}
    if not isinstance(document, dict):
        raise KeysFileError(f"{source}: expected a mapping with 'version' and 'keys'")
    unknown = set(document) - {"version", "keys"}
    if unknown:
        raise KeysFileError(f"{source}: unknown top-level field {sorted(unknown)[0]!r}")
    if document.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise KeysFileError(f"{source}: version: only version {FORMAT_VERSION} is understood")
    entries = document.get("keys")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: keys: expected a list")

    records: dict[str, KeyRecord] = {}
    names: dict[str, tuple[str, int]] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: keys[{index}]"
        key_hash, record = _parse_entry(entry, where)
        if key_hash in records:
            raise KeysFileError(f"{where}.sha256: the same key hash appears twice")
        client = record.client
        first = names.setdefault(client.client_id, (client.name, index))
        if first[0] != client.name:
            raise KeysFileError(
                f"{where}.client_name: client {client.client_id!r} is named {first[0]!r} "
                f"in keys[{first[1]}]"
            )
        records[key_hash] = record
    return records


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

    key_hash = text("sha256", _SHA256_PATTERN)
    client_id = text("client_id", CLIENT_ID_PATTERN)
    name = text("client_name")
    if len(name) > _MAX_NAME_LENGTH or not name.isprintable():
        raise KeysFileError(f"{where}.client_name: at most {_MAX_NAME_LENGTH} printable characters")
    roles = entry.get("roles", [])
    if not isinstance(roles, list) or len(roles) > _MAX_ROLES:
        raise KeysFileError(f"{where}.roles: expected a list of at most {_MAX_ROLES} roles")
    for role in roles:
        if not isinstance(role, str) or not ROLE_PATTERN.fullmatch(role):
            raise KeysFileError(f"{where}.roles: {role!r} does not match {ROLE_PATTERN.pattern}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise KeysFileError(f"{where}.enabled: expected true or false")
    expires_at = _parse_expiry(entry.get("expires_at"), f"{where}.expires_at")
    client = Client(client_id=client_id, name=name, roles=tuple(dict.fromkeys(roles)))
    return key_hash, KeyRecord(client=client, enabled=enabled, expires_at=expires_at)


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
) -> str:
    """Generate a key, append its hash to the keys file (created if missing), return the key."""
    text = path.read_text() if path.exists() else ""
    parse(text, str(path))  # refuse to extend a file that is already invalid
    document = yaml.safe_load(text) or {"version": FORMAT_VERSION, "keys": []}
    key = apikeys.generate(prefix)
    entry: dict[str, object] = {
        "sha256": apikeys.hash_key(key),
        "client_id": client_id,
        "client_name": client_name,
        "enabled": True,
    }
    if roles:
        entry["roles"] = list(roles)
    document["keys"] = [*(document.get("keys") or []), entry]
    new_text = _HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    parse(new_text, str(path))  # the new entry must be valid before anything is written
    _write_atomically(path, new_text)
    return key


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
