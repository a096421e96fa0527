"""The static keys file: strict validation, lookups by hash, hot reload that keeps the last good
version, and `keys add` that stores only hashes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml

from authz_service import apikeys
from authz_service.apikeys import key_id
from authz_service.model import ApiKey, Client, Credential, RateLimit
from authz_service.reasons import Reason
from authz_service.registry.static_file import (
    KeysFileError,
    StaticFileRegistry,
    add_key,
    parse,
    parse_with_warnings,
    revoke_key,
    rotate_key,
)
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

    def test_a_client_may_carry_a_rate_limit(self) -> None:
        """The registry's shape: requests_per_unit and a unit; every key of the client has it."""
        limit = {"requests_per_unit": 100, "unit": "minute"}
        records = parse(
            document(entry(rate_limit=limit), entry(sha256="b" * 64, rate_limit=limit)), "f"
        )
        assert {r.client.rate_limit for r in records.values()} == {RateLimit(100, "minute")}
        assert parse(document(entry()), "f")[HASH].client.rate_limit is None

    def test_an_empty_file_has_no_keys(self) -> None:
        """An empty file is valid and denies everything."""
        assert parse("", "f") == {}

    @pytest.mark.parametrize(
        ("text", "warning"),
        [
            ("", "f: no keys, so every check is denied unknown_key"),
            ("version: 1\nkeys: []", "f: no keys, so every check is denied unknown_key"),
            ("keys:\n- {sha256: " + HASH + ", client_id: c, client_name: n}", "f: no 'version: 1'"),
        ],
    )
    def test_an_empty_or_version_less_file_gets_a_warning(self, text: str, warning: str) -> None:
        """Valid, but probably not what was meant: the warning says why."""
        _, warnings = parse_with_warnings(text, "f")
        assert len(warnings) == 1
        assert warnings[0].startswith(warning)

    def test_a_complete_file_gets_no_warning(self) -> None:
        """A file with a version and keys is read silently."""
        assert parse_with_warnings(document(entry()), "f")[1] == []

    def test_parse_logs_the_warnings(self, caplog: pytest.LogCaptureFixture) -> None:
        """The server's loader calls parse, so the warning reaches its log."""
        with caplog.at_level(logging.WARNING):
            parse("", "keys.yaml")
        (record,) = caplog.records
        assert record.fields["event"] == "keys_file_warning"  # type: ignore[attr-defined]
        assert "no keys" in record.fields["warning"]  # type: ignore[attr-defined]

    def test_a_yaml_error_says_where_but_never_quotes_the_line(self) -> None:
        """PyYAML quotes the offending line, which may hold a key pasted in by mistake."""
        key = apikeys.generate()
        with pytest.raises(KeysFileError) as error:
            parse(f"keys:\n- sha256: {key}: oops\n", "f")
        assert str(error.value) == "f: not valid YAML: mapping values are not allowed here " + (
            f"(line 2, column {len(key) + 11})"
        )

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (apikeys.generate(), "this looks like a key, not its hash (value not shown)"),
            ("not-a-hash-at-all", "this looks like a key, not its hash (value not shown)"),
            ("sha256:" + HASH, "write the hash without its 'sha256:' prefix"),
            (HASH.upper(), "write the hash in lower case"),
            ("abc123", "expected the 64 hex characters of a SHA-256, got 6 (value not shown)"),
        ],
    )
    def test_a_bad_hash_is_never_repeated_in_the_error(self, value: str, message: str) -> None:
        """A key pasted where its hash belongs is redacted, and the error says what it is."""
        with pytest.raises(KeysFileError) as error:
            parse(document(entry(sha256=value)), "f")
        assert str(error.value).startswith(f"f: keys[0].sha256: {message}")
        assert value not in str(error.value)

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
            (document(entry(sha256="ABC")), "f: keys[0].sha256: expected the 64 hex"),
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
            (
                document(entry(rate_limit={"requests_per_unit": 0, "unit": "second"})),
                "f: keys[0].rate_limit: expected {requests_per_unit: 1-1000000000, "
                "unit: second|minute|hour|day}",
            ),
            (
                document(entry(rate_limit={"requests_per_unit": 5, "unit": "week"})),
                "f: keys[0].rate_limit: expected",
            ),
            (document(entry(rate_limit="5/second")), "f: keys[0].rate_limit: expected"),
            (
                document(
                    entry(rate_limit={"requests_per_unit": 5, "unit": "second"}),
                    entry(sha256="b" * 64),
                ),
                "f: keys[1].rate_limit: client 'c-1' has 5/second in keys[0]",
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

    def test_another_key_of_a_rate_limited_client_gets_its_limit(self, tmp_path: Path) -> None:
        """The limit is the client's, not the key's."""
        path = tmp_path / "keys.yaml"
        add_key(path, "c-1", "One", rate_limit=RateLimit(5, "second"))
        second = add_key(path, "c-1", "One")
        client = parse(path.read_text(), "f")[apikeys.hash_key(second)].client
        assert client.rate_limit == RateLimit(5, "second")

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


def client_keys(path: Path, client_id: str) -> dict[str, object]:
    """The state of each of a client's entries, by key id."""
    entries = yaml.safe_load(path.read_text())["keys"]
    return {
        key_id(e["sha256"]): (e["enabled"], e.get("expires_at"))
        for e in entries
        if e["client_id"] == client_id
    }


class TestRevokeKey:
    def test_a_key_is_disabled_by_its_key_id_and_stays_listed(self, tmp_path: Path) -> None:
        """Its entry says enabled: false; the client's other keys and clients are untouched."""
        path = tmp_path / "keys.yaml"
        first = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        second = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        assert revoke_key(path, first) == (first, "c-1", True)
        assert client_keys(path, "c-1") == {first: (False, None), second: (True, None)}

    def test_revoking_twice_says_so_and_changes_nothing(self, tmp_path: Path) -> None:
        """The second revoke reports that the key was already disabled."""
        path = tmp_path / "keys.yaml"
        kid = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        revoke_key(path, kid)
        assert revoke_key(path, kid) == (kid, "c-1", False)

    def test_a_unique_start_of_the_key_id_is_enough(self, tmp_path: Path) -> None:
        """Six hex characters name a key when no other key starts with them."""
        path = tmp_path / "keys.yaml"
        kid = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        assert revoke_key(path, kid[:6].upper())[0] == kid

    @pytest.mark.parametrize(
        ("argument", "message"),
        [
            ("0" * 12, "no key id starts with '000000000000'"),
            ("abc", "at least 6 hex characters"),
        ],
    )
    def test_an_unknown_or_too_short_key_id_is_refused(
        self, tmp_path: Path, argument: str, message: str
    ) -> None:
        """Nothing is written when the key id names no key."""
        path = tmp_path / "keys.yaml"
        add_key(path, "c-1", "One")
        before = path.read_text()
        with pytest.raises(KeysFileError, match=message):
            revoke_key(path, argument)
        assert path.read_text() == before

    def test_a_key_given_instead_of_its_id_is_not_repeated(self, tmp_path: Path) -> None:
        """Pasting the key itself gets an error that does not echo it."""
        path = tmp_path / "keys.yaml"
        key = add_key(path, "c-1", "One")
        with pytest.raises(KeysFileError) as error:
            revoke_key(path, key)
        assert "this looks like a key, not a key id" in str(error.value)
        assert key not in str(error.value)

    def test_a_missing_file_is_an_error(self, tmp_path: Path) -> None:
        """Revoke never creates a keys file."""
        with pytest.raises(KeysFileError, match="keys file not found"):
            revoke_key(tmp_path / "none.yaml", "a" * 12)
        assert not (tmp_path / "none.yaml").exists()


class TestRotateKey:
    def test_the_old_keys_stop_at_once_without_an_expiry(self, tmp_path: Path) -> None:
        """The new key has the client's name and roles; the old ones are disabled."""
        path = tmp_path / "keys.yaml"
        old = key_id(apikeys.hash_key(add_key(path, "c-1", "One", ("reader",))))
        new_key, retired = rotate_key(path, "c-1", now=1000.0)
        new = key_id(apikeys.hash_key(new_key))
        assert retired == [old]
        assert client_keys(path, "c-1") == {old: (False, None), new: (True, None)}
        records = parse(path.read_text(), "f")
        assert records[apikeys.hash_key(new_key)].client == Client("c-1", "One", ("reader",))

    def test_the_new_key_keeps_the_clients_rate_limit(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.yaml"
        add_key(path, "c-1", "One", rate_limit=RateLimit(5, "second"))
        new_key, _ = rotate_key(path, "c-1", now=1000.0)
        client = parse(path.read_text(), "f")[apikeys.hash_key(new_key)].client
        assert client.rate_limit == RateLimit(5, "second")

    def test_the_old_keys_may_keep_working_until_an_expiry(self, tmp_path: Path) -> None:
        """With an expiry the old keys stay enabled and get expires_at, in UTC."""
        path = tmp_path / "keys.yaml"
        old_key = add_key(path, "c-1", "One")
        old = key_id(apikeys.hash_key(old_key))
        _, retired = rotate_key(path, "c-1", old_keys_expire_at=1893456000.0, now=1000.0)
        assert retired == [old]
        assert client_keys(path, "c-1")[old] == (True, "2030-01-01T00:00:00Z")
        assert parse(path.read_text(), "f")[apikeys.hash_key(old_key)].expires_at == 1893456000.0

    def test_an_earlier_expiry_is_kept(self, tmp_path: Path) -> None:
        """Rotation never extends the life of an old key."""
        path = tmp_path / "keys.yaml"
        first = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        second = key_id(apikeys.hash_key(rotate_key(path, "c-1", 2000.0, now=1000.0)[0]))
        _, retired = rotate_key(path, "c-1", old_keys_expire_at=5000.0, now=1500.0)
        assert retired == [first, second]
        assert client_keys(path, "c-1")[first] == (True, "1970-01-01T00:33:20Z")
        assert client_keys(path, "c-1")[second] == (True, "1970-01-01T01:23:20Z")

    def test_disabled_expired_and_other_clients_keys_are_left_alone(self, tmp_path: Path) -> None:
        """Only the client's usable keys are retired."""
        path = tmp_path / "keys.yaml"
        off = key_id(apikeys.hash_key(add_key(path, "c-1", "One")))
        revoke_key(path, off)
        other = key_id(apikeys.hash_key(add_key(path, "c-2", "Two")))
        _, retired = rotate_key(path, "c-1", now=1000.0)
        assert retired == []
        assert client_keys(path, "c-2") == {other: (True, None)}

    def test_an_unknown_client_is_refused(self, tmp_path: Path) -> None:
        """Rotate needs the client's name and roles from an existing entry."""
        path = tmp_path / "keys.yaml"
        add_key(path, "c-1", "One")
        with pytest.raises(KeysFileError, match="no key for client 'c-9'"):
            rotate_key(path, "c-9")

    def test_editing_a_version_less_file_adds_the_version(self, tmp_path: Path) -> None:
        """Every command writes the canonical form."""
        path = tmp_path / "keys.yaml"
        path.write_text("keys:\n- {sha256: " + HASH + ", client_id: c-1, client_name: One}\n")
        rotate_key(path, "c-1")
        assert parse_with_warnings(path.read_text(), "f")[1] == []
