"""authz-service's http registry backend against the real registry over HTTP, and against a
registry that misbehaves: every failure is a denial, and a dead registry trips the breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from authz_service import apikeys
from authz_service.breaker import CircuitBreaker
from authz_service.health import Health
from authz_service.model import ApiKey, Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryBusyError, RegistryError
from authz_service.registry.http import HttpRegistry
from tests.registry.conftest import SERVICE, Registry

pytestmark = pytest.mark.e2e


def credential(key: str) -> Credential:
    digest = apikeys.digest(key)
    return Credential(ApiKey(key), digest, digest[:6].hex())


def backend(
    base: str,
    *,
    token: str = SERVICE,
    failures: int = 3,
    timeout: float = 1.0,
    max_in_flight: int = 10,
    breaker: CircuitBreaker | None = None,
    health: Health | None = None,
) -> HttpRegistry:
    return HttpRegistry(
        base,
        token,
        timeout=timeout,
        max_in_flight=max_in_flight,
        breaker=breaker or CircuitBreaker(failures, cooldown=60),
        health=health or Health(),
    )


@pytest.fixture
async def client_of(registry: Registry) -> AsyncIterator[HttpRegistry]:
    http = backend(registry.base)
    await http.start()
    yield http
    await http.close()


async def test_registry_answers_become_clients_and_reasons(
    registry: Registry, client_of: HttpRegistry
) -> None:
    """Valid, unknown, revoked and suspended keys, as the real registry answers them."""
    valid = await registry.create("Valid", ["reader"])
    revoked = await registry.create("Revoked")
    suspended = await registry.create("Suspended")
    await registry.call("DELETE", f"/clients/{revoked['client_id']}/api-key")
    await registry.call("PATCH", f"/clients/{suspended['client_id']}", json={"status": "suspended"})
    answer = await client_of.verify(credential(valid["api_key"]))
    assert answer.result == Client(valid["client_id"], "Valid", ("reader",))
    for key, reason in [
        (apikeys.generate(), Reason.UNKNOWN_KEY),
        (revoked["api_key"], Reason.KEY_REVOKED),
        (suspended["api_key"], Reason.CLIENT_SUSPENDED),
    ]:
        assert (await client_of.verify(credential(key))).result is reason


async def test_a_wrong_service_token_is_an_error_reported_as_a_configuration_problem(
    registry: Registry,
) -> None:
    """403 from the registry is a failure to get an answer, not a verdict, and it says plainly
    which setting is wrong until the registry accepts the token."""
    health = Health()
    http = backend(registry.base, token="wrong-token-0123456789abcdef", health=health)
    await http.start()
    try:
        with pytest.raises(RegistryError):
            await http.verify(credential(apikeys.generate()))
        assert "AUTHZ_REGISTRY_TOKEN" in health.problems["registry"]
        assert http.outcomes["token_rejected"] == 1
    finally:
        await http.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def misbehaving(handler: Handler, port: int = 0) -> tuple[web.AppRunner, str]:
    """A registry stand-in whose validation endpoint is ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/keys/verify", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def valid_json(_: web.Request) -> web.StreamResponse:
    return web.json_response(
        {
            "valid": True,
            "client": {"client_id": "cl_1", "client_name": "One", "roles": [], "status": "active"},
            "valid_until": None,
        }
    )


def answering(**kwargs: object) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(**kwargs)  # type: ignore[arg-type]

    return handler


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(
            answering(text="{not json", content_type="application/json"),
            id="malformed JSON",
        ),
        pytest.param(answering(status=500, text="oops"), id="5xx"),
        pytest.param(answering(status=302, headers={"Location": "/elsewhere"}), id="redirect"),
        pytest.param(
            answering(text='{"valid": true}', content_type="text/plain"),
            id="wrong content type",
        ),
        pytest.param(
            answering(
                text='{"valid": false, "reason": "' + "x" * 20000 + '"}',
                content_type="application/json",
            ),
            id="huge body",
        ),
        pytest.param(
            answering(text='{"valid": true, "client": null}', content_type="application/json"),
            id="wrong shape",
        ),
        pytest.param(
            answering(text="[" * 4000 + "]" * 4000, content_type="application/json"),
            id="deeply nested",
        ),
    ],
)
async def test_garbage_answers_are_errors(handler: Handler) -> None:
    """Each is raised as a RegistryError, so the check is denied."""
    runner, base = await misbehaving(handler)
    http = backend(base)
    await http.start()
    try:
        with pytest.raises(RegistryError):
            await http.verify(credential("azk_any"))
    finally:
        await http.close()
        await runner.cleanup()


