"""The snapshot registry answers from its copy and applies changes in order."""

from __future__ import annotations

import pytest

from authz_service import apikeys
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryError
from authz_service.registry.snapshot import SnapshotRegistry

IDENTITY = {"client_id": "c-1", "client_name": "One", "roles": ["r"], "status": "active"}


def credential(key: str) -> Credential:
    return Credential(key=key, key_hash=apikeys.hash_key(key))


def upsert(version: int, key: str, valid_until: str | None = None) -> dict[str, object]:
    return {
        "version": version,
        "op": "upsert",
        "key_hash": apikeys.hash_key(key),
        "entry": {
            "key_hash": apikeys.hash_key(key),
            "key_id": "k",
            "client": IDENTITY,
            "valid_until": valid_until,
        },
    }


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def loaded(clock: Clock | None = None) -> SnapshotRegistry:
    registry = SnapshotRegistry("http://registry", "t", 1.0, clock=clock or Clock())
    registry.version = 0  # as after loading an empty snapshot
    return registry


def test_before_the_first_snapshot_lookups_are_errors_not_refusals() -> None:
    """Not knowing is not 'unknown': the check gets 503 until the copy is loaded."""
    registry = SnapshotRegistry("http://registry", "t", 1.0)
    assert not registry.ready
    with pytest.raises(RegistryError):
        registry.lookup_now(credential("azk_a"))


def test_upserts_and_deletes_change_the_answer() -> None:
    """A key appears with its client, and disappears as unknown."""
    registry = loaded()
    registry.apply_change(upsert(1, "azk_a"))
    assert registry.lookup_now(credential("azk_a")) == Client("c-1", "One", ("r",))
    registry.apply_change(
        {"version": 2, "op": "delete", "key_hash": apikeys.hash_key("azk_a"), "client_id": "c-1"}
    )
    assert registry.lookup_now(credential("azk_a")) is Reason.UNKNOWN_KEY
    assert registry.version == 2


def test_changes_already_applied_are_skipped() -> None:
    """The feed and the delta poll can deliver the same change; the older one is ignored."""
    registry = loaded()
    registry.apply_change(
        {"version": 5, "op": "delete", "key_hash": apikeys.hash_key("azk_a"), "client_id": "c-1"}
    )
    registry.apply_change(upsert(4, "azk_a"))
    assert registry.lookup_now(credential("azk_a")) is Reason.UNKNOWN_KEY


def test_a_key_past_its_valid_until_is_refused_without_a_change() -> None:
    """A grace period ends on time even if no change event comes."""
    clock = Clock()
    registry = loaded(clock)
    registry.apply_change(upsert(1, "azk_old", valid_until="2030-01-01T00:00:00.000000Z"))
    clock.now = 1893456000.0 - 1
    assert isinstance(registry.lookup_now(credential("azk_old")), Client)
    clock.now += 1
    assert registry.lookup_now(credential("azk_old")) is Reason.KEY_REVOKED


def test_an_unknown_change_is_an_error() -> None:
    """Strict: an op the contract does not define is refused, not guessed."""
    with pytest.raises(ValueError, match="unknown change op"):
        loaded().apply_change({"version": 1, "op": "merge", "key_hash": "x"})
