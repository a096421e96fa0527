"""Logs are JSON lines, and credentials are redacted even when handed to a log call by mistake."""

from __future__ import annotations

import io
import json
import logging
import pickle
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.logs import (
    DECISION_FIELDS,
    BatchingHandler,
    JsonFormatter,
    _DecisionRecord,
    decision,
)
from authz_service.model import Authorization, Client, Decision, Quota, RateLimit, Request, Trace
from authz_service.reasons import Reason


def format_record(
    fields: dict[str, object], redacted: tuple[str, ...] = ("authorization",)
) -> dict[str, object]:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    record.fields = fields
    return json.loads(JsonFormatter(redacted).format(record))  # type: ignore[no-any-return]


def test_a_record_is_one_json_object_with_its_fields() -> None:
    """Structured fields sit beside the timestamp, level, logger and message."""
    line = format_record({"event": "x", "n": 1})
    assert line["msg"] == "hello"
    assert line["level"] == "info"
    assert (line["event"], line["n"]) == ("x", 1)
    assert str(line["ts"]).endswith("Z")


def test_fields_on_the_redaction_list_are_replaced_at_any_depth() -> None:
    """Names are matched case-insensitively, also inside nested mappings."""
    line = format_record(
        {"Authorization": "ApiKey secret", "nested": {"authorization": "secret"}, "ok": "v"}
    )
    assert line["Authorization"] == "[redacted]"
    assert line["nested"] == {"authorization": "[redacted]"}
    assert line["ok"] == "v"


def test_a_decision_line_names_who_what_and_why_but_not_the_query(caplog: object) -> None:
    """One info line per decision with client, reason, method, host, path, request id, latency."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("authz_service.decision")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        decision(
            Request(
                is_http=True,
                authorization=Authorization(("ApiKey secret-key",)),
                method="GET",
                host="h",
                path="/p",
                request_id="r-1",
            ),
            Decision.allow(Client("c-1", "One")),
            0.0012,
        )
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert {
        k: line[k]
        for k in (
            "event",
            "decision",
            "reason",
            "client_id",
            "method",
            "host",
            "path",
            "request_id",
            "latency_ms",
        )
    } == {
        "event": "decision",
        "decision": "allow",
        "reason": Reason.ALLOWED.value,
        "client_id": "c-1",
        "method": "GET",
        "host": "h",
        "path": "/p",
        "request_id": "r-1",
        "latency_ms": 1.2,
    }
    assert "secret-key" not in stream.getvalue()


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)


def test_the_batching_handler_writes_every_record_off_the_callers_thread() -> None:
    """Records are written as JSON lines by the writer thread, and close() flushes the rest."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, JsonFormatter(), interval=0.01)
    handler.handle(record("one"))
    deadline = time.monotonic() + 2
    while "one" not in stream.getvalue():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    handler.handle(record("two"))
    handler.close()
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["one", "two"]


