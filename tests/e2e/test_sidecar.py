"""The sidecar sample through a real Envoy, with authz-service on a Unix socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import harness
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e
SIDECAR = harness.ROOT / "envoy" / "sidecar.yaml"


def render_sidecar(
    listener: int, admin: int, socket: Path, app: int, access_log_socket: Path
) -> dict[str, Any]:
    """The sample, unchanged except for its addresses."""
    config: dict[str, Any] = yaml.safe_load(SIDECAR.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    resources = config["static_resources"]
    resources["listeners"][0]["address"]["socket_address"].update(
        address="127.0.0.1", port_value=listener
    )
    for cluster in resources["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"
        ]
        if cluster["name"] == "authz":
            address["pipe"]["path"] = str(socket)
        elif cluster["name"] == "authz_access_log":
            address["pipe"]["path"] = str(access_log_socket)
        else:
            address["socket_address"]["port_value"] = app
    return config


def test_the_sidecar_checks_over_a_unix_socket(
    tmp_path: Path, keys: Keys, upstream: harness.Upstream
) -> None:
    """A valid key reaches the app with its identity; no key is 401; /healthz bypasses, with
    identity headers stripped, and a header name with an underscore is refused."""
    socket, access_log_socket = tmp_path / "authz.sock", tmp_path / "access-log.sock"
    with harness.authz_service(
        tmp_path,
        keys.path,
        grpc_address=f"unix:{socket}",
        access_log_address=f"unix:{access_log_socket}",
    ):
        config = render_sidecar(0, 0, socket, upstream.port, access_log_socket)
        with harness.envoy(tmp_path, config) as proxy:
            reply = harness.send(proxy.port, "/", [("Authorization", f"ApiKey {keys.acme}")])
            assert reply.status == 200
            assert upstream.values(-1, "x-client-id") == ["acme"]
            assert harness.send(proxy.port, "/").status == 401
            assert harness.send(proxy.port, "/healthz", [("x-client-id", "x")]).status == 200
            assert upstream.values(-1, "x-client-id") == []
            assert harness.send(proxy.port, "/healthz", [("x_client_id", "x")]).status == 400
