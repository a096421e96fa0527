"""The static keys file: strict validation, lookups by hash, hot reload that keeps the last good
version, and `keys add` that stores only hashes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml

from authz_service import apikeys
from authz_service.model import ApiKey, Client, Credential
from authz_service.reasons import Reason
from authz_service.registry.static_file import KeysFileError, StaticFileRegistry, add_key, parse
from tests.fakes import wait_for

HASH = "a" * 64


def credential(key: str) -> Credential:
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, digest[:6].hex())


def entry(**overrides: object) -> dict[str, object]:
    return {"sha256": HASH, "client_id": "c-1", "client_name": "One", **overrides}


def document(*entries: dict[str, object]) -> str:
    return yaml.safe_dump({"version": 1, "keys": list(entries)})


class TestParse:
    def test_a_valid_file_maps_hashes_to_clients(self) -> None:
        """Roles keep their order and lose duplicates; enabled defaults to true."""
        records = parse(document(entry(roles=["b", "a", "b"])), "f")
        record = records[HASH]
        assert record.client == Client(client_id="c-1", name="One", roles=("b", "a"))
        assert record.enabled
        assert record.expires_at is None

    def test_an_empty_file_has_no_keys(self) -> None:
        """An empty file is valid and denies everything."""
        assert parse("", "f") == {}

    def test_expiry_accepts_iso_timestamps_and_treats_naive_ones_as_utc(self) -> None:
        """Both YAML timestamps and quoted strings work."""
        aware = parse(document(entry(expires_at="2030-01-01T00:00:00+00:00")), "f")[HASH]
        naive = parse(
            "keys:\n- {sha256: " + HASH + ", client_id: c, client_name: n, "
            "expires_at: 2030-01-01 00:00:00}\n",
            "f",
        )[HASH]
        assert aware.expires_at == naive.expires_at == 1893456000.0

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("keys: [", "f: not valid YAML"),
            ("- a", "f: expected a mapping"),
            ("version: 2", "f: version: only version 1"),
            ("colour: red", "f: unknown top-level field 'colour'"),
            ("keys: {}", "f: keys: expected a list"),
            (document("x"), "f: keys[0]: expected a mapping"),  # type: ignore[arg-type]
            (document(entry(sha256="ABC")), "f: keys[0].sha256: 'ABC' does not match"),
            (document(entry(sha256=None)), "f: keys[0].sha256: required"),
            (document(entry(client_id="")), "f: keys[0].client_id: required"),
            (document(entry(client_id="a b")), "f: keys[0].client_id: 'a b' does not match"),
            (document(entry(client_name="x\ny")), "f: keys[0].client_name: at most 200"),
            (document(entry(roles="admin")), "f: keys[0].roles: expected a list"),
            (document(entry(roles=["a b"])), "f: keys[0].roles: 'a b' does not match"),
            (document(entry(enabled="yes")), "f: keys[0].enabled: expected true or false"),
            (document(entry(expires_at="soon")), "f: keys[0].expires_at: expected an ISO 8601"),
            (document(entry(key="plain")), "f: keys[0].key: unknown field"),
            (document(entry(), entry()), "f: keys[1].sha256: the same key hash appears twice"),
            (
                document(entry(), entry(sha256="b" * 64, client_name="Other")),
                "f: keys[1].client_name: client 'c-1' is named 'One' in keys[0]",
            ),
        ],
    )
    def test_errors_name_the_file_entry_and_field(self, text: str, message: str) -> None:
        """Every validation error points at what to fix."""
        with pytest.raises(KeysFileError) as error:
            parse(text, "f")
        assert str(error.value).startswith(message)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def started(
    path: Path, clock: Clock | None = None, interval: float = 0.0
) -> StaticFileRegistry:
    registry = StaticFileRegistry(path, interval, clock or Clock(0.0))
    await registry.start()
    return registry


class TestLookup:
    async def test_known_unknown_disabled_and_expired_keys(self, tmp_path: Path) -> None:
        """Each key state maps to a client or to its own reason."""
        path = tmp_path / "keys.yaml"
        path.write_text(
            document(
                entry(sha256=apikeys.hash_key("good")),
                entry(sha256=apikeys.hash_key("off"), enabled=False),
                entry(sha256=apikeys.hash_key("old"), expires_at="2030-01-01T00:00:00Z"),
            )
        )
        clock = Clock(1893456000.0 - 1)
        registry = await started(path, clock)
        assert registry.lookup(credential("good")) == Client("c-1", "One")
        assert registry.lookup(credential("nope")) == Reason.UNKNOWN_KEY
        assert registry.lookup(credential("off")) == Reason.KEY_DISABLED
        assert registry.lookup(credential("old")) == Client("c-1", "One")
        clock.now += 1
        assert registry.lookup(credential("old")) == Reason.KEY_EXPIRED

    async def test_a_missing_file_is_a_startup_error_that_says_how_to_fix_it(
        self, tmp_path: Path
    ) -> None:
        """Starting without a keys file fails loudly, naming the setting."""
        registry = StaticFileRegistry(tmp_path / "none.yaml", 0)
        with pytest.raises(KeysFileError, match=r"AUTHZ_KEYS_FILE.*keys add"):
            await registry.start()
        assert not registry.ready

    async def test_an_invalid_file_is_a_startup_error(self, tmp_path: Path) -> None:
        """A broken file at start is never served as an empty one."""
        path = tmp_path / "keys.yaml"
        path.write_text("keys: [")
        with pytest.raises(KeysFileError, match="not valid YAML"):
            await started(path)


class TestReload:
    async def test_a_changed_file_is_picked_up_without_a_restart(self, tmp_path: Path) -> None:
        """A key added to the file works after the next poll; a removed one stops working."""
        path = tmp_path / "keys.yaml"
        path.write_text(document(entry(sha256=apikeys.hash_key("first"))))
        registry = await started(path, interval=0.02)
        try:
            path.write_text(document(entry(sha256=apikeys.hash_key("second"))))
            await wait_for(lambda: isinstance(registry.lookup(credential("second")), Client))
            assert registry.lookup(credential("first")) == Reason.UNKNOWN_KEY
        finally:
            await registry.close()

    async def test_an_invalid_change_keeps_the_last_good_version(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A broken edit is logged once and the previous keys keep working."""
        path = tmp_path / "keys.yaml"
        path.write_text(document(entry(sha256=apikeys.hash_key("first"))))
        registry = await started(path, interval=0.02)
        try:
            with caplog.at_level(logging.ERROR):
                path.write_text("keys: [")
                await wait_for(lambda: "keeping the last good version" in caplog.text)
                await asyncio.sleep(0.1)
            assert caplog.text.count("keeping the last good version") == 1
            assert registry.lookup(credential("first")) == Client("c-1", "One")
            path.write_text(document(entry(sha256=apikeys.hash_key("fixed"))))
            await wait_for(lambda: isinstance(registry.lookup(credential("fixed")), Client))
        finally:
            await registry.close()