def test_the_batching_handler_is_bounded_and_says_what_it_dropped() -> None:
    """Beyond capacity, records are dropped and one warning line counts them."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, JsonFormatter(), interval=60, capacity=3)
    for n in range(5):
        handler.handle(record(str(n)))
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines[:3]] == ["0", "1", "2"]
    assert lines[3]["event"] == "logs_dropped"
    assert lines[3]["dropped"] == 2


def test_redacting_a_decision_field_still_gives_a_whole_line() -> None:
    """Decision lines are rendered directly unless a field of theirs is on the redaction list;
    then the generic path redacts it."""
    request = Request(is_http=True, method="GET", host="h", path="/secret-path", request_id="r")
    lines = []
    for redacted in (("authorization",), ("path",)):
        stream = io.StringIO()
        handler = BatchingHandler(stream, JsonFormatter(redacted), interval=60)
        handler.handle(
            _DecisionRecord(
                request,
                Decision.allow(Client("c", "C"), rule="r-1", dry_run_rule="r-2"),
                0.001,
                Trace(key_id="abc"),
            )
        )
        handler.close()
        lines.append(json.loads(stream.getvalue()))
    direct, redacted_line = lines
    assert direct["path"] == "/secret-path"
    assert (direct["rule"], direct["dry_run_rule"]) == ("r-1", "r-2")
    assert redacted_line["path"] == "[redacted]"
    assert {k: v for k, v in direct.items() if k not in {"path", "ts"}} == {
        k: v for k, v in redacted_line.items() if k not in {"path", "ts"}
    }


def test_a_rate_limited_decision_records_the_limit_what_is_left_and_where_it_was_counted() -> None:
    """rate_limit, rate_limit_remaining, rate_limit_mode and the shared bucket's wait; the
    direct rendering and the generic path agree, and checks without a limit say null."""
    request = Request(is_http=True, method="GET", host="h", path="/p")
    limit = RateLimit(5, "second")
    limited = Decision(
        False, Reason.RATE_LIMITED, Client("c", "C"), None, None, "k", Quota(limit, 0, 1, True)
    )
    lines = []
    for redacted in (("authorization",), ("path",)):
        stream = io.StringIO()
        handler = BatchingHandler(stream, JsonFormatter(redacted), interval=60)
        handler.handle(_DecisionRecord(request, limited, 0.001, Trace(rate_limit_seconds=0.0004)))
        handler.handle(_DecisionRecord(request, Decision.allow(Client("c", "C")), 0.001, Trace()))
        fell_back = limited._replace(quota=Quota(limit, 0, 1, False))  # Redis failed after 20 ms
        handler.handle(_DecisionRecord(request, fell_back, 0.001, Trace(rate_limit_seconds=0.02)))
        handler.handle(_DecisionRecord(request, fell_back, 0.001, Trace()))  # no Redis at all
        handler.close()
        lines.append([json.loads(line) for line in stream.getvalue().splitlines()])
    direct, generic = (
        [{k: v for k, v in line.items() if k not in {"ts", "path"}} for line in rendered]
        for rendered in lines
    )
    assert direct == generic
    for with_limit, without, fell_back, local in lines:
        assert (fell_back["rate_limit_mode"], fell_back["rate_limit_ms"]) == ("local", 20.0)
        assert (local["rate_limit_mode"], local["rate_limit_ms"]) == ("local", None)
        assert {k: with_limit[k] for k in with_limit if k.startswith("rate_limit")} == {
            "rate_limit": "5/second",
            "rate_limit_remaining": 0,
            "rate_limit_mode": "shared",
            "rate_limit_ms": 0.4,
        }
        assert [without[k] for k in without if k.startswith("rate_limit")] == [None] * 4
    assert set(lines[0][0]) == DECISION_FIELDS


_TEXT = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    method=_TEXT,
    host=_TEXT,
    path=_TEXT,
    request_id=_TEXT,
    stream_id=_TEXT,
    allowed=st.booleans(),
    reason=st.sampled_from(list(Reason)),
    client_id=st.none() | st.text(min_size=1, max_size=20),
    rule=st.none() | _TEXT,
    dry_run_rule=st.none() | _TEXT,
    key_id=st.none() | _TEXT,
    registry=st.none() | st.floats(min_value=0, max_value=10),
    elapsed=st.floats(min_value=0, max_value=10),
)
def test_a_decision_line_rendered_directly_is_the_generic_formatters_line(
    *,
    method: str,
    host: str,
    path: str,
    request_id: str,
    stream_id: str,
    allowed: bool,
    reason: Reason,
    client_id: str | None,
    rule: str | None,
    dry_run_rule: str | None,
    key_id: str | None,
    registry: float | None,
    elapsed: float,
) -> None:
    """The direct rendering (cached fragments and all) writes exactly what json.dumps would."""
    request = Request(
        is_http=True,
        method=method,
        host=host,
        path=path,
        request_id=request_id,
        stream_id=stream_id,
    )
    client = None if client_id is None else Client(client_id, "Name")
    made = Decision(allowed, reason, client, rule, dry_run_rule, key_id)
    trace = Trace(key_id=key_id, resolution="memory", registry_seconds=registry)
    record = _DecisionRecord(request, made, elapsed, trace)
    expected = {
        "ts": "T",
        "level": "info",
        "logger": "authz_service.decision",
        "msg": "decision",
        **record.fields,
    }
    assert record.render("T") == json.dumps(expected, ensure_ascii=False)


def test_a_request_shows_no_authorization_in_any_text_form() -> None:
    """The header carries the key: a Request logged, formatted or serialised by mistake (by a
    formatter that dumps a record's attributes, say) never shows it."""
    request = Request(is_http=True, authorization=Authorization(("ApiKey azk_secret",)))
    for text in (repr(request), str(request), f"{request.authorization}", str(vars(Holder()))):
        assert "azk_secret" not in text
    with pytest.raises(TypeError):
        json.dumps(list(request))
    with pytest.raises(TypeError):
        pickle.dumps(request)
    assert request.authorization.reveal() == ("ApiKey azk_secret",)


class Holder:
    """What a stdlib formatter that lists a record's attributes would see."""

    def __init__(self) -> None:
        self.request = Request(is_http=True, authorization=Authorization(("ApiKey azk_secret",)))
