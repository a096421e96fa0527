"""Every valid key of a registry in memory: SHA-256 digest -> client (and valid_until), compactly.

Sized for a million keys and more (the snapshot registry holds all of them). Per key it keeps
one dict entry and one small bytes object, and the value is the key's client itself, one
object shared by all the keys of the client: a client costs its own fields once, not once per
key. Only keys with a ``valid_until`` (the rare ones in a grace period) get an object of their
own, an ``Expiring`` (the client, and when the key stops validating).

Keys are the whole 32-byte digest, so a lookup matches only the very digest that was put, and
``get`` is the key dict's own ``get``: one dict read, with no Python call around it. (A digest
cut to 31 bytes would fit a 64-byte allocation instead of 80, 15 MiB less per million keys, but
cutting it takes a Python-level ``get`` that costs more than the whole dict read; and a table
outside a dict, in a bytearray, is smaller still but several times slower to search in Python.)
benchmarks/memory_bench.py measures memory and lookups against the former dict keyed by hex.

Thread safety: any number of threads may read (``get``, ``find_client``, ``len``) while others
write (``put``, ``delete``). Readers take no lock. A lookup is one dict read, and every write
changes the key table with one dict store or pop; each of these is atomic (under the GIL, and
under the per-dict lock of free-threaded builds), and values are immutable. So a reader sees
a key's value from before or after a concurrent write, never a mix. Writers serialize on a
lock, which keeps the per-client counts behind the interning consistent. A reload builds a new
store with ``successor`` and swaps the reference: readers holding the old one finish on it.

Reloading: a successor starts from a copy of the key table in use (a table's worth of memory,
about 40 MiB per million keys, not a store's: the digests and clients are shared, not copied)
and takes the new entries one at a time; a key both have keeps the digest object it has. So a
reload that changes few keys peaks at the store in use plus that table and the build's own
bookkeeping (about 100 MiB for a million keys of 200,000 clients), where a reload in which
every key is new needs two whole stores; benchmarks/memory_bench.py measures both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

DIGEST_BYTES = 32  # SHA-256


class Identified(Protocol):
    """What the store needs of a client: its id (clients with one id are interned together)."""

    @property
    def client_id(self) -> str: ...


C = TypeVar("C", bound=Identified)
H = TypeVar("H", bound=Hashable)


class Expiring(NamedTuple, Generic[C]):
    """What a key with a ``valid_until`` maps to."""

    client: C
    valid_until: float  # when the key stops validating (Unix time)


Value: TypeAlias = "C | Expiring[C]"  # what a key maps to


class KeyStore(Generic[C]):
    """API-key digests to their client and the time the key stops validating (if it does)."""

    __slots__ = ("_counts", "_keys", "_lock", "_shared", "get")

    # The key's client (an Expiring if it has a valid_until), or None for a digest that was
    # never put. It is the key dict's own method: _keys is never rebound once the store is in
    # use (a reload builds another store).
    get: Callable[[bytes], Value[C] | None]

    def __init__(self) -> None:
        self._keys: dict[bytes, Value[C]] = {}
        self.get = self._keys.get
        # client_id -> the client last put under that id, which its keys share; and how many
        # keys refer to that client_id, so that the client goes when its last key does.
        self._shared: dict[str, C] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def build(cls, entries: Iterable[tuple[bytes, C, float | None]]) -> KeyStore[C]:
        """A store of these ``(digest, client, valid_until)`` entries, taken one at a time (so a
        streamed snapshot is never held whole); a repeated digest keeps its last entry."""
        successor = cls().successor()
        for digest, client, valid_until in entries:
            successor.put(digest, client, valid_until)
        return successor.finish()

    def successor(self) -> Successor[C]:
        """A store to replace this one, filled entry by entry while this one stays in use
        (and unchanged); see ``Successor``."""
        return Successor(self)

    def __len__(self) -> int:
        return len(self._keys)

    def find_client(self, client_id: str) -> C | None:
        """The client last put under this id, while any of its keys is in the store."""
        return self._shared.get(client_id)

    def clients(self) -> list[C]:
        """Every client with a key in the store, once each."""
        with self._lock:
            return list(self._shared.values())

    def put(self, digest: bytes, client: C, valid_until: float | None = None) -> None:
        """Adds the key, or replaces what it maps to."""
        key = _checked(digest)
        with self._lock:
            shared = self._intern(client)
            old = self._keys.get(key)
            self._keys[key] = (
                shared if valid_until is None else Expiring(shared, float(valid_until))
            )
            if old is not None:
                self._release(old)

    def delete(self, digest: bytes) -> None:
        """Removes the key, if it is there."""
        key = _checked(digest)
        with self._lock:
            old = self._keys.pop(key, None)
            if old is not None:
                self._release(old)

    def _intern(self, client: C) -> C:
        client_id = client.client_id
        shared = self._shared.get(client_id)
        if shared is None or (shared is not client and shared != client):
            # New, or changed: keys already stored keep the client they have until they are
            # put again (the registry sends every key of a changed client).
            shared = client
            self._shared[client_id] = shared
        self._counts[client_id] = self._counts.get(client_id, 0) + 1
        return shared

    def _release(self, old: Value[C]) -> None:
        client_id = (old.client if isinstance(old, Expiring) else old).client_id
        count = self._counts[client_id] - 1
        if count:
            self._counts[client_id] = count
        else:
            del self._counts[client_id], self._shared[client_id]


class Successor(Generic[C]):
    """A store being built to replace another, which readers go on using meanwhile.

    It holds exactly the entries ``put`` into it (a repeated digest keeping its last), as
    ``KeyStore.build`` would, whatever the store it replaces held: it starts from a copy of
    that store's key table, so that the digest objects of keys both have are shared, and
    ``finish`` drops the keys that were not put again. Until ``finish`` returns it, the new
    store is this builder's alone (no thread sees it), so puts take no lock.
    """

    __slots__ = ("_made", "_marks", "_store", "_table")

    def __init__(self, current: KeyStore[C]) -> None:
        store = KeyStore[C]()
        with current._lock:
            store._keys.update(current._keys)  # one copy of the table: keys and values shared
        self._store = store
        # The new store's table, which holds, until finish, what this builder put: for a key
        # without a valid_until, a mark (a 1-tuple of its client, one per client), else a new
        # Expiring. Their ids tell a key that was put from one that was only copied (the
        # clients themselves may be the old store's, so they are no such sign); they are kept
        # alive in _made, so that no other object can take one of their ids meanwhile.
        self._table: dict[bytes, Any] = store._keys
        self._marks: dict[str, tuple[C]] = {}
        self._made: dict[int, tuple[C] | Expiring[C]] = {}

    def put(self, digest: bytes, client: C, valid_until: float | None = None) -> None:
        """Adds the key to the new store, or replaces what it maps to there."""
        key = _checked(digest)
        store, made = self._store, self._made
        shared = store._intern(client)
        placed: tuple[C] | Expiring[C]
        if valid_until is None:
            mark = self._marks.get(shared.client_id)
            if mark is None or mark[0] is not shared:
                mark = self._marks[shared.client_id] = (shared,)
                made[id(mark)] = mark
            placed = mark
        else:
            placed = made[id(placed)] = Expiring(shared, float(valid_until))
        old = self._table.get(key)
        self._table[key] = placed
        if old is not None and id(old) in made:  # only what was put here is counted here
            store._release(old if type(old) is Expiring else old[0])

    def finish(self) -> KeyStore[C]:
        """The new store, holding only the keys put into it; the builder is done with."""
        store, table, made = self._store, self._table, self._made
        stale = []
        for key, placed in table.items():
            if id(placed) not in made:
                stale.append(key)
            elif type(placed) is not Expiring:
                table[key] = placed[0]  # the mark's client (no key added or removed here)
        for key in stale:
            del table[key]
        if len(stale) > len(table):
            # Mostly free slots now, which a dict keeps: a copy of it is compact.
            store._keys = table.copy()
            store.get = store._keys.get
        self._marks, self._made = {}, {}
        return store


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
