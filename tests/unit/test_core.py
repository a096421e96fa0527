"""The check core decides, and fails closed: every error and every timeout is a deny, and every
check is recorded once. Each specification runs through both entry points production uses:
``check`` from a worker thread (the gRPC transport) and ``check_on_loop`` on the event loop (the
HTTP transport)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

import pytest

from authz_service import apikeys
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.metrics import Metrics
from authz_service.model import Authorization, Client, Decision, Request
from authz_service.policy import NO_POLICY, Policy, parse
from authz_service.reasons import Reason
from authz_service.registry import RegistryBusyError, RegistryError
from tests.fakes import FakeRegistry

KEY = "azk_known"
CLIENT = Client(client_id="c-1", name="One")


def kid(key: str = KEY) -> str:
    """The key id every decision about a key carries."""
    return apikeys.digest(key)[:6].hex()


Decide = Callable[..., Awaitable[Decision]]


def checker(
    registry: FakeRegistry,
    *,
    timeout: float = 1.0,
    allow_non_http: bool = False,
    max_waiting: int = 1000,
    max_waiting_threads: int = 24,
    policy: Policy = NO_POLICY,
    metrics: Metrics | None = None,
) -> Checker:
    return Checker(
        registry,
        CheckSettings(
            credential_rules=CredentialRules(),
            check_timeout=timeout,
            max_waiting=max_waiting,
            max_waiting_threads=max_waiting_threads,
            allow_non_http=allow_non_http,
        ),
        asyncio.get_running_loop(),
        metrics,
        policy=lambda: policy,
    )


def http(*authorization: str, path: str = "/") -> Request:
    return Request(
        is_http=True, authorization=Authorization(authorization), method="GET", path=path
    )


def checks(labels: dict[str, str], metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("authz_checks_total", labels) or 0


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry(
        {KEY: CLIENT, "azk_disabled": Reason.KEY_DISABLED, "azk_expired": Reason.KEY_EXPIRED}
    )


@pytest.fixture(params=["worker thread", "event loop"])
def entry(request: pytest.FixtureRequest) -> Callable[[Checker], Decide]:
    """How a transport calls the core: ``check`` on a thread, or ``check_on_loop``."""

    def on_thread(core: Checker) -> Decide:
        async def decide(request: Request, time_remaining: float | None = None) -> Decision:
            return await asyncio.to_thread(core.check, request, time_remaining)

        return decide

    def on_loop(core: Checker) -> Decide:
        async def decide(request: Request, time_remaining: float | None = None) -> Decision:
            outcome = core.check_on_loop(request, time_remaining)
            return outcome if isinstance(outcome, Decision) else await outcome

        return decide

    return on_thread if request.param == "worker thread" else on_loop


async def test_a_known_key_is_allowed_with_its_client(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """The registry's client becomes the decision's client."""
    decision = await entry(checker(registry))(http(f"ApiKey {KEY}"))
    assert decision == Decision.allow(CLIENT, key_id=kid())


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("azk_unknown", Reason.UNKNOWN_KEY),
        ("azk_disabled", Reason.KEY_DISABLED),
        ("azk_expired", Reason.KEY_EXPIRED),
    ],
)
async def test_registry_refusals_become_denials(
    registry: FakeRegistry, entry: Callable[[Checker], Decide], key: str, reason: Reason
) -> None:
    """Unknown, disabled and expired keys are denied with the registry's reason."""
    decision = await entry(checker(registry))(http(f"ApiKey {key}"))
    assert decision == Decision.deny(reason, key_id=kid(key))


