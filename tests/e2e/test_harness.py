"""The process helpers themselves: ports are bound by the processes, and a process that dies
fails its wait at once, saying why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Keys

pytestmark = pytest.mark.e2e


def test_a_service_that_cannot_start_fails_at_once_with_the_end_of_its_log(
    tmp_path: Path, keys: Keys
) -> None:
    """An invalid setting ends the process; the error carries the service's own message."""
    with (
        pytest.raises(harness.ProcessExitedError, match=r"AUTHZ_CHECK_TIMEOUT"),
        harness.authz_service(tmp_path, keys.path, check_timeout="0"),
    ):
        pass


def test_a_registry_whose_port_is_taken_fails_at_once_with_the_end_of_its_log(
    tmp_path: Path,
) -> None:
    """The race free_port() callers can lose ends in a clear error, not a 30 s wait."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(harness.ProcessExitedError, match=r"client-registry exited"),
            harness.registry_process(tmp_path, port=port),
        ):
            pass


def test_an_envoy_that_refuses_its_config_fails_at_once_with_the_end_of_its_log(
    tmp_path: Path, service: harness.Service, upstream: harness.Upstream
) -> None:
    config = harness.render_front_proxy(0, 0, service, upstream.port)
    config["static_resources"]["clusters"][0]["type"] = "NO_SUCH_TYPE"
    with (
        pytest.raises(harness.ProcessExitedError, match=r"NO_SUCH_TYPE"),
        harness.envoy(tmp_path, config),
    ):
        pass


def test_every_port_is_the_one_the_process_bound(
    service: harness.Service, front_proxy: harness.Envoy
) -> None:
    """Ports come from the "serving" line and Envoy's admin API, and each one answers."""
    assert harness.send(service.http_port, "/readyz").status == 200
    assert "grpc.health.v1.Health" in harness.grpcurl(service.grpc_target, "list")
    assert "authz_service.admin.v1.Admin" in harness.grpcurl(service.admin_target, "list")
    assert harness.send(front_proxy.admin_port, "/ready").body == b"LIVE\n"
    assert harness.send(front_proxy.port, "/healthz").status == 200
