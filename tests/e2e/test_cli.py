"""The command line as users meet it: help, key creation, start-up errors that say what to fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from authz_service import apikeys
from authz_service.apikeys import key_id
from authz_service.registry.static_file import parse
from authz_service.settings import Settings, env_name

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Nothing a test starts binds the documented ports.
NO_PORTS = {
    "AUTHZ_HTTP_ADDRESS": "127.0.0.1:0",
    "AUTHZ_GRPC_ADDRESS": "127.0.0.1:0",
    "AUTHZ_ADMIN_ADDRESS": "",
    "AUTHZ_ACCESS_LOG_ADDRESS": "",
    "AUTHZ_HTTP_CHECK_ADDRESS": "",
}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "authz_service", *args], **env)


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )


def test_help_lists_every_setting() -> None:
    """`authz-service --help` and `serve --help` name every environment variable."""
    for args in (["--help"], ["serve", "--help"]):
        result = cli(*args)
        assert result.returncode == 0
        for name in Settings.__dataclass_fields__:
            assert env_name(name) in result.stdout


def test_the_readme_documents_every_setting_with_its_default() -> None:
    """The README's settings table and the code agree."""
    text = README.read_text()
    for name, field in Settings.__dataclass_fields__.items():
        default = field.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default) or "(none)"
        assert f"| `{env_name(name)}` | `{shown}` |" in text, name


def test_keys_add_prints_only_the_key_on_stdout(tmp_path: Path) -> None:
    """The key is the whole of stdout (scriptable); the file gets its hash only."""
    keys = tmp_path / "keys.yaml"
    result = cli(
        "keys",
        "add",
        "--client-id",
        "c-1",
        "--client-name",
        "One",
        "--roles",
        "a,b",
        "--file",
        str(keys),
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert apikeys.has_valid_checksum(key)
    assert "shown once" in result.stderr
    assert key not in keys.read_text()
    assert parse(keys.read_text(), "f")[apikeys.hash_key(key)].client.roles == ("a", "b")


def test_keys_add_uses_the_keys_file_setting(tmp_path: Path) -> None:
    """Without --file, AUTHZ_KEYS_FILE says where the key goes."""
    keys = tmp_path / "from-env.yaml"
    result = cli("keys", "add", "--client-id", "c", "--client-name", "C", AUTHZ_KEYS_FILE=str(keys))
    assert result.returncode == 0
    assert keys.exists()


def test_keys_add_refuses_an_invalid_client_id(tmp_path: Path) -> None:
    """A bad id is reported with the field; exit status 1."""
    result = cli(
        "keys",
        "add",
        "--client-id",
        "has space",
        "--client-name",
        "C",
        "--file",
        str(tmp_path / "k.yaml"),
    )
    assert result.returncode == 1
    assert "client_id" in result.stderr


def test_an_invalid_setting_stops_serve_with_its_name(tmp_path: Path) -> None:
    """Exit status 2 and a message naming the variable."""
    result = cli("serve", AUTHZ_CHECK_TIMEOUT="soon")
    assert result.returncode == 2
    assert "AUTHZ_CHECK_TIMEOUT (check_timeout)" in result.stderr


def test_a_missing_keys_file_stops_serve_with_a_hint(tmp_path: Path) -> None:
    """Exit status 1, naming the setting and the command that creates a key."""
    result = cli("serve", AUTHZ_KEYS_FILE=str(tmp_path / "none.yaml"), **NO_PORTS)
    assert result.returncode == 1
    assert "AUTHZ_KEYS_FILE" in result.stderr
    assert "keys add" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("--config", "{config}", "serve"), ("serve", "--config", "{config}")],
    ids=["before", "after"],
)
def test_config_is_read_before_and_after_the_command(tmp_path: Path, args: tuple[str, ...]) -> None:
    """`serve --config FILE` works as `--config FILE serve` does."""
    config = tmp_path / "config.yaml"
    config.write_text("check_timeout: soon\n")
    result = cli(*(arg.format(config=config) for arg in args))
    assert result.returncode == 2
    assert "AUTHZ_CHECK_TIMEOUT (check_timeout): must be a number of seconds" in result.stderr


