"""A bounded, in-process TTL cache. It knows nothing of keys or registries.

Each entry is fresh until ``fresh_until``; after that it may still be served *only* when the
source of truth cannot be reached, until ``stale_until`` (stale-if-error). Capacity is bounded by
entries; the least recently used entry goes first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class Entry(Generic[V]):
    value: V
    fresh_until: float
    stale_until: float
    refresh_at: float  # when a hit should start refreshing it in the background
    tag: int = 0  # the owner's own mark, stored with the value


class TtlCache(Generic[K, V]):
    """Safe to use from several threads (the check server's workers read it, the event loop
    fills it): every operation holds one short lock."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[K, Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0  # entries pushed out by the size bound

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> Entry[V] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: K, entry: Entry[V]) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
                self.evictions += 1

    def pop(self, key: K) -> Entry[V] | None:
        with self._lock:
            return self._entries.pop(key, None)

    def pop_where(self, doomed: Callable[[V], bool]) -> int:
        """Remove every entry whose value matches; return how many went."""
        with self._lock:
            keys = [key for key, entry in self._entries.items() if doomed(entry.value)]
            for key in keys:
                del self._entries[key]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