class TestAddKey:
    def test_a_new_key_is_returned_once_and_only_its_hash_is_stored(self, tmp_path: Path) -> None:
        """The file is created if missing and never contains the key."""
        path = tmp_path / "sub" / "keys.yaml"
        key = add_key(path, "c-1", "One", ("reader",))
        text = path.read_text()
        assert key not in text
        assert apikeys.has_valid_checksum(key)
        record = parse(text, "f")[apikeys.hash_key(key)]
        assert record.client == Client("c-1", "One", ("reader",))

    def test_keys_are_appended_to_an_existing_file(self, tmp_path: Path) -> None:
        """A second key for the same client keeps the first one valid (rotation)."""
        path = tmp_path / "keys.yaml"
        first = add_key(path, "c-1", "One")
        second = add_key(path, "c-1", "One")
        assert set(parse(path.read_text(), "f")) == {
            apikeys.hash_key(first),
            apikeys.hash_key(second),
        }

    def test_an_invalid_entry_is_refused_and_nothing_is_written(self, tmp_path: Path) -> None:
        """A bad client id leaves the file as it was."""
        path = tmp_path / "keys.yaml"
        add_key(path, "c-1", "One")
        before = path.read_text()
        with pytest.raises(KeysFileError, match="client_id"):
            add_key(path, "bad id", "Two")
        assert path.read_text() == before

    def test_an_invalid_existing_file_is_not_extended(self, tmp_path: Path) -> None:
        """`keys add` refuses to build on a broken file."""
        path = tmp_path / "keys.yaml"
        path.write_text("keys: [")
        with pytest.raises(KeysFileError):
            add_key(path, "c-1", "One")
        assert path.read_text() == "keys: ["
