"""SIGTERM under load: every check in flight gets its decision, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from authz_service import apikeys
from tests.robustness.conftest import Checks, decisions, in_front_of
from tests.robustness.faulty_registry import FaultyRegistry

pytestmark = pytest.mark.e2e

VALID, UNKNOWN = 30, 10


async def test_every_check_in_flight_at_sigterm_gets_its_decision(
    tmp_path: Path, registry: FaultyRegistry
) -> None:
    """Forty checks wait for the registry when SIGTERM arrives; once the registry answers,
    each gets its own decision (no gRPC error, none dropped), each is logged once, and the
    process exits 0."""
    keys = [await registry.add_key(f"shutdown-{n}") for n in range(VALID)]
    unknown = [apikeys.generate() for _ in range(UNKNOWN)]
    with in_front_of(
        tmp_path, registry, grpc_workers="64", registry_timeout="4", check_timeout="5"
    ) as service:
        await registry.faults(verify="hold")
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            checks = Checks(channel)
            in_flight = [asyncio.create_task(checks.check(key)) for key in keys + unknown]
            await registry.wait_for(lambda s: s["held"] == VALID + UNKNOWN, "every lookup held")
            service.process.send_signal(signal.SIGTERM)
            await _until(lambda: '"event": "shutdown"' in service.logs(), "the shutdown line")
            await registry.release()
            replies = await asyncio.gather(*in_flight)
        code = await asyncio.to_thread(service.process.wait, 15)
        assert code == 0
    assert [r.status.code for r in replies[:VALID]] == [0] * VALID
    assert {r.status.message for r in replies[VALID:]} == {"unknown_key"}
    logged = [d["request_id"] for d in decisions(service) if d["request_id"] in checks.request_ids]
    assert sorted(logged) == sorted(checks.request_ids)


async def _until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"no {what} within {within}s"
        await asyncio.sleep(0.01)
