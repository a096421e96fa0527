"""The registry's answers are parsed strictly: documented shapes only, everything else raises."""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.model import Client
from authz_service.reasons import Reason
from authz_service.registry.http import parse_answer

IDENTITY = {"client_id": "cl_1", "client_name": "One", "roles": ["reader"], "status": "active"}


def test_a_valid_verdict_becomes_the_client() -> None:
    """id, name and roles are taken; status must be active."""
    answer = {"valid": True, "client": IDENTITY, "valid_until": None}
    assert parse_answer(answer) == Client("cl_1", "One", ("reader",))


def test_a_valid_until_is_kept_with_the_client() -> None:
    """The end of a grace period travels with the answer, as Unix time."""
    answer = {"valid": True, "client": IDENTITY, "valid_until": "2030-01-01T00:00:00.000000Z"}
    client = parse_answer(answer)
    assert isinstance(client, Client)
    assert client.valid_until == 1893456000.0


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("unknown", Reason.UNKNOWN_KEY),
        ("revoked", Reason.KEY_REVOKED),
        ("expired", Reason.KEY_EXPIRED),
        ("suspended", Reason.CLIENT_SUSPENDED),
    ],
)
def test_each_refusal_keeps_its_reason(reason: str, expected: Reason) -> None:
    """The registry's stable reasons map to ours."""
    assert parse_answer({"valid": False, "reason": reason}) is expected


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        "yes",
        {},
        {"valid": "true", "client": IDENTITY, "valid_until": None},
        {"valid": True},
        {"valid": True, "client": IDENTITY},
        {"valid": True, "client": IDENTITY, "valid_until": None, "admin": True},
        {"valid": True, "client": {**IDENTITY, "status": "suspended"}, "valid_until": None},
        {"valid": True, "client": {**IDENTITY, "client_id": "a b"}, "valid_until": None},
        {"valid": True, "client": {**IDENTITY, "client_name": ""}, "valid_until": None},
        {"valid": True, "client": {**IDENTITY, "roles": "admin"}, "valid_until": None},
        {"valid": True, "client": {**IDENTITY, "roles": ["a\nb"]}, "valid_until": None},
        {
            "valid": True,
            "client": {k: v for k, v in IDENTITY.items() if k != "roles"},
            "valid_until": None,
        },
        {"valid": False},
        {"valid": False, "reason": "bored"},
        {"valid": False, "reason": "unknown", "client": IDENTITY},
    ],
)
def test_anything_else_is_an_error_never_an_allow(answer: Any) -> None:
    """Unexpected shapes raise, so the pipeline denies."""
    with pytest.raises((ValueError, TypeError, KeyError)):
        parse_answer(answer)
