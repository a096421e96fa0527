"""`client-registry clients` finds its admin token in the documented order, says where it looked
when there is none, and never writes a credential."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_service import __version__
from tests.e2e.harness import RegistryProcess, free_port, registry_process

pytestmark = pytest.mark.e2e


def clients(
    cwd: Path, *args: str, url: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`client-registry clients [--url URL] ARGS` in ``cwd``, with no REGISTRY_ variable but
    those given."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("REGISTRY_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "client_registry",
            "clients",
            *(["--url", url] if url else []),
            *args,
        ],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path_factory.mktemp("registry")) as running:
        yield running


def test_without_a_token_it_says_where_it_looked_and_writes_nothing(tmp_path: Path) -> None:
    """Exit 2 naming --token-file, REGISTRY_ADMIN_TOKEN and the tokens file; no file appears,
    and the registry (unreachable here) is never called."""
    result = clients(tmp_path, "list", url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "--token-file is not given" in result.stderr
    assert "REGISTRY_ADMIN_TOKEN is not set" in result.stderr
    assert f"no tokens file {tmp_path.resolve() / 'registry-tokens.json'}" in result.stderr
    assert "cannot reach" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_tokens_file_where_serve_runs_is_found(registry: RegistryProcess) -> None:
    """Run beside `client-registry serve`, nothing needs to be said."""
    result = clients(registry.workdir, "list", url=registry.url)
    assert result.returncode == 0, result.stderr
    assert "clients" in json.loads(result.stdout)


def test_registry_tokens_file_names_the_tokens_file(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """REGISTRY_TOKENS_FILE points elsewhere, as it does for serve."""
    tokens = str(registry.workdir / "registry-tokens.json")
    result = clients(tmp_path, "list", url=registry.url, REGISTRY_TOKENS_FILE=tokens)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("form", ["tokens file", "bare token"])
def test_token_file_takes_the_tokens_file_or_a_bare_token(
    tmp_path: Path, registry: RegistryProcess, form: str
) -> None:
    """--token-file reads the registry's JSON tokens file, or a file holding the token alone
    (a mounted secret)."""
    token_file = registry.workdir / "registry-tokens.json"
    if form == "bare token":
        token_file = tmp_path / "admin-token"
        token_file.write_text(registry.admin_token() + "\n")
    result = clients(tmp_path, "--token-file", str(token_file), "list", url=registry.url)
    assert result.returncode == 0, result.stderr


def test_token_file_comes_before_the_environment(tmp_path: Path, registry: RegistryProcess) -> None:
    """A wrong REGISTRY_ADMIN_TOKEN does not matter when --token-file is given."""
    result = clients(
        tmp_path,
        "--token-file",
        str(registry.workdir / "registry-tokens.json"),
        "list",
        url=registry.url,
        REGISTRY_ADMIN_TOKEN="wrong-token-0123456789abcdef",
    )
    assert result.returncode == 0, result.stderr


def test_admin_token_in_a_config_file_given_after_the_command_counts(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """`clients --config FILE` reads admin_token from the file, as REGISTRY_ADMIN_TOKEN."""
    config = tmp_path / "registry.yaml"
    config.write_text(f"admin_token: {registry.admin_token()}\n")
    result = clients(tmp_path, "--config", str(config), "list", url=registry.url)
    assert result.returncode == 0, result.stderr


def test_a_refused_token_is_reported_with_where_it_came_from(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A 403 names the source of the token that the registry refused."""
    result = clients(
        tmp_path, "list", url=registry.url, REGISTRY_ADMIN_TOKEN="wrong-token-0123456789abcdef"
    )
    assert result.returncode == 1
    assert f"{registry.url} refused the admin token from REGISTRY_ADMIN_TOKEN" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_registry_variable_is_warned_about(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """REGISTRY_ typos get "did you mean"; REGISTRY_URL is the command's own variable."""
    result = clients(
        registry.workdir, "list", REGISTRY_URL=registry.url, REGISTRY_ADMN_TOKEN="x" * 24
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: REGISTRY_ADMN_TOKEN is not a setting and is ignored "
        "(did you mean REGISTRY_ADMIN_TOKEN?)" in result.stderr
    )
    assert "REGISTRY_URL" not in result.stderr


def test_version_is_printed() -> None:
    """`client-registry --version` prints the package version."""
    result = subprocess.run(
        [sys.executable, "-m", "client_registry", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == f"client-registry {__version__}"
