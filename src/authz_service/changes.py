"""What the registry's change feed said recently, per key and per client, so that no answer
older than a change can override it.

Registry answers race with changes: a lookup may start, the key be revoked, the feed deliver
the revocation (evicting nothing, as nothing is cached yet), and only then the lookup's "valid"
arrive. A lagging registry replica may also answer "valid" well after the feed said otherwise.
So every answer is judged against the changes seen since:

- an answer carries the registry's change-log ``version`` (the contract's optional field); a
  change with a higher version is newer than the answer. Without a version, a change that
  arrived after the lookup started is newer;
- a delete (the key was revoked, expired, or its client suspended or deleted) is a tombstone:
  a "valid" answer that is not known to be newer than it is refused with the tombstone's reason,
  for as long as the tombstone is kept, until an upsert for the key (or the client) lifts it;
- any other change newer than the answer makes it stale: it is neither cached nor served, and
  the registry is asked again.

Records are kept for ``retention`` seconds (longer than any cached answer lives) and at most
``max_records`` of each kind; an answer from before records were dropped for space is treated
as stale.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple, TypeVar

from authz_service.contract import Answer, Change
from authz_service.model import Client
from authz_service.reasons import Reason

# Delete reasons that are about the client rather than the one key.
CLIENT_REASONS = frozenset({Reason.CLIENT_SUSPENDED, Reason.UNKNOWN_KEY})
K = TypeVar("K")


class Stale(Enum):
    """The answer predates a change: ask again."""

    STALE = "stale"


STALE = Stale.STALE


class Seen(NamedTuple):
    seq: int  # order of arrival in this process
    version: int  # the registry's change-log version
    at: float  # when it arrived (monotonic clock)
    tombstone: Reason | None  # why the key (or client) stopped validating; None: it validates


class RecentChanges:
    def __init__(
        self,
        retention: float,
        max_records: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retention = retention
        self._max = max_records
        self._clock = clock
        self._seq = 0
        self._dropped_seq = 0  # the newest record dropped for space
        self._keys: OrderedDict[bytes, Seen] = OrderedDict()
        self._clients: OrderedDict[str, Seen] = OrderedDict()

    def mark(self) -> int:
        """Where the feed stands now: give it back to ``judge`` and ``changed_since``."""
        return self._seq

    def record(self, change: Change) -> None:
        self._seq += 1
        now = self._clock()
        tombstone = change.reason if change.op == "delete" else None
        _put(self._keys, change.digest, Seen(self._seq, change.version, now, tombstone))
        if change.client_id is not None:
            previous = self._clients.get(change.client_id)
            if tombstone not in CLIENT_REASONS and change.op == "delete":
                # One key of the client went: the client's own standing is unchanged.
                tombstone = previous.tombstone if previous is not None else None
            _put(self._clients, change.client_id, Seen(self._seq, change.version, now, tombstone))
        for records in (self._keys, self._clients):
            while records:
                oldest = next(iter(records.values()))
                if len(records) > self._max:
                    self._dropped_seq = max(self._dropped_seq, oldest.seq)
                elif now - oldest.at < self._retention:
                    break
                records.popitem(last=False)

    def lost_track(self) -> None:
        """Changes may have been missed (a resync): no answer to a lookup that began before
        now can be judged, so each is asked again."""
        self._seq += 1
        self._dropped_seq = self._seq

    def judge(self, digest: bytes, answer: Answer, mark: int) -> Answer | Stale:
        """The answer to use for a lookup that started at ``mark``: the answer itself, a
        refusal from a tombstone it must not override, or STALE."""
        if mark < self._dropped_seq:
            return STALE
        client = answer.result if isinstance(answer.result, Client) else None
        for seen in (
            self._keys.get(digest),
            None if client is None else self._clients.get(client.client_id),
        ):
            if seen is None or self._clock() - seen.at >= self._retention:
                continue
            newer = seen.seq > mark if answer.version is None else seen.version > answer.version
            if seen.tombstone is not None:
                if client is not None and (newer or answer.version is None):
                    return Answer(seen.tombstone, version=seen.version)
            elif newer:
                return STALE
        return answer

    def changed_since(self, mark: int, client_id: str) -> bool:
        """Has the feed reported a change for this client since ``mark``? (A cached answer
        stored at ``mark`` is then out of date.)"""
        if mark < self._dropped_seq:
            return True
        seen = self._clients.get(client_id)
        return seen is not None and seen.seq > mark


def _put(records: OrderedDict[K, Seen], key: K, seen: Seen) -> None:
    records[key] = seen
    records.move_to_end(key)