def test_a_mistyped_variable_is_warned_about_at_start(tmp_path: Path) -> None:
    """The log names it and the setting it resembles, never its value."""
    result = cli(
        "serve",
        AUTHZ_KEYS_FILE=str(tmp_path / "none.yaml"),
        AUTHZ_CHEK_TIMEOUT="secret-looking-value",
        **NO_PORTS,
    )
    (line,) = [line for line in result.stderr.splitlines() if "unknown_setting" in line]
    assert '"variable": "AUTHZ_CHEK_TIMEOUT"' in line
    assert '"did_you_mean": "AUTHZ_CHECK_TIMEOUT"' in line
    assert "secret-looking-value" not in result.stderr


def test_keys_list_shows_key_ids_and_clients_but_never_full_hashes(tmp_path: Path) -> None:
    """One line per key, with its state; the hashes in the file appear only as key ids."""
    keys = tmp_path / "keys.yaml"
    first = cli("keys", "add", "--client-id", "c-1", "--client-name", "One", "--file", str(keys))
    cli(
        "keys",
        "add",
        "--client-id",
        "c-2",
        "--client-name",
        "Two",
        "--roles",
        "r",
        "--file",
        str(keys),
    )
    hashes = list(parse(keys.read_text(), "f"))
    result = cli("keys", "list", "--file", str(keys))
    assert result.returncode == 0
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "CLIENT", "STATE", "ROLES", "NAME"]
    assert [row.split() for row in rows] == [
        [key_id(hashes[0]), "c-1", "active", "-", "One"],
        [key_id(hashes[1]), "c-2", "active", "r", "Two"],
    ]
    assert key_id(apikeys.hash_key(first.stdout.strip())) in result.stdout
    assert not any(h in result.stdout for h in hashes)


def test_keys_revoke_disables_a_key_by_its_key_id(tmp_path: Path) -> None:
    """After revoke, list shows the key disabled."""
    keys = tmp_path / "keys.yaml"
    key = cli("keys", "add", "--client-id", "c", "--client-name", "C", "--file", str(keys)).stdout
    kid = key_id(apikeys.hash_key(key.strip()))
    result = cli("keys", "revoke", kid, "--file", str(keys))
    assert result.returncode == 0, result.stderr
    assert f"Revoked key {kid} of client 'c'" in result.stderr
    assert "disabled" in cli("keys", "list", "--file", str(keys)).stdout


def test_keys_rotate_prints_a_new_key_and_gives_the_old_one_an_expiry(tmp_path: Path) -> None:
    """--old-key-expires-in 24h leaves the old key working until then."""
    keys = tmp_path / "keys.yaml"
    old = cli("keys", "add", "--client-id", "c", "--client-name", "C", "--file", str(keys)).stdout
    result = cli(
        "keys", "rotate", "--client-id", "c", "--old-key-expires-in", "24h", "--file", str(keys)
    )
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert apikeys.has_valid_checksum(new)
    records = parse(keys.read_text(), "f")
    old_record, new_record = records[apikeys.hash_key(old.strip())], records[apikeys.hash_key(new)]
    assert new_record.client == old_record.client
    assert old_record.expires_at is not None
    assert new_record.expires_at is None
    assert "expire at" in result.stderr


def test_keys_rotate_refuses_a_duration_it_cannot_read(tmp_path: Path) -> None:
    """A usage error (exit 2) that shows what to write."""
    result = cli("keys", "rotate", "--client-id", "c", "--old-key-expires-in", "tomorrow")
    assert result.returncode == 2
    assert "expected seconds, or a number with s, m, h or d" in result.stderr


@pytest.mark.parametrize(
    "script",
    [
        ROOT / "scripts" / "dev_stack.py",
        *sorted((ROOT / "benchmarks").glob("*_bench.py")),
    ],
    ids=lambda path: path.name,
)
def test_script_help_describes_the_script_in_a_whole_sentence(script: Path) -> None:
    """The description under `usage:` ends with a full stop, not mid-sentence."""
    result = run([sys.executable, str(script), "--help"])
    assert result.returncode == 0, result.stderr
    description = result.stdout.split("\n\n")[1]
    assert re.fullmatch(r"[A-Z][^\n]*(\n[^\n]+)*\.", description), description