async def test_malformed_credentials_are_denied_without_a_lookup(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """Offline rejection costs the registry nothing."""
    decide = entry(checker(registry))
    for authorization in [(), ("Bearer x",), ("ApiKey a b",), ("ApiKey a", "ApiKey b")]:
        assert not (await decide(http(*authorization))).allowed
    assert registry.lookups == 0


async def test_a_slow_registry_is_a_503_within_our_timeout(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """A lookup that outlives check_timeout is denied with deadline_exceeded, in time."""
    registry.delay = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await entry(checker(registry, timeout=0.05))(http(f"ApiKey {KEY}"))
    assert decision == Decision.deny(Reason.DEADLINE_EXCEEDED, key_id=kid())
    assert loop.time() - started < 1.0


async def test_the_callers_deadline_shortens_our_timeout(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """With less time left on the gRPC deadline than our timeout, we answer before it ends."""
    registry.delay = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await entry(checker(registry, timeout=10))(http(f"ApiKey {KEY}"), 0.06)
    assert decision == Decision.deny(Reason.DEADLINE_EXCEEDED, key_id=kid())
    assert loop.time() - started < 1.0


@pytest.mark.parametrize("no_deadline", [None, 2.0**62], ids=["none", "gRPC's huge value"])
async def test_a_call_without_a_deadline_gets_our_own_timeout(
    registry: FakeRegistry, entry: Callable[[Checker], Decide], no_deadline: float | None
) -> None:
    """grpcurl sends no deadline by default: the key is looked up and allowed as usual."""
    decision = await entry(checker(registry))(http(f"ApiKey {KEY}"), no_deadline)
    assert decision == Decision.allow(CLIENT, key_id=kid())


@pytest.mark.parametrize(
    "error",
    [RuntimeError("boom"), KeyError("x"), ValueError("bad answer"), RecursionError("deep")],
)
async def test_any_unexpected_error_is_a_503_never_an_allow(
    registry: FakeRegistry,
    entry: Callable[[Checker], Decide],
    error: Exception,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exceptions become internal_error denials and are logged."""
    registry.error = error
    with caplog.at_level(logging.ERROR):
        decision = await entry(checker(registry))(http(f"ApiKey {KEY}"))
    assert decision == Decision.deny(Reason.INTERNAL_ERROR, key_id=kid())
    assert "check failed" in caplog.text


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RegistryError("down"), Reason.REGISTRY_UNAVAILABLE),
        (RegistryBusyError("full"), Reason.REGISTRY_BUSY),
    ],
)
async def test_registry_errors_are_denied_with_their_own_reason(
    registry: FakeRegistry, entry: Callable[[Checker], Decide], error: Exception, reason: Reason
) -> None:
    """An unreachable or saturated registry is a 503 that says so."""
    registry.error = error
    decision = await entry(checker(registry))(http(f"ApiKey {KEY}"))
    assert decision == Decision.deny(reason, key_id=kid())


@pytest.mark.parametrize("problem", [Reason.REQUEST_TOO_LARGE, Reason.REQUEST_UNPARSABLE])
async def test_a_request_the_transport_could_not_read_is_denied_and_recorded(
    registry: FakeRegistry, entry: Callable[[Checker], Decide], problem: Reason
) -> None:
    """Too large or unparsable: an explicit deny with its own reason, counted like any check."""
    metrics = Metrics()
    decide = entry(checker(registry, metrics=metrics))
    assert await decide(Request(is_http=True, problem=problem)) == Decision.deny(problem)
    labels = {"client_id": "none", "decision": "deny", "reason": problem.value}
    assert checks(labels, metrics) == 1


async def test_non_http_checks_are_denied_by_default(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """Network (TCP) ext_authz checks get a deliberate 403, not a crash."""
    decision = await entry(checker(registry))(Request(is_http=False))
    assert decision == Decision.deny(Reason.NON_HTTP_REQUEST)


async def test_non_http_checks_can_be_allowed_by_setting(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """Operators who front raw TCP with other controls may allow them, without an identity."""
    decision = await entry(checker(registry, allow_non_http=True))(Request(is_http=False))
    assert decision == Decision.allow(None, Reason.NON_HTTP_REQUEST)


async def test_checks_beyond_the_waiting_bound_are_denied_at_once(
    registry: FakeRegistry, entry: Callable[[Checker], Decide]
) -> None:
    """With the bound reached, a new check gets 503 overloaded instead of queueing."""
    registry.delay = 0.3
    decide = entry(checker(registry, max_waiting=2))
    request = http(f"ApiKey {KEY}")
    first = [asyncio.ensure_future(decide(request)) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert await decide(request) == Decision.deny(Reason.OVERLOADED, key_id=kid())
    assert list(await asyncio.gather(*first)) == [Decision.allow(CLIENT, key_id=kid())] * 2


async def test_worker_threads_waiting_for_the_registry_are_bounded() -> None:
    """Past max_waiting_threads, a worker thread that would wait is refused at once, so that
    the others stay free for answers from memory."""
    registry = FakeRegistry({KEY: CLIENT}, delay=0.3)
    core = checker(registry, max_waiting_threads=1)
    request = http(f"ApiKey {KEY}")
    first = asyncio.ensure_future(asyncio.to_thread(core.check, request))
    await asyncio.sleep(0.1)
    assert await asyncio.to_thread(core.check, request) == Decision.deny(
        Reason.OVERLOADED, key_id=kid()
    )
    assert await first == Decision.allow(CLIENT, key_id=kid())


class TestAuthorization:
    """Step 3: the policy decides for identified clients only, and its denial names the client."""

    POLICY = parse(
        "default: allow\nrules: [{id: admin, paths: [{prefix: /admin}], allow: {roles: [admin]}}]",
        "p",
    )

    async def test_a_client_the_policy_refuses_gets_403_forbidden(
        self, registry: FakeRegistry, entry: Callable[[Checker], Decide]
    ) -> None:
        decide = entry(checker(registry, policy=self.POLICY))
        decision = await decide(http(f"ApiKey {KEY}", path="/admin/x"))
        assert decision == Decision.deny(Reason.FORBIDDEN, CLIENT, "admin", kid())

    async def test_the_policy_never_sees_an_unidentified_request(
        self, registry: FakeRegistry, entry: Callable[[Checker], Decide]
    ) -> None:
        decide = entry(checker(registry, policy=self.POLICY))
        decision = await decide(http("ApiKey azk_unknown", path="/admin"))
        assert decision == Decision.deny(Reason.UNKNOWN_KEY, key_id=kid("azk_unknown"))

    async def test_explain_traces_without_logging_a_decision(
        self, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        request = http(f"ApiKey {KEY}", path="/admin/../admin")
        with caplog.at_level(logging.INFO, logger="authz_service.decision"):
            decision, trace = await checker(registry, policy=self.POLICY).explain(request)
        assert decision == Decision.deny(Reason.FORBIDDEN, CLIENT, "admin", kid())
        assert (trace.resolution, trace.policy_path) == ("registry", "/admin")
        assert trace.key_id is not None
        assert len(trace.key_id) == 12
        assert not caplog.records

    async def test_explain_for_a_client_skips_the_credential(self, registry: FakeRegistry) -> None:
        admin = Client("ops", "Ops", ("admin",))
        decision, trace = await checker(registry, policy=self.POLICY).explain(
            Request(is_http=True, path="/admin"), admin
        )
        assert decision == Decision.allow(admin, rule="admin")
        assert trace.key_id is None


class TestRecording:
    """Every check is recorded once, by the core, whatever its path."""

    async def test_a_check_that_waited_for_the_registry_is_counted_once(
        self, registry: FakeRegistry, entry: Callable[[Checker], Decide]
    ) -> None:
        metrics = Metrics()
        decision = await entry(checker(registry, metrics=metrics))(http(f"ApiKey {KEY}"))
        assert decision == Decision.allow(CLIENT, key_id=kid())
        assert registry.lookups == 1
        labels = {"client_id": "c-1", "decision": "allow", "reason": "allowed"}
        assert checks(labels, metrics) == 1

    async def test_a_refusal_by_a_bound_is_counted_too(
        self, registry: FakeRegistry, entry: Callable[[Checker], Decide]
    ) -> None:
        metrics = Metrics()
        decision = await entry(checker(registry, max_waiting=0, metrics=metrics))(
            http(f"ApiKey {KEY}")
        )
        assert decision == Decision.deny(Reason.OVERLOADED, key_id=kid())
        labels = {"client_id": "none", "decision": "deny", "reason": "overloaded"}
        assert checks(labels, metrics) == 1

    async def test_counts_stay_exact_across_threads(self) -> None:
        metrics = Metrics()
        core = checker(FakeRegistry({KEY: CLIENT}, in_memory=True), metrics=metrics)
        request = http(f"ApiKey {KEY}")

        def work() -> None:
            for _ in range(2000):
                core.check(request)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        labels = {"client_id": "c-1", "decision": "allow", "reason": "allowed"}
        assert checks(labels, metrics) == 16000


async def test_on_the_loop_an_answer_in_memory_is_decided_at_once() -> None:
    """No task and no waiting when the key's answer is in memory: the decision itself."""
    core = checker(FakeRegistry({KEY: CLIENT}, in_memory=True))
    assert core.check_on_loop(http(f"ApiKey {KEY}")) == Decision.allow(CLIENT, key_id=kid())
