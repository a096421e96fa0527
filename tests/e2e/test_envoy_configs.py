"""Every sample Envoy configuration is accepted by the real Envoy."""

from __future__ import annotations

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
    result = harness.envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
