"""Structured JSON logs, written off the event loop, with a redaction step.

Callers pass structured data as ``extra={"fields": {...}}``. Before a line is written, any field
whose name is on the redaction list is replaced, so a credential handed to a log call by mistake
still never reaches the output.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from authz_service.model import Decision, Request

DEFAULT_REDACTED_FIELDS = ("authorization", "api_key", "apikey", "key", "x-api-key", "token")
REDACTED = "[redacted]"
_MAX_FIELD_LENGTH = 512  # request-supplied strings are cut so one request cannot bloat a line

_decisions = logging.getLogger("authz_service.decision")


class JsonFormatter(logging.Formatter):
    def __init__(self, redacted_fields: Iterable[str] = DEFAULT_REDACTED_FIELDS) -> None:
        super().__init__()
        self._redacted = frozenset(name.lower() for name in redacted_fields)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
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


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def configure(
    level: str,
    redacted_fields: Iterable[str] = DEFAULT_REDACTED_FIELDS,
    stream: TextIO | None = None,
) -> None:
    """Send every log record through a queue to a writer thread that formats and writes it.

    The event loop only enqueues; formatting and the write (which can block on a slow pipe)
    happen on the listener thread.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redacted_fields))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_NoCopyQueueHandler(records))
    root.setLevel(level.upper())
    listener.start()
    atexit.register(listener.stop)


class _NoCopyQueueHandler(logging.handlers.QueueHandler):
    # The stock QueueHandler formats the message on the caller's thread; our formatter runs on
    # the listener thread instead, so pass the record through untouched.
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def decision(request: Request, decision: Decision, elapsed: float) -> None:
    """Log one decision: who, what, why and how long. Never the credential."""
    if not _decisions.isEnabledFor(logging.INFO):
        return
    client = decision.client
    _decisions.info(
        "decision",
        extra={
            "fields": {
                "event": "decision",
                "decision": "allow" if decision.allowed else "deny",
                "reason": decision.reason.value,
                "client_id": client.client_id if client else None,
                "method": request.method,
                "host": request.host[:_MAX_FIELD_LENGTH],
                "path": request.path[:_MAX_FIELD_LENGTH],
                "request_id": request.request_id[:_MAX_FIELD_LENGTH],
                "latency_ms": round(elapsed * 1000, 3),
            }
        },
    )
