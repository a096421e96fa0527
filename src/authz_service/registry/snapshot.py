"""The synchronized copy: every valid key of the client registry, by digest, in memory.

Its change feed (``feed.ChangeFeed``, which this copy follows as a ``ChangeConsumer``) loads the
snapshot first, through ``resync``, and applies every change after it; it resyncs again whenever
it may have missed changes. Until the first snapshot is in, the copy is not ready and lookups
are errors (checks get 503). Every lookup is answered from memory, with no registry call.

The keys are held in a ``KeyStore`` (32-byte digests, each client once). Lookups run on the
check threads and take no lock; changes are applied on the event loop, one store write each.

Snapshots are read as a stream (``application/x-ndjson``: a header line with the version, one
entry a line, a trailer line with the count) when the registry offers it: each entry goes into
the new store as it arrives, so a large snapshot is never held as one document. The plain JSON
form is accepted too, up to ``MAX_DOCUMENT_BYTES``. A reload builds a new store while the one
in use goes on answering, and replaces it in one step once the whole snapshot is in; a failed
one (an HTTP error, a broken or truncated stream, an entry outside the contract, a wrong count)
keeps the copy in use as it was. The new store is a ``keystore.Successor`` of the one in use, so
the keys and clients both hold are held once: a reload that changes few keys peaks at the copy
in use plus about 100 MiB per million keys (a key table, the load's bookkeeping), where one in
which every key is new needs both whole (benchmarks/memory_bench.py measures both). The
change feed applies no change while a reload is under way (it awaits ``resync``).

A snapshot the copy already has (the same ``ETag``) is not loaded again.

The registry's key hashes must be plain SHA-256 (a registry without a pepper), since they are
compared with the SHA-256 of the presented key.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from authz_service import contract
from authz_service.contract import Change, ContractError, Identities
from authz_service.keystore import KeyStore, Successor
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryError

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
MAX_LINE_BYTES = 64 * 1024
# The plain form is read whole before it is parsed; a registry larger than this streams.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
# Entries taken in between two turns of the event loop, in the plain form (the streamed form
# yields after each chunk it receives).
_BATCH = 2_000
_decode = json.JSONDecoder().raw_decode
# glibc's malloc_trim (see resync); with another C library, nothing is trimmed.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


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
        # Replaced whole by a reload; readers on other threads finish on the one they read.
        self._store = KeyStore[Client]()
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
        found = self._store.get(credential.digest)
        if found is None:
            return Reason.UNKNOWN_KEY
        if isinstance(found, Client):
            return found
        if self._clock() >= found.valid_until:
            return Reason.KEY_REVOKED  # its grace period (or life) ended since the last change
        return found.client

    def find_client(self, client_id: str) -> Client | None:
        return self._store.find_client(client_id)

    def invalidate(self, digest: bytes | None, client_id: str | None) -> None:
        return None  # nothing cached: this is the registry's copy, changed as the registry is

    # --- the change feed (ChangeConsumer) -----------------------------------------------------
    def apply(self, change: Change) -> None:
        if self.version is not None and change.version <= self.version:
            return  # already in the copy (the snapshot reflects it)
        if change.entry is not None:
            entry = change.entry
            self._store.put(entry.digest, entry.client, entry.valid_until)
        else:
            self._store.delete(change.digest)
        self.version = change.version
        self.synced_at = time.time()

    async def resync(self) -> int:
        """Load the registry's snapshot (unless it is the one in use); return its version."""
        started = time.monotonic()
        loaded = await self._fetch()
        if isinstance(loaded, int):  # the registry's snapshot is the one in use
            self.synced_at = time.time()
            return loaded
        store, version = loaded
        self._store, self.version = store, version  # the old store goes, unless a check holds it
        self.synced_at = time.time()
        log.info(
            "registry snapshot loaded",
            extra={
                "fields": {
                    "event": "snapshot_loaded",
                    "version": version,
                    "keys": len(store),
                    "clients": len(store.clients()),
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )
        if _malloc_trim is not None:
            # The old store's tables, and the load's own, were freed to the C allocator, which
            # keeps freed memory for reuse (tens of MiB at a million keys): hand it back.
            await asyncio.to_thread(_malloc_trim, 0)
        return version

    async def _fetch(self) -> tuple[KeyStore[Client], int] | int:
        """The registry's snapshot in a new store, and its version; or only the version, if
        it is the one in use."""
        headers = {**self._headers, "Accept": f"{NDJSON}, application/json;q=0.5"}
        if self.version is not None:
            headers["If-None-Match"] = f'"v{self.version}"'
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(self._url, headers=headers, allow_redirects=False) as reply,
        ):
            if reply.status == 304 and self.version is not None:
                return self.version
            if reply.status != 200:
                raise SnapshotError(f"the registry answered the snapshot with HTTP {reply.status}")
            load = _Load(self._store)
            try:
                if reply.content_type == NDJSON:
                    version = await load.lines(reply.content)
                else:
                    version = await load.document(await _read_document(reply))
            except (ContractError, ValueError, RecursionError) as exc:
                raise SnapshotError(f"a snapshot outside the contract: {exc}") from None
            except aiohttp.ClientPayloadError:
                raise SnapshotError("the snapshot broke off before its end") from None
        # Sweeping a million keys takes a moment: off the event loop (the new store is the
        # load's alone). The start of a load stays on the loop: started on a worker thread
        # (a glibc arena of its own), it left RSS 12 MiB higher after a 1M-key reload.
        return await asyncio.to_thread(load.finish), version


class _Load:
    """One snapshot on its way into a successor of the store in use."""

    def __init__(self, current: KeyStore[Client]) -> None:
        self._successor: Successor[Client] = current.successor()
        # Unchanged clients of the copy in use are taken as they are, not parsed again.
        self._identities = Identities(current.clients())
        self._entries = 0

    async def lines(self, stream: aiohttp.StreamReader) -> int:
        """The streamed form: a header line with the version, an entry per line, a trailer
        line with the count (a stream cut short has none, and is refused)."""
        version: int | None = None
        ended = False
        rest = b""
        async for chunk in stream.iter_any():
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE_BYTES:
                raise ContractError("a snapshot line over the size limit")
            for line in lines:
                version, ended = self._line(line, version, ended)
            await asyncio.sleep(0)  # the next chunk may be buffered already: let others run
        if rest.strip():  # a last line without its newline (a cut one is not JSON)
            version, ended = self._line(rest, version, ended)
        if version is None or not ended:
            raise ContractError("a snapshot cut short (no trailer line)")
        return version

    def _line(self, line: bytes, version: int | None, ended: bool) -> tuple[int, bool]:
        """Takes one line of the streamed form; the version, and whether it was the trailer."""
        if len(line) > MAX_LINE_BYTES:
            raise ContractError("a snapshot line over the size limit")
        if ended:
            raise ContractError("a snapshot with lines after its trailer")
        document = _parse_line(line)
        if version is None:
            return _header(document), False
        if _is_trailer(document):
            self._check_count(document)
            return version, True
        self._add(document)
        return version, False

    async def document(self, body: bytearray) -> int:
        """The plain form: one JSON document with the version and the list of keys."""
        document = json.loads(body)
        version = _header(document)
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ContractError("a snapshot without a list of keys")
        for start in range(0, len(entries), _BATCH):
            for item in entries[start : start + _BATCH]:
                self._add(item)
            await asyncio.sleep(0)
        return version

    def finish(self) -> KeyStore[Client]:
        return self._successor.finish()

    def _add(self, document: Any) -> None:
        entry = contract.parse_entry(document, self._identities)
        self._successor.put(entry.digest, entry.client, entry.valid_until)
        self._entries += 1

    def _check_count(self, trailer: dict[str, Any]) -> None:
        count = trailer.get("count")
        if type(count) is not int or count != self._entries:
            raise ContractError("a snapshot whose count does not match its entries")


async def _read_document(reply: aiohttp.ClientResponse) -> bytearray:
    """The plain form's body, refused once it is longer than ``MAX_DOCUMENT_BYTES``."""
    if (reply.content_length or 0) > MAX_DOCUMENT_BYTES:
        raise ContractError(_TOO_LARGE)
    body = bytearray()
    async for chunk in reply.content.iter_any():
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ContractError(_TOO_LARGE)
    return body


_TOO_LARGE = (
    f"a plain JSON snapshot over {MAX_DOCUMENT_BYTES // 2**20} MiB (a registry this large "
    f"must offer the streamed form, {NDJSON})"
)


def _parse_line(line: bytes) -> Any:
    """One line's document; json.loads without its layers, which cost a third of a load."""
    text = line.decode()
    document, end = _decode(text)
    if end != len(text) and not text[end:].isspace():
        raise ContractError("a snapshot line with more than one document")
    return document


def _header(document: object) -> int:
    version = document.get("version") if isinstance(document, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ContractError("a snapshot without a version")
    return version


def _is_trailer(document: object) -> bool:
    return isinstance(document, dict) and document.get("end") is True
