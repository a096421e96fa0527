"""The usage ledger, the registry's side: the batches that authz-service replicas send
(``POST /v1/usage``), parsed strictly, and the usage report served back per client
(``GET /clients/{id}/usage``).

A batch is ``{"batch_id", "source", "usage": [entry, ...]}``, each entry one key's figures for
one minute: ``{"key_id", "client_id", "minute", "allowed", "denied": {reason: n},
"upstream": {class: n}, "request_bytes", "response_bytes"}``. Parsing sums entries that name
the same (key, client, minute), so the store writes each once.

Denial reasons are checked by their form, not against a list: a newer authz-service with a
reason this registry has not heard of still gets its usage counted, instead of a batch refused
and dropped. Every figure is at most ``MAX_FIGURE``, so that years of minutes still sum within
64 bits.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from authz_service.contract import CLIENT_ID_PATTERN

MAX_BATCH_BYTES = 1 << 20
MAX_ENTRIES = 10_000
MAX_SOURCE_LENGTH = 128
MAX_REASONS = 64  # distinct denial reasons in one entry
MAX_FIGURE = 10**12
UPSTREAM_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "unknown")
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
REASON_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
# A whole minute in UTC: seconds, if written, are zero; the zone is Z or +00:00.
_MINUTE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2})(?::00(?:\.0{1,6})?)?(?:Z|\+00:00)")
_ENTRY_FIELDS = (
    "key_id",
    "client_id",
    "minute",
    "allowed",
    "denied",
    "upstream",
    "request_bytes",
    "response_bytes",
)
_BATCH_FIELDS = ("batch_id", "source", "usage")

GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}  # bucket sizes, seconds
DEFAULT_GRANULARITY = "hour"
DEFAULT_SPAN = 86400  # seconds a report covers when from is not given
MAX_POINTS = 1440  # buckets in one report: a day of minutes, two months of hours
MAX_ROWS = 50_000  # (key, bucket) figures in one report


class MalformedBatchError(ValueError):
    """The batch breaks the contract; ``field`` names where ("" for the body as a whole)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class Figures:
    """What was counted: for one key and minute, or summed over several."""

    allowed: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    upstream: dict[str, int] = field(default_factory=dict)
    request_bytes: int = 0
    response_bytes: int = 0

    def add(self, other: Figures) -> None:
        self.allowed += other.allowed
        for reason, count in other.denied.items():
            self.denied[reason] = self.denied.get(reason, 0) + count
        for status_class, count in other.upstream.items():
            self.upstream[status_class] = self.upstream.get(status_class, 0) + count
        self.request_bytes += other.request_bytes
        self.response_bytes += other.response_bytes

    @property
    def empty(self) -> bool:
        return not (
            self.allowed
            or any(self.denied.values())
            or any(self.upstream.values())
            or self.request_bytes
            or self.response_bytes
        )

    def document(self) -> dict[str, Any]:
        """As the usage report shows it: every status class, and the reasons that occurred."""
        return {
            "allowed": self.allowed,
            "denied": {reason: n for reason, n in sorted(self.denied.items()) if n},
            "upstream": {name: self.upstream.get(name, 0) for name in UPSTREAM_CLASSES},
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
        }


UsageKey = tuple[str, int, str]  # (client_id, minute as Unix seconds, key_id)


@dataclass(frozen=True, slots=True)
class UsageBatch:
    batch_id: str
    source: str
    entries: int  # as sent, before entries naming the same key and minute were summed
    usage: dict[UsageKey, Figures]


