"""Every sample Envoy configuration is accepted by the real Envoy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e import harness

pytestmark = pytest.mark.e2e
CONFIGS = sorted((harness.ROOT / "envoy").glob("*.yaml"))  # envoy/istio/ holds Istio resources


def test_there_are_sample_configs() -> None:
    """The samples exist (so the parametrised test below cannot pass vacuously)."""
    assert harness.FRONT_PROXY in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_envoy_validates_the_sample(config: Path) -> None:
    """`envoy --mode validate` accepts it."""
    result = subprocess.run(
        [harness.tool("envoy"), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