async def test_a_dead_registry_opens_the_breaker_and_then_costs_nothing() -> None:
    """After the failure threshold, lookups fail at once without a connection attempt."""
    runner, base = await misbehaving(valid_json)
    await runner.cleanup()  # nothing listens there any more
    http = backend(base, failures=2)
    await http.start()
    try:
        for _ in range(2):
            with pytest.raises(RegistryError):
                await http.verify(credential("azk_any"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RegistryError, match="circuit open"):
            await http.verify(credential("azk_any"))
        assert loop.time() - started < 0.01
    finally:
        await http.close()


async def test_lookups_beyond_the_in_flight_bound_are_refused_not_queued() -> None:
    """With max_in_flight calls waiting on a slow registry, the next is refused at once."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return await valid_json(request)

    runner, base = await misbehaving(slow)
    http = backend(base, max_in_flight=2, timeout=5)
    await http.start()
    try:
        waiting = [asyncio.create_task(http.verify(credential("azk_any"))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(RegistryBusyError):
            await http.verify(credential("azk_any"))
        release.set()
        answers = [await task for task in waiting]
        assert all(isinstance(answer.result, Client) for answer in answers)
    finally:
        await http.close()
        await runner.cleanup()


async def test_a_request_that_never_left_is_retried_once() -> None:
    """A refused connection is tried a second time (safe: validation has no side effects)."""
    runner, base = await misbehaving(valid_json)
    port = int(base.rpartition(":")[2])
    await runner.cleanup()
    http = backend(base, failures=10)
    await http.start()
    attempts = 0
    real_call = http._call

    async def counted(key: Credential) -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 2:  # the registry is back for the retry
            again, _ = await misbehaving(valid_json, port)
            try:
                return await real_call(key)
            finally:
                await again.cleanup()
        return await real_call(key)

    http._call = counted  # type: ignore[method-assign,assignment]
    try:
        assert isinstance((await http.verify(credential("azk_any"))).result, Client)
        assert attempts == 2
    finally:
        await http.close()


async def test_a_slow_registry_is_answered_in_time_without_a_pile_up() -> None:
    """Slower than our timeout: each lookup fails in time, and beyond the in-flight bound the
    rest are refused at once instead of queueing behind it."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1)
        return await valid_json(request)

    runner, base = await misbehaving(slow)
    http = backend(base, timeout=0.1, max_in_flight=10, failures=1000)
    await http.start()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        outcomes = await asyncio.gather(
            *(http.verify(credential(f"azk_{n}")) for n in range(50)), return_exceptions=True
        )
        elapsed = loop.time() - started
        assert elapsed < 0.5
        assert sum(isinstance(o, RegistryBusyError) for o in outcomes) == 40
        assert all(isinstance(o, RegistryError) for o in outcomes)
    finally:
        await http.close()
        await runner.cleanup()


async def test_no_failure_of_a_half_open_trial_leaves_the_breaker_stuck() -> None:
    """The trial call after the cooldown gets a deeply nested answer (RecursionError in the
    JSON parser, which nothing expected): it counts as a failure, and once the registry is
    healthy again the next trial closes the circuit."""
    answers = [answering(text="[" * 4000 + "]" * 4000, content_type="application/json")]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await (answers[0] if answers else valid_json)(request)

    runner, base = await misbehaving(handler)
    clock = FakeClock()
    http = backend(base, breaker=CircuitBreaker(1, cooldown=5, clock=clock))
    await http.start()
    try:
        with pytest.raises(RegistryError):
            await http.verify(credential("azk_any"))  # opens the circuit
        clock.now += 5
        with pytest.raises(RegistryError):
            await http.verify(credential("azk_any"))  # the half-open trial, failing oddly
        assert http.breaker_state == "open"
        answers.clear()
        clock.now += 5
        assert isinstance((await http.verify(credential("azk_any"))).result, Client)
        assert http.breaker_state == "closed"
    finally:
        await http.close()
        await runner.cleanup()


async def test_a_key_echoed_back_by_the_registry_never_reaches_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A malformed answer that quotes the key is an error whose log line does not quote it."""
    key = apikeys.generate()

    async def echo(request: web.Request) -> web.StreamResponse:
        sent = (await request.json())["api_key"]
        return web.json_response({"valid": False, "reason": sent})

    runner, base = await misbehaving(echo)
    http = backend(base)
    await http.start()
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(RegistryError) as raised:
            await http.verify(credential(key))
        assert key not in caplog.text
        assert key not in str(raised.value)
    finally:
        await http.close()
        await runner.cleanup()


class FakeClock:
    now = 100.0

    def __call__(self) -> float:
        return self.now
