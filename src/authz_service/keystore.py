"""Every valid key of a registry in memory: SHA-256 digest -> (client, valid_until), compactly.

Sized for a million keys and more (the snapshot registry holds all of them). Per key it keeps
one dict entry and one small bytes object; the record a lookup returns, ``(client, None)``, is
shared by all the keys of a client, so a client costs its own fields once, not once per key.
Only keys with a ``valid_until`` (the rare ones in a grace period) get a record of their own.

Keys are the whole 32-byte digest, so a lookup matches only the very digest that was put, and
``get`` is the key dict's own ``get``: one dict read, with no Python call around it. (A digest
cut to 31 bytes would fit a 64-byte allocation instead of 80, 15 MiB less per million keys, but
cutting it takes a Python-level ``get`` that costs more than the whole dict read; and a table
outside a dict, in a bytearray, is smaller still but several times slower to search in Python.)
benchmarks/memory_bench.py measures memory and lookups against the former dict keyed by hex.

Thread safety: any number of threads may read (``get``, ``find_client``, ``len``) while others
write (``put``, ``delete``). Readers take no lock. A lookup is one dict read, and every write
changes the key table with one dict store or pop; each of these is atomic (under the GIL, and
under the per-dict lock of free-threaded builds), and records are immutable tuples. So a reader
sees a key's record from before or after a concurrent write, never a mix. Writers serialize on
a lock, which keeps the per-client counts behind the interning consistent. A reload builds a
new store with ``build`` and swaps the reference: readers holding the old one finish on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar

DIGEST_BYTES = 32  # SHA-256


class Identified(Protocol):
    """What the store needs of a client: its id (clients with one id are interned together)."""

    @property
    def client_id(self) -> str: ...


C = TypeVar("C", bound=Identified)
H = TypeVar("H", bound=Hashable)

Record = tuple[C, float | None]  # the client, and when the key stops validating (Unix time)


class KeyStore(Generic[C]):
    """API-key digests to their client and the time the key stops validating (if it does)."""

    __slots__ = ("_counts", "_keys", "_lock", "_shared", "get")

    # The key's client and its valid_until, or None for a digest that was never put. It is the
    # key dict's own method: _keys is never rebound (a reload builds another store).
    get: Callable[[bytes], Record[C] | None]

    def __init__(self) -> None:
        self._keys: dict[bytes, Record[C]] = {}
        self.get = self._keys.get
        # client_id -> the record shared by its keys without a valid_until, holding the client
        # last put under that id; and how many keys refer to that client_id, so that the shared
        # record goes when the client's last key does.
        self._shared: dict[str, Record[C]] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def build(cls, entries: Iterable[tuple[bytes, C, float | None]]) -> KeyStore[C]:
        """A store of these ``(digest, client, valid_until)`` entries, taken one at a time (so a
        streamed snapshot is never held whole); a repeated digest keeps its last entry."""
        store = cls()
        for digest, client, valid_until in entries:
            store._put(digest, client, valid_until)  # not shared with any thread yet: no lock
        return store

    def __len__(self) -> int:
        return len(self._keys)

    def find_client(self, client_id: str) -> C | None:
        """The client last put under this id, while any of its keys is in the store."""
        record = self._shared.get(client_id)
        return None if record is None else record[0]

    def put(self, digest: bytes, client: C, valid_until: float | None = None) -> None:
        """Adds the key, or replaces what it maps to."""
        with self._lock:
            self._put(digest, client, valid_until)

    def delete(self, digest: bytes) -> None:
        """Removes the key, if it is there."""
        key = _checked(digest)
        with self._lock:
            old = self._keys.pop(key, None)
            if old is not None:
                self._release(old[0].client_id)

    def _put(self, digest: bytes, client: C, valid_until: float | None) -> None:
        key = _checked(digest)
        shared = self._intern(client)
        record = shared if valid_until is None else (shared[0], float(valid_until))
        old = self._keys.get(key)
        self._keys[key] = record
        if old is not None:
            self._release(old[0].client_id)

    def _intern(self, client: C) -> Record[C]:
        client_id = client.client_id
        shared = self._shared.get(client_id)
        if shared is None or (shared[0] is not client and shared[0] != client):
            # New, or changed: keys already stored keep the record they have until they are
            # put again (the registry sends every key of a changed client).
            shared = (client, None)
            self._shared[client_id] = shared
        self._counts[client_id] = self._counts.get(client_id, 0) + 1
        return shared

    def _release(self, client_id: str) -> None:
        count = self._counts[client_id] - 1
        if count:
            self._counts[client_id] = count
        else:
            del self._counts[client_id], self._shared[client_id]


class Interner(Generic[H]):
    """Hands back one shared object for equal values (e.g. the roles tuples of 200,000 clients
    drawn from a few roles), remembering at most ``limit`` distinct ones; beyond that a value
    is returned as it is, so an unusual registry costs memory, never correctness."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._seen: dict[H, H] = {}

    def __call__(self, value: H) -> H:
        seen = self._seen.get(value)
        if seen is not None:
            return seen
        if len(self._seen) < self._limit:
            self._seen[value] = value
        return value


def _checked(digest: bytes) -> bytes:
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise ValueError(f"a key digest is {DIGEST_BYTES} bytes (SHA-256), not {digest!r:.20}")
    return digest
