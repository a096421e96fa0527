"""Structured JSON logs, written off the request path, with a redaction step.

Callers pass structured data as ``extra={"fields": {...}}``. Before a line is written, any field
whose name is on the redaction list is replaced, so a credential handed to a log call by mistake
still never reaches the output.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable
from json.encoder import encode_basestring
from typing import Any, ClassVar, TextIO

from authz_service.model import Decision, Request, Trace
from authz_service.reasons import Reason

DEFAULT_REDACTED_FIELDS = ("authorization", "api_key", "apikey", "key", "x-api-key", "token")
REDACTED = "[redacted]"
_MAX_FIELD_LENGTH = 512  # request-supplied strings are cut so one request cannot bloat a line

_decisions = logging.getLogger("authz_service.decision")
DECISION_FIELDS = frozenset(
    {
        "ts",
        "level",
        "logger",
        "msg",
        "event",
        "decision",
        "reason",
        "client_id",
        "method",
        "host",
        "path",
        "request_id",
        "stream_id",
        "latency_ms",
        "key_id",
        "resolution",
        "registry_ms",
        "rule",
        "dry_run_rule",
        "rate_limit",
        "rate_limit_remaining",
        "rate_limit_mode",
        "rate_limit_ms",
    }
)
_LOCAL_QUOTA = '"rate_limit_mode": "local", "rate_limit_ms": null'
_NO_QUOTA = (
    '"rate_limit": null, "rate_limit_remaining": null, "rate_limit_mode": null, '
    '"rate_limit_ms": null'
)


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def _json_number(seconds: float | None) -> str:
    return "null" if seconds is None else repr(round(seconds * 1000, 3))


_NO_TRACE = Trace()
# Decision-line fragments that depend only on the outcome, made once each (bounded: outcomes are
# reasons and clients, rules come from the policy; cleared when full).
_OUTCOMES: dict[tuple[bool, Reason, str | None], str] = {}
_RULES: dict[tuple[str | None, str | None], str] = {}
_MAX_FRAGMENTS = 10_000


def _outcome_text(outcome: tuple[bool, Reason, str | None]) -> str:
    allowed, reason, client_id = outcome
    if len(_OUTCOMES) >= _MAX_FRAGMENTS:
        _OUTCOMES.clear()
    text = _OUTCOMES[outcome] = (
        f'"level": "info", "logger": "{_decisions.name}", "msg": "decision", '
        f'"event": "decision", "decision": "{"allow" if allowed else "deny"}", '
        f'"reason": "{reason.value}", "client_id": {_json_text(client_id)}, '
    )
    return text


def _rules_text(rules: tuple[str | None, str | None]) -> str:
    if len(_RULES) >= _MAX_FRAGMENTS:
        _RULES.clear()
    rule, dry_run_rule = rules
    text = _RULES[rules] = (
        f'"rule": {_json_text(rule)}, "dry_run_rule": {_json_text(dry_run_rule)}, '
    )
    return text


_sink: BatchingHandler | None = None  # the configured handler, when configure() was called


class JsonFormatter(logging.Formatter):
    def __init__(self, redacted_fields: Iterable[str] = DEFAULT_REDACTED_FIELDS) -> None:
        super().__init__()
        self._redacted = frozenset(name.lower() for name in redacted_fields)
        self._second = -1
        self._second_text = ""
        # Decision lines have fixed fields; unless one of them is to be redacted, they are
        # rendered directly, which is several times cheaper than the generic path.
        self._render_decisions = self._redacted.isdisjoint(DECISION_FIELDS)

    def format(self, record: logging.LogRecord) -> str:
        if self._render_decisions and isinstance(record, _DecisionRecord):
            return record.render(self._timestamp(record.created))
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(self._redact(fields))
        if record.exc_info:
            # Exception text is ours (never request data), but keep it on one line.
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)

    def _redact(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            name: REDACTED
            if name.lower() in self._redacted
            else self._redact(value)
            if isinstance(value, dict)
            else value
            for name, value in fields.items()
        }

    def _timestamp(self, created: float) -> str:
        # One strftime per second of log lines, not one per line.
        second = int(created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(created % 1 * 1000):03d}Z"


def configure(
    level: str,
    redacted_fields: Iterable[str] = DEFAULT_REDACTED_FIELDS,
    stream: TextIO | None = None,
) -> None:
    """Route every log record through a bounded buffer that a writer thread drains in batches.

    The caller only appends a record; formatting and the write (which can block on a slow
    pipe) happen on the writer thread, a batch at a time, so a record costs no thread wake-up.
    """
    # The documented logging optimisations: skip caller, thread and process lookups per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = JsonFormatter(redacted_fields)
    handler = BatchingHandler(stream or sys.stderr, formatter)
    global _sink  # noqa: PLW0603 (one process, one log sink, set once at start-up)
    _sink = handler
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    atexit.register(handler.close)


class BatchingHandler(logging.Handler):
    """Buffers records and writes them from a daemon thread every ``interval`` seconds.

    The buffer is bounded: when the writer cannot keep up, the newest records are dropped and a
    line reporting how many were lost is written in their place.
    """

    def __init__(
        self,
        stream: TextIO,
        formatter: logging.Formatter,
        interval: float = 0.05,
        capacity: int = 100_000,
    ) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream
        self._interval = interval
        self._capacity = capacity
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._dropped = 0
        self.write_errors = 0  # batches lost to a failed write
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: deque.append is atomic (records come from the check server's
        # worker threads and the event loop).
        if len(self._records) >= self._capacity:
            self._dropped += 1
        else:
            self._records.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        lines = []
        while True:
            try:  # (a second flush, at close, may be emptying the buffer too)
                record = self._records.popleft()
            except IndexError:
                break
            try:
                lines.append(self.format(record))
            except Exception:  # a broken record must not stop the writer
                self.handleError(record)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            record = logging.LogRecord(
                __name__, logging.WARNING, "", 0, "log records dropped", None, None
            )
            record.fields = {"event": "logs_dropped", "dropped": dropped}
            lines.append(self.format(record))
        if lines:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()

    def close(self) -> None:
        self._stopping.set()
        self._writer.join(timeout=5)
        self.flush()
        super().close()

    def _run(self) -> None:
        # Never ends before close(): a failed write (stderr gone, a closed pipe) loses that
        # batch, which is counted, and the next batch is tried.
        while not self._stopping.wait(self._interval):
            try:
                self.flush()
            except Exception:
                self.write_errors += 1


def failure(
    logger: logging.Logger, message: str, event: str, exc: BaseException, **fields: Any
) -> None:
    """Warn that a dependency failed: the event code, the error's type and, for errors whose
    text is known to be ours or the operating system's, a bounded detail. The text of any
    other error may quote what a dependency sent (a key echoed back, say), so it stays out."""
    detail = (
        str(exc)[:200] if isinstance(exc, OSError) or getattr(exc, "safe_to_log", False) else None
    )
    logger.warning(
        message,
        extra={"fields": {"event": event, "error": type(exc).__name__, "detail": detail, **fields}},
    )


def decision(
    request: Request, decision: Decision, elapsed: float, trace: Trace | None = None
) -> None:
    """Log one decision: who, what, why, how it was resolved and how long. Never the key."""
    if not _decisions.isEnabledFor(logging.INFO):
        return
    record = _DecisionRecord(request, decision, elapsed, trace or _NO_TRACE)
    if _sink is not None:
        _sink.handle(record)  # straight into the batch: the logger hierarchy adds nothing here
    else:
        _decisions.handle(record.for_stdlib())


class _DecisionRecord(logging.LogRecord):
    """A LogRecord that is cheap to make on the request path: it keeps references to immutable
    values and builds its fields only when formatted (on the writer thread)."""

    # What LogRecord.__init__ would compute, fixed for every decision. Instance attributes, as
    # standard formatters read record.__dict__; one update() is cheaper than computing them.
    _CONSTANT: ClassVar[dict[str, Any]] = {
        "name": _decisions.name,
        "msg": "decision",
        "args": (),
        "levelno": logging.INFO,
        "levelname": "INFO",
        "pathname": "",
        "filename": "",
        "module": "",
        "lineno": 0,
        "funcName": None,
        "exc_info": None,
        "exc_text": None,
        "stack_info": None,
        "thread": None,
        "threadName": None,
        "process": None,
        "processName": None,
        "taskName": None,
    }

    def __init__(self, request: Request, decision: Decision, elapsed: float, trace: Trace) -> None:
        self.created = time.time()
        self.msecs = self.created % 1 * 1000
        self.relativeCreated = 0.0
        self._request = request
        self._decision = decision
        self._elapsed = elapsed
        self._trace = trace

    def for_stdlib(self) -> _DecisionRecord:
        """Make it whole for other handlers and formatters, which read record.__dict__."""
        self.__dict__.update(self._CONSTANT)
        return self

    def render(self, timestamp: str) -> str:
        """The same JSON as the generic path produces from ``fields``, built directly.
        Every request-supplied string goes through json's own string encoder; the parts that
        depend only on the outcome are made once per outcome."""
        request, decision, trace = self._request, self._decision, self._trace
        client = decision.client
        outcome = (decision.allowed, decision.reason, client.client_id if client else None)
        head = _OUTCOMES.get(outcome) or _outcome_text(outcome)
        rules = (decision.rule, decision.dry_run_rule)
        tail = _RULES.get(rules) or _rules_text(rules)
        request_id, stream_id = request.request_id, request.stream_id
        key_id, resolution = trace.key_id, trace.resolution
        return (
            f'{{"ts": "{timestamp}", {head}'
            f'"method": {encode_basestring(request.method)}, '
            f'"host": {encode_basestring(request.host[:_MAX_FIELD_LENGTH])}, '
            f'"path": {encode_basestring(request.path[:_MAX_FIELD_LENGTH])}, '
            f'"request_id": '
            f"{encode_basestring(request_id[:_MAX_FIELD_LENGTH]) if request_id else 'null'}, "
            f'"stream_id": '
            f"{encode_basestring(stream_id[:_MAX_FIELD_LENGTH]) if stream_id else 'null'}, "
            f'"latency_ms": {round(self._elapsed * 1000, 3)!r}, '
            f'"key_id": {_json_text(key_id)}, '
            f'"resolution": {_json_text(resolution)}, '
            f'"registry_ms": {_json_number(trace.registry_seconds)}, '
            f"{tail}{self._quota()}}}"
        )

    def _quota(self) -> str:
        quota = self._decision.quota
        if quota is None:
            return _NO_QUOTA
        limit = quota.limit
        waited = (
            self._trace.rate_limit_seconds
        )  # also when Redis failed and the local bucket decided
        where = (
            _LOCAL_QUOTA
            if waited is None and not quota.shared
            else f'"rate_limit_mode": "{"shared" if quota.shared else "local"}", '
            f'"rate_limit_ms": {_json_number(waited)}'
        )
        return (
            f'"rate_limit": "{limit.requests_per_unit}/{limit.unit}", '
            f'"rate_limit_remaining": {quota.remaining}, {where}'
        )

    @property
    def fields(self) -> dict[str, Any]:
        request, decision, client = self._request, self._decision, self._decision.client
        return {
            "event": "decision",
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason.value,
            "client_id": client.client_id if client else None,
            "method": request.method,
            "host": request.host[:_MAX_FIELD_LENGTH],
            "path": request.path[:_MAX_FIELD_LENGTH],
            "request_id": request.request_id[:_MAX_FIELD_LENGTH] or None,
            "stream_id": request.stream_id[:_MAX_FIELD_LENGTH] or None,
            "latency_ms": round(self._elapsed * 1000, 3),
            "key_id": self._trace.key_id,
            "resolution": self._trace.resolution,
            "registry_ms": None
            if self._trace.registry_seconds is None
            else round(self._trace.registry_seconds * 1000, 3),
            "rule": decision.rule,
            "dry_run_rule": decision.dry_run_rule,
            **_quota_fields(decision, self._trace),
        }


def _quota_fields(decision: Decision, trace: Trace) -> dict[str, Any]:
    """The rate limit a decision applied: the limit, what is left of it, where it was
    counted, and how long the shared bucket took to answer."""
    quota = decision.quota
    if quota is None:
        return dict.fromkeys(
            ("rate_limit", "rate_limit_remaining", "rate_limit_mode", "rate_limit_ms")
        )
    limit = quota.limit
    return {
        "rate_limit": f"{limit.requests_per_unit}/{limit.unit}",
        "rate_limit_remaining": quota.remaining,
        "rate_limit_mode": "shared" if quota.shared else "local",
        "rate_limit_ms": None
        if trace.rate_limit_seconds is None
        else round(trace.rate_limit_seconds * 1000, 3),
    }


# The same values as class attributes too, for our own formatter, which reads attributes.
for _name, _value in _DecisionRecord._CONSTANT.items():
    setattr(_DecisionRecord, _name, _value)
