"""What both transports answer when an answer cannot be what the decision says: a deny,
explicitly (503 internal_error), never an allow and never an error for Envoy to decide on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

from authz_service import answers
from authz_service.answers import AnswerSettings
from authz_service.envoy_codec import Encoder
from authz_service.http_check import Responses
from authz_service.model import Client, Decision
from authz_service.reasons import Reason

CLIENT = Client("c-1", "One", ("reader",))


def over_grpc(decision: Decision) -> tuple[int, str]:
    """The HTTP status Envoy gives the client, and the reason we gave."""
    response = CheckResponse.FromString(Encoder(AnswerSettings()).encode(decision))
    if response.status.code == 0:
        return 200, ""
    return response.denied_response.status.code, response.status.message


def over_http(decision: Decision) -> tuple[int, str]:
    head = Responses(AnswerSettings()).of(decision).split(b"\r\n\r\n")[0].decode()
    status = int(head.split()[1])
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    return status, headers.get("x-ext-authz-reason", "")


TRANSPORTS = [pytest.param(over_grpc, id="grpc"), pytest.param(over_http, id="http")]
Answer = Callable[[Decision], tuple[int, str]]


@pytest.mark.parametrize("answer", TRANSPORTS)
def test_a_deny_with_a_reason_that_only_allows_is_a_503(answer: Answer) -> None:
    """A bug (a policy verdict that denies without its reason, say) must not read as OK."""
    assert answer(Decision.deny(Reason.ALLOWED, CLIENT)) == (503, "internal_error")


@pytest.mark.parametrize("answer", TRANSPORTS)
def test_an_answer_that_cannot_be_built_is_a_503(
    answer: Answer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> answers.Identity:
        raise RuntimeError("a value no check foresaw")

    monkeypatch.setattr(answers, "identity", broken)
    assert answer(Decision.allow(CLIENT, key_id="0123456789ab")) == (503, "internal_error")


def test_a_name_that_cannot_be_encoded_is_never_an_error() -> None:
    """A lone surrogate (valid JSON, not encodable as UTF-8; the registry contract refuses it,
    but the answer must not depend on that): the header value says "?", and gRPC, whose
    metadata cannot carry it at all, denies."""
    assert answers.sanitize("Caf\ud800") == "Caf?"
    allow = Decision.allow(Client("c-2", "Caf\ud800"))
    assert over_http(allow) == (200, "")
    assert over_grpc(allow) == (503, "internal_error")
