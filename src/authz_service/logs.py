"""Structured JSON logs, written off the event loop, with a redaction step.

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
from typing import Any, ClassVar, TextIO

from authz_service.model import Decision, Request, Trace

DEFAULT_REDACTED_FIELDS = ("authorization", "api_key", "apikey", "key", "x-api-key", "token")
REDACTED = "[redacted]"
_MAX_FIELD_LENGTH = 512  # request-supplied strings are cut so one request cannot bloat a line

_decisions = logging.getLogger("authz_service.decision")
_NO_TRACE = Trace()


class JsonFormatter(logging.Formatter):
    def __init__(self, redacted_fields: Iterable[str] = DEFAULT_REDACTED_FIELDS) -> None:
        super().__init__()
        self._redacted = frozenset(name.lower() for name in redacted_fields)
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
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

    The event loop only appends a record; formatting and the write (which can block on a slow
    pipe) happen on the writer thread, a batch at a time, so a record costs no thread wake-up.
    """
    # The documented logging optimisations: skip caller, thread and process lookups per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = JsonFormatter(redacted_fields)
    handler = BatchingHandler(stream or sys.stderr, formatter)
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
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: deque.append is atomic, and this runs on the event loop.
        if len(self._records) >= self._capacity:
            self._dropped += 1
        else:
            self._records.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        lines = []
        while self._records:
            record = self._records.popleft()
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
        while not self._stopping.wait(self._interval):
            try:
                self.flush()
            except OSError:  # stderr gone (for instance a closed pipe): nothing left to tell
                return


def failure(
    logger: logging.Logger, message: str, event: str, exc: BaseException, **fields: Any
) -> None:
    """Warn that a dependency failed: the event code, the error's type and a bounded detail."""
    logger.warning(
        message,
        extra={
            "fields": {
                "event": event,
                "error": type(exc).__name__,
                "detail": str(exc)[:200],
                **fields,
            }
        },
    )


def decision(
    request: Request, decision: Decision, elapsed: float, trace: Trace | None = None
) -> None:
    """Log one decision: who, what, why, how it was resolved and how long. Never the key."""
    if _decisions.isEnabledFor(logging.INFO):
        _decisions.handle(_DecisionRecord(request, decision, elapsed, trace or _NO_TRACE))


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
        self.__dict__.update(self._CONSTANT)
        self.created = time.time()
        self.msecs = self.created % 1 * 1000
        self.relativeCreated = 0.0
        self._request = request
        self._decision = decision
        self._elapsed = elapsed
        self._trace = trace

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
            "request_id": request.request_id[:_MAX_FIELD_LENGTH],
            "latency_ms": round(self._elapsed * 1000, 3),
            "key_id": self._trace.key_id,
            "resolution": self._trace.resolution,
            "registry_ms": None
            if self._trace.registry_seconds is None
            else round(self._trace.registry_seconds * 1000, 3),
        }