def parse_batch(body: bytes) -> UsageBatch:
    """A batch as the contract has it, exactly; ``MalformedBatchError`` names what is not."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedBatchError("", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise MalformedBatchError("", "the body must be a JSON object")
    _exact_fields(document, _BATCH_FIELDS, "")
    batch_id, source, entries = document["batch_id"], document["source"], document["usage"]
    if not isinstance(batch_id, str) or not BATCH_ID_PATTERN.fullmatch(batch_id):
        raise MalformedBatchError("batch_id", f"batch_id must match {BATCH_ID_PATTERN.pattern}")
    if not isinstance(source, str) or len(source) > MAX_SOURCE_LENGTH or not source.isprintable():
        raise MalformedBatchError(
            "source", f"source must be at most {MAX_SOURCE_LENGTH} printable characters"
        )
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise MalformedBatchError("usage", f"usage must be a list of at most {MAX_ENTRIES} entries")
    usage: dict[UsageKey, Figures] = {}
    minutes: dict[str, int] = {}  # a batch names few minutes, many times
    for index, entry in enumerate(entries):
        key, figures = _entry(entry, f"usage[{index}]", minutes)
        if not figures.empty:
            held = usage.get(key)
            if held is None:
                usage[key] = figures
            else:
                held.add(figures)
    return UsageBatch(batch_id, source, len(entries), usage)


def _entry(entry: Any, where: str, minutes: dict[str, int]) -> tuple[UsageKey, Figures]:
    if not isinstance(entry, dict):
        raise MalformedBatchError(where, f"{where} must be an object")
    _exact_fields(entry, _ENTRY_FIELDS, where + ".")
    key_id, client_id, minute = entry["key_id"], entry["client_id"], entry["minute"]
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise MalformedBatchError(f"{where}.key_id", "key_id must be 12 lower-case hex digits")
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise MalformedBatchError(
            f"{where}.client_id", f"client_id must match {CLIENT_ID_PATTERN.pattern}"
        )
    start = minutes.get(minute) if isinstance(minute, str) else None
    if start is None:
        start = minutes[minute] = _minute(minute, f"{where}.minute")
    denied, upstream = entry["denied"], entry["upstream"]
    if not isinstance(denied, dict) or len(denied) > MAX_REASONS:
        raise MalformedBatchError(
            f"{where}.denied", f"denied must be an object of at most {MAX_REASONS} reasons"
        )
    for reason, count in denied.items():
        if not REASON_PATTERN.fullmatch(reason):
            raise MalformedBatchError(
                f"{where}.denied", f"denial reasons must match {REASON_PATTERN.pattern}"
            )
        _figure(count, f"{where}.denied.{reason}")
    if not isinstance(upstream, dict):
        raise MalformedBatchError(f"{where}.upstream", "upstream must be an object")
    for status_class, count in upstream.items():
        if status_class not in UPSTREAM_CLASSES:
            raise MalformedBatchError(
                f"{where}.upstream", f"upstream counts are by {', '.join(UPSTREAM_CLASSES)}"
            )
        _figure(count, f"{where}.upstream.{status_class}")
    figures = Figures(
        _figure(entry["allowed"], f"{where}.allowed"),
        dict(denied),
        dict(upstream),
        _figure(entry["request_bytes"], f"{where}.request_bytes"),
        _figure(entry["response_bytes"], f"{where}.response_bytes"),
    )
    return (client_id, start, key_id), figures


def _exact_fields(document: dict[str, Any], fields: Iterable[str], where: str) -> None:
    expected = set(fields)
    for name in sorted(set(document) - expected):
        raise MalformedBatchError(where + str(name), f"{where}{name} is not a known field")
    for name in fields:
        if name not in document:
            raise MalformedBatchError(where + name, f"{where}{name} is required")


def _figure(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_FIGURE:
        raise MalformedBatchError(where, f"{where} must be an integer from 0 to {MAX_FIGURE}")
    return value


def _minute(value: Any, where: str) -> int:
    """A whole UTC minute, as the Unix time of its start."""
    match = _MINUTE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise MalformedBatchError(
            where, f"{where} must be a whole minute in ISO 8601 UTC, e.g. 2025-01-31T12:34:00Z"
        )
    try:
        moment = datetime.fromisoformat(match.group(1) + "+00:00")
    except ValueError:
        raise MalformedBatchError(where, f"{where} is not a date and time") from None
    seconds = int(moment.timestamp())
    if seconds < 0:
        raise MalformedBatchError(where, f"{where} is before 1970")
    return seconds


# --- the report ----------------------------------------------------------------------------------
class RangeError(ValueError):
    """A report that cannot be had as asked; ``field`` names the parameter to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Span:
    """The minutes a report covers, ``[start, end)``, in buckets of ``bucket`` seconds."""

    start: int
    end: int
    granularity: str
    bucket: int


def span(start: float | None, end: float | None, granularity: str, now: float) -> Span:
    """The report's range: ``start`` rounded down and ``end`` up to whole buckets (UTC);
    ``end`` defaults to now, ``start`` to a day before ``end``."""
    bucket = GRANULARITIES.get(granularity)
    if bucket is None:
        raise RangeError("granularity", f"granularity must be one of {', '.join(GRANULARITIES)}")
    high = -int(-(now if end is None else end) // bucket) * bucket
    low = max(0, high - DEFAULT_SPAN) if start is None else int(start // bucket) * bucket
    if low < 0:
        raise RangeError("from", "from must not be before 1970")
    if high <= low or (end is not None and start is not None and end <= start):
        raise RangeError("to", "to must be after from")
    if (high - low) // bucket > MAX_POINTS:
        raise RangeError(
            "from",
            f"from..to spans {(high - low) // bucket} {granularity}s; a report has at most "
            f"{MAX_POINTS} points: narrow the range or choose a coarser granularity",
        )
    return Span(low, high, granularity, bucket)


Row = tuple[str, int, Figures]  # (key_id, bucket start, figures), in key then time order


def report(client_id: str, within: Span, rows: Iterable[Row]) -> dict[str, Any]:
    """The usage document: totals and a series (buckets with usage only), for the client and
    for each of its keys that had usage in the range."""
    keys: dict[str, tuple[Figures, list[dict[str, Any]]]] = {}
    by_bucket: dict[int, Figures] = {}
    client_totals = Figures()
    for key_id, start, figures in rows:
        totals, series = keys.setdefault(key_id, (Figures(), []))
        totals.add(figures)
        series.append({"start": iso_minute(start), **figures.document()})
        by_bucket.setdefault(start, Figures()).add(figures)
        client_totals.add(figures)
    return {
        "client_id": client_id,
        "from": iso_minute(within.start),
        "to": iso_minute(within.end),
        "granularity": within.granularity,
        "totals": client_totals.document(),
        "series": [
            {"start": iso_minute(start), **by_bucket[start].document()}
            for start in sorted(by_bucket)
        ],
        "keys": [
            {"key_id": key_id, "totals": totals.document(), "series": series}
            for key_id, (totals, series) in sorted(keys.items())
        ],
    }


def iso_minute(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
