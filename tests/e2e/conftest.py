from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from authz_service import apikeys
from authz_service.registry.static_file import add_key
from tests.e2e import harness


@dataclass(frozen=True)
class Keys:
    path: Path
    acme: str  # client "acme", roles reader and writer
    plain: str  # client "plain", no roles
    disabled: str
    meter: str  # client "meter", used only by the telemetry tests, so counts are exact


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    acme = add_key(path, "acme", "Acme Corp", ("reader", "writer"))
    plain = add_key(path, "plain", "Plain Client")
    meter = add_key(path, "meter", "Metered Client")
    disabled = apikeys.generate()
    document = yaml.safe_load(path.read_text())
    document["keys"].append(
        {
            "sha256": apikeys.hash_key(disabled),
            "client_id": "gone",
            "client_name": "Gone",
            "enabled": False,
        }
    )
    path.write_text(yaml.safe_dump(document))
    return Keys(path, acme, plain, disabled, meter)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[harness.Service]:
    with harness.authz_service(tmp_path_factory.mktemp("authz"), keys.path) as running:
        yield running


@pytest.fixture(scope="module")
def upstream() -> Iterator[harness.Upstream]:
    with harness.echo_upstream() as running:
        yield running


@pytest.fixture(scope="module")
def front_proxy(
    tmp_path_factory: pytest.TempPathFactory, service: harness.Service, upstream: harness.Upstream
) -> Iterator[harness.Envoy]:
    config = harness.render_front_proxy(0, 0, service, upstream.port)
    with harness.envoy(tmp_path_factory.mktemp("envoy"), config) as running:
        yield running
