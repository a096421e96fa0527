"""The registry's README table and --help agree with its settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from client_registry.settings import ENV_PREFIX, RegistrySettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_documents_every_registry_setting_with_its_default() -> None:
    """One table row per setting, default included."""
    text = README.read_text()
    for name, field in RegistrySettings.__dataclass_fields__.items():
        shown = str(field.default) or "(none)"
        assert f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` |" in text, name


def test_help_lists_every_registry_setting() -> None:
    """`client-registry --help` names every variable."""
    result = subprocess.run(
        [sys.executable, "-m", "client_registry", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for name in RegistrySettings.__dataclass_fields__:
        assert ENV_PREFIX + name.upper() in result.stdout
