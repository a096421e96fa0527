"""The command line as users meet it: help, key creation, start-up errors that say what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz_service import apikeys
from authz_service.registry.static_file import parse
from authz_service.settings import Settings, env_name

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz_service", *args],
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
    result = cli(
        "serve",
        AUTHZ_KEYS_FILE=str(tmp_path / "none.yaml"),
        AUTHZ_HTTP_ADDRESS="127.0.0.1:0",
        AUTHZ_GRPC_ADDRESS="127.0.0.1:0",
        AUTHZ_ADMIN_ADDRESS="",
        AUTHZ_ACCESS_LOG_ADDRESS="",
    )
    assert result.returncode == 1
    assert "AUTHZ_KEYS_FILE" in result.stderr
    assert "keys add" in result.stderr
