"""The registry contract is parsed strictly: documented shapes only, everything else raises."""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.contract import Answer, Change, ContractError, Entry, parse_answer, parse_change
from authz_service.model import Client, RateLimit
from authz_service.reasons import Reason

IDENTITY = {"client_id": "cl_1", "client_name": "One", "roles": ["reader"], "status": "active"}


def test_a_valid_verdict_becomes_the_client() -> None:
    """id, name and roles are taken; status must be active."""
    answer = {"valid": True, "client": IDENTITY, "valid_until": None}
    assert parse_answer(answer) == Answer(Client("cl_1", "One", ("reader",)))


def test_a_valid_until_is_kept_with_the_answer() -> None:
    """The end of a grace period travels with the answer, as Unix time."""
    answer = {"valid": True, "client": IDENTITY, "valid_until": "2030-01-01T00:00:00.000000Z"}
    assert parse_answer(answer, now=0).valid_until == 1893456000.0


def test_a_valid_answer_whose_valid_until_has_passed_is_expired() -> None:
    """A "valid" that is already over is a refusal, never an allow."""
    answer = {"valid": True, "client": IDENTITY, "valid_until": "2020-01-01T00:00:00.000000Z"}
    assert parse_answer(answer).result is Reason.KEY_EXPIRED


def test_the_version_the_answer_reflects_is_kept() -> None:
    """The registry's change-log version lets a later answer be told from an older one."""
    assert parse_answer({"valid": False, "reason": "revoked", "version": 42}).version == 42
    assert parse_answer({"valid": True, "client": IDENTITY, "valid_until": None}).version is None


def test_a_rate_limit_travels_with_the_client() -> None:
    """The client's limit, when the registry sets one, is part of its identity."""
    limited = {**IDENTITY, "rate_limit": {"requests_per_unit": 5, "unit": "second"}}
    answer = parse_answer({"valid": True, "client": limited, "valid_until": None})
    assert answer.result == Client("cl_1", "One", ("reader",), RateLimit(5, "second"))


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
    assert parse_answer({"valid": False, "reason": reason}).result is expected


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
        {"valid": True, "client": {**IDENTITY, "client_name": "a\nb"}, "valid_until": None},
        {"valid": True, "client": {**IDENTITY, "client_name": "x\ud800"}, "valid_until": None},
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
        {"valid": False, "reason": "revoked", "version": "7"},
        {"valid": False, "reason": "revoked", "version": -1},
        {"valid": True, "client": {**IDENTITY, "rate_limit": {"requests_per_unit": 0}}},
        {"valid": True, "client": IDENTITY, "valid_until": "tomorrow"},
        {"valid": True, "client": IDENTITY, "valid_until": "2030-01-01T00:00:00"},
    ],
)
def test_anything_else_is_an_error_never_an_allow(answer: Any) -> None:
    """Unexpected shapes raise ContractError, so the check denies."""
    with pytest.raises(ContractError):
        parse_answer(answer)


def test_an_error_never_quotes_what_the_registry_sent() -> None:
    """A key echoed back in a malformed answer cannot reach a log through the error."""
    echoed = "azk_EchoedBackByAConfusedRegistry0000000"
    for answer in [{"valid": False, "reason": echoed}, {"valid": True, "client": echoed}]:
        with pytest.raises(ContractError) as raised:
            parse_answer(answer)
        assert echoed not in str(raised.value)


KEY_HASH = "ab" * 32
ENTRY = {"key_hash": KEY_HASH, "key_id": "abababababab", "valid_until": None, "client": IDENTITY}


def test_a_delete_change_keeps_its_key_client_and_reason() -> None:
    """Deletes say why the key stopped validating; without a reason, it was revoked."""
    change = parse_change(
        {
            "version": 3,
            "op": "delete",
            "key_hash": KEY_HASH,
            "client_id": "cl_1",
            "reason": "suspended",
        }
    )
    assert change == Change(
        3, "delete", bytes.fromhex(KEY_HASH), "cl_1", reason=Reason.CLIENT_SUSPENDED
    )
    plain = parse_change({"version": 4, "op": "delete", "key_hash": KEY_HASH})
    assert plain.reason is Reason.KEY_REVOKED


def test_an_upsert_change_carries_its_entry() -> None:
    """An upsert names the key's client through its entry."""
    change = parse_change({"version": 5, "op": "upsert", "key_hash": KEY_HASH, "entry": ENTRY})
    assert change.entry == Entry(bytes.fromhex(KEY_HASH), Client("cl_1", "One", ("reader",)), None)
    assert change.client_id == "cl_1"


@pytest.mark.parametrize(
    "change",
    [
        None,
        [],
        {"version": None, "op": "delete", "key_hash": KEY_HASH},
        {"version": "1", "op": "delete", "key_hash": KEY_HASH},
        {"version": 1, "op": "rename", "key_hash": KEY_HASH},
        {"version": 1, "op": "delete"},
        {"version": 1, "op": "delete", "key_hash": "AB" * 32},
        {"version": 1, "op": "delete", "key_hash": KEY_HASH, "reason": "bored"},
        {"version": 1, "op": "delete", "key_hash": KEY_HASH, "client_id": "a b"},
        {"version": 1, "op": "upsert", "key_hash": KEY_HASH},
        {
            "version": 1,
            "op": "upsert",
            "key_hash": KEY_HASH,
            "entry": {**ENTRY, "key_hash": "cd" * 32},
        },
    ],
)
def test_a_malformed_change_is_an_error(change: Any) -> None:
    """Bad types, an unknown op, a missing field: ContractError, for the feed to count and skip."""
    with pytest.raises(ContractError):
        parse_change(change)
