"""Snapshot mode at CI size, end to end: a real authz-service loads a streamed snapshot of
2,000 keys from a stand-in registry, reloads it when the registry's change log is pruned, and
keeps its copy when a reload fails. benchmarks/memory_bench.py runs the same at 1M keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from tests.e2e import harness
from tests.e2e.stand_in_registry import TOKEN, Snapshot, key, stand_in_registry, write_entries

pytestmark = pytest.mark.e2e

KEYS = 2_000
SAMPLE = range(0, KEYS, 97)  # keys spread over the whole snapshot


def check(service: harness.Service, api_key: str) -> CheckResponse:
    """One Check, as Envoy would send it, straight to the replica's gRPC port."""
    http = AttributeContext.HttpRequest(
        method="GET", host="api", path="/", headers={"authorization": f"ApiKey {api_key}"}
    )
    request = CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))
    with grpc.insecure_channel(service.grpc_target) as channel:
        call: Any = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=CheckRequest.SerializeToString,
            response_deserializer=CheckResponse.FromString,
        )
        reply: CheckResponse = call(request, timeout=5)
        return reply


def outcomes(service: harness.Service, indices: range | list[int]) -> set[str]:
    """The distinct outcomes of checking these keys: "allowed", or the deny reason."""
    replies = (check(service, key(index)).status for index in indices)
    return {"allowed" if status.code == 0 else status.message for status in replies}


def test_a_streamed_snapshot_is_served_reloaded_whole_and_kept_when_a_reload_fails(
    tmp_path: Path,
) -> None:
    """Every key of the snapshot is allowed and others are unknown; a reload in which every
    key changed takes effect whole; a reload cut short is refused and the copy stays."""
    first, rotated = tmp_path / "first.ndjson", tmp_path / "rotated.ndjson"
    write_entries(first, 0, KEYS)
    write_entries(rotated, KEYS, KEYS)
    with stand_in_registry() as registry:
        registry.publish(Snapshot(1, first, KEYS))
        with harness.authz_service(
            tmp_path, registry="snapshot", registry_url=registry.url, registry_token=TOKEN
        ) as service:
            assert outcomes(service, SAMPLE) == {"allowed"}
            assert outcomes(service, [2 * KEYS, 3 * KEYS]) == {"unknown_key"}

            registry.publish(Snapshot(2, rotated, KEYS))
            harness.wait_until(lambda: '"version": 2' in loaded(service), 10, "the reload")
            assert outcomes(service, [KEYS + index for index in SAMPLE]) == {"allowed"}
            assert outcomes(service, SAMPLE) == {"unknown_key"}

            registry.publish(Snapshot(3, first, KEYS, cut_short=True))
            harness.wait_until(
                lambda: "feed_resync_failed" in service.logs(), 10, "the failed reload"
            )
            assert outcomes(service, [KEYS + index for index in SAMPLE]) == {"allowed"}
            assert outcomes(service, SAMPLE) == {"unknown_key"}
            assert '"version": 3' not in loaded(service)


def loaded(service: harness.Service) -> str:
    """The service's snapshot_loaded log lines."""
    return "\n".join(line for line in service.logs().splitlines() if "snapshot_loaded" in line)


def test_the_memory_benchmark_runs_its_service_scenario_at_ci_size() -> None:
    """The 1M-key benchmark's end-to-end scenario runs, and verifies its checks, at 2,000."""
    result = subprocess.run(
        [
            sys.executable,
            str(harness.ROOT / "benchmarks" / "memory_bench.py"),
            *("--sizes", str(KEYS), "--scenarios", "service", "--checks", "200", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["service"][0]
    assert [load["keys"] for load in row["load_log"]] == [KEYS, KEYS, KEYS]
    assert row["steady_mib"] > 0
    assert row["cpu_per_check"]["ratio"] > 0
