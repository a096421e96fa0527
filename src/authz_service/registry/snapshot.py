"""The synchronized copy: every valid key of the client registry, by digest, in memory.

Its change feed (``feed.ChangeFeed``, which this copy follows as a ``ChangeConsumer``) loads the
snapshot first, through ``resync``, and applies every change after it; it resyncs again whenever
it may have missed changes. Until the first snapshot is in, the copy is not ready and lookups
are errors (checks get 503). A reload replaces the copy in one step, and a failed one keeps it.
Every lookup is answered from memory, with no registry call.

Snapshots are read as a stream (``application/x-ndjson``, one entry per line) when the registry
offers it, so a large one is never held as one document; the plain JSON form is accepted too.
A snapshot the copy already has (the same ``ETag``) is not loaded again.

The registry's key hashes must be plain SHA-256 (a registry without a pepper), since they are
compared with the SHA-256 of the presented key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import aiohttp

from authz_service import contract
from authz_service.contract import Change, ContractError, Entry
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryError

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
MAX_LINE_BYTES = 64 * 1024
Record = tuple[Client, float | None]  # the client, and when the key stops validating


class SnapshotError(RegistryError):
    """The snapshot could not be loaded; the copy in use (if any) stays."""


class SnapshotRegistry:
    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = base_url.rstrip("/") + "/v1/snapshot"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout)
        self._clock = clock
        self._keys: dict[bytes, Record] = {}
        self.version: int | None = None
        self.synced_at: float | None = None  # when the copy last took in the registry's state

    @property
    def ready(self) -> bool:
        return self.version is not None

    async def start(self) -> None:
        pass  # the change feed loads the first snapshot (resync)

    async def close(self) -> None:
        pass

    def lookup(self, credential: Credential) -> Client | Reason:
        if self.version is None:
            raise RegistryError("no snapshot of the registry loaded yet")
        record = self._keys.get(credential.digest)
        if record is None:
            return Reason.UNKNOWN_KEY
        client, valid_until = record
        if valid_until is not None and self._clock() >= valid_until:
            return Reason.KEY_REVOKED  # its grace period (or life) ended since the last change
        return client

    def find_client(self, client_id: str) -> Client | None:
        return next((c for c, _ in self._keys.values() if c.client_id == client_id), None)

    def invalidate(self, digest: bytes | None, client_id: str | None) -> None:
        return None  # nothing cached: this is the registry's copy, changed as the registry is

    # --- the change feed (ChangeConsumer) -----------------------------------------------------
    def apply(self, change: Change) -> None:
        if self.version is not None and change.version <= self.version:
            return  # already in the copy (the snapshot reflects it)
        if change.entry is not None:
            self._keys[change.digest] = _record(change.entry)
        else:
            self._keys.pop(change.digest, None)
        self.version = change.version
        self.synced_at = time.time()

    async def resync(self) -> int:
        """Load the registry's snapshot (unless it is the one in use); return its version."""
        headers = {**self._headers, "Accept": f"{NDJSON}, application/json;q=0.5"}
        if self.version is not None:
            headers["If-None-Match"] = f'"v{self.version}"'
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(self._url, headers=headers, allow_redirects=False) as reply,
        ):
            if reply.status == 304 and self.version is not None:
                self.synced_at = time.time()
                return self.version
            if reply.status != 200:
                raise SnapshotError(f"the registry answered the snapshot with HTTP {reply.status}")
            try:
                if reply.content_type == NDJSON:
                    version, keys = await _read_lines(reply)
                else:
                    version, keys = _read_document(await reply.read())
            except (ContractError, ValueError, RecursionError) as exc:
                raise SnapshotError(f"a snapshot outside the contract: {exc}") from None
        self._keys, self.version = keys, version
        self.synced_at = time.time()
        log.info(
            "registry snapshot loaded",
            extra={"fields": {"event": "snapshot_loaded", "version": version, "keys": len(keys)}},
        )
        return version


async def _read_lines(reply: aiohttp.ClientResponse) -> tuple[int, dict[bytes, Record]]:
    """The streamed form: a header line with the version, an entry per line, a trailer line
    with the count (a stream cut short has none, and is refused)."""
    keys: dict[bytes, Record] = {}
    version: int | None = None
    async for line in reply.content:
        if len(line) > MAX_LINE_BYTES:
            raise ContractError("a snapshot line over the size limit")
        document = json.loads(line)
        if version is None:
            version = _header(document)
        elif isinstance(document, dict) and document.get("end") is True:
            if document.get("count") != len(keys):
                raise ContractError("a snapshot whose count does not match its entries")
            return version, keys
        else:
            entry = contract.parse_entry(document)
            keys[entry.digest] = _record(entry)
    raise ContractError("a snapshot cut short (no trailer line)")


def _read_document(body: bytes) -> tuple[int, dict[bytes, Record]]:
    document = json.loads(body)
    version = _header(document)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ContractError("a snapshot without a list of keys")
    keys: dict[bytes, Record] = {}
    for item in entries:
        entry = contract.parse_entry(item)
        keys[entry.digest] = _record(entry)
    return version, keys


def _header(document: object) -> int:
    version = document.get("version") if isinstance(document, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ContractError("a snapshot without a version")
    return version


def _record(entry: Entry) -> Record:
    return entry.client, entry.valid_until
