"""The pipeline decides, and fails closed: every error and every timeout is a deny."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from authz_service import apikeys
from authz_service.credentials import CredentialRules
from authz_service.metrics import Metrics
from authz_service.model import Client, Credential, Decision, Request
from authz_service.pipeline import Pending, Pipeline, PipelineSettings
from authz_service.policy import NO_POLICY, Policy, parse
from authz_service.reasons import Reason
from authz_service.registry import RegistryBusyError, RegistryError
from tests.fakes import FakeRegistry

KEY = "azk_known"
CLIENT = Client(client_id="c-1", name="One")


def pipeline(
    registry: FakeRegistry,
    timeout: float = 1.0,
    allow_non_http: bool = False,
    max_in_flight: int = 1000,
    policy: Policy = NO_POLICY,
) -> Pipeline:
    return Pipeline(
        registry,
        PipelineSettings(
            credential_rules=CredentialRules(),
            check_timeout=timeout,
            max_in_flight=max_in_flight,
            allow_non_http=allow_non_http,
        ),
        policy=lambda: policy,
    )


def http(authorization: tuple[str, ...]) -> Request:
    return Request(is_http=True, authorization=authorization, method="GET", path="/")


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry(
        {
            apikeys.hash_key(KEY): CLIENT,
            apikeys.hash_key("azk_disabled"): Reason.KEY_DISABLED,
            apikeys.hash_key("azk_expired"): Reason.KEY_EXPIRED,
        }
    )


async def test_a_known_key_is_allowed_with_its_client(registry: FakeRegistry) -> None:
    """The registry's client becomes the decision's client."""
    decision = await pipeline(registry).check(http((f"ApiKey {KEY}",)))
    assert decision == Decision.allow(CLIENT)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("azk_unknown", Reason.UNKNOWN_KEY),
        ("azk_disabled", Reason.KEY_DISABLED),
        ("azk_expired", Reason.KEY_EXPIRED),
    ],
)
async def test_registry_refusals_become_denials(
    registry: FakeRegistry, key: str, reason: Reason
) -> None:
    """Unknown, disabled and expired keys are denied with the registry's reason."""
    assert await pipeline(registry).check(http((f"ApiKey {key}",))) == Decision.deny(reason)


async def test_malformed_credentials_are_denied_without_a_lookup(registry: FakeRegistry) -> None:
    """Offline rejection costs the registry nothing."""
    for authorization in [(), ("Bearer x",), ("ApiKey a b",), ("ApiKey a", "ApiKey b")]:
        decision = await pipeline(registry).check(http(authorization))
        assert not decision.allowed
    assert registry.lookups == 0


async def test_a_slow_registry_is_a_503_within_our_timeout(registry: FakeRegistry) -> None:
    """A lookup that outlives check_timeout is denied with deadline_exceeded, in time."""
    registry.delay = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await pipeline(registry, timeout=0.05).check(http((f"ApiKey {KEY}",)))
    assert decision == Decision.deny(Reason.DEADLINE_EXCEEDED)
    assert loop.time() - started < 1.0


async def test_the_callers_deadline_shortens_our_timeout(registry: FakeRegistry) -> None:
    """With less time left on the gRPC deadline than our timeout, we answer before it ends."""
    registry.delay = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await pipeline(registry, timeout=10).check(http((f"ApiKey {KEY}",)), 0.06)
    assert decision == Decision.deny(Reason.DEADLINE_EXCEEDED)
    assert loop.time() - started < 0.06


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyError("x"), ValueError("bad answer"), OSError("down")]
)
async def test_any_registry_error_is_a_503_never_an_allow(
    registry: FakeRegistry, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Exceptions become internal_error denials and are logged."""
    registry.error = error
    with caplog.at_level(logging.ERROR):
        decision = await pipeline(registry).check(http((f"ApiKey {KEY}",)))
    assert decision == Decision.deny(Reason.INTERNAL_ERROR)
    assert "check failed" in caplog.text


async def test_cancellation_propagates_and_decides_nothing(registry: FakeRegistry) -> None:
    """When Envoy cancels the RPC, the check is abandoned rather than answered."""
    registry.delay = 5.0
    task = asyncio.create_task(pipeline(registry).check(http((f"ApiKey {KEY}",))))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_non_http_checks_are_denied_by_default(registry: FakeRegistry) -> None:
    """Network (TCP) ext_authz checks get a deliberate 403, not a crash."""
    decision = await pipeline(registry).check(Request(is_http=False))
    assert decision == Decision.deny(Reason.NON_HTTP_REQUEST)


async def test_non_http_checks_can_be_allowed_by_setting(registry: FakeRegistry) -> None:
    """Operators who front raw TCP with other controls may allow them, without an identity."""
    decision = await pipeline(registry, allow_non_http=True).check(Request(is_http=False))
    assert decision == Decision.allow(None, Reason.NON_HTTP_REQUEST)


async def test_checks_beyond_the_in_flight_bound_are_denied_at_once(registry: FakeRegistry) -> None:
    """With the bound reached, a new check gets 503 overloaded instead of queueing."""
    registry.delay = 0.2
    checks = pipeline(registry, max_in_flight=2)
    request = http((f"ApiKey {KEY}",))
    first = [asyncio.create_task(checks.check(request)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert await checks.check(request) == Decision.deny(Reason.OVERLOADED)
    assert [await task for task in first] == [Decision.allow(CLIENT)] * 2
    assert await checks.check(request) == Decision.allow(CLIENT)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RegistryError("down"), Reason.REGISTRY_UNAVAILABLE),
        (RegistryBusyError("full"), Reason.REGISTRY_BUSY),
    ],
)
async def test_registry_errors_are_denied_with_their_own_reason(
    registry: FakeRegistry, error: Exception, reason: Reason
) -> None:
    """An unreachable or saturated registry is a 503 that says so."""
    registry.error = error
    assert await pipeline(registry).check(http((f"ApiKey {KEY}",))) == Decision.deny(reason)


class TestAuthorization:
    """Step 3: the policy decides for identified clients only, and its denial names the client."""

    POLICY = parse(
        "default: allow\nrules: [{id: admin, paths: [{prefix: /admin}], allow: {roles: [admin]}}]",
        "p",
    )

    async def test_a_client_the_policy_refuses_gets_403_forbidden(
        self, registry: FakeRegistry
    ) -> None:
        request = Request(is_http=True, authorization=(f"ApiKey {KEY}",), path="/admin/x")
        decision = await pipeline(registry, policy=self.POLICY).check(request)
        assert decision == Decision.deny(Reason.FORBIDDEN, CLIENT, "admin")

    async def test_the_policy_never_sees_an_unidentified_request(
        self, registry: FakeRegistry
    ) -> None:
        request = Request(is_http=True, authorization=("ApiKey azk_unknown",), path="/admin")
        decision = await pipeline(registry, policy=self.POLICY).check(request)
        assert decision == Decision.deny(Reason.UNKNOWN_KEY)

    async def test_explain_traces_without_logging_a_decision(
        self, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        request = Request(is_http=True, authorization=(f"ApiKey {KEY}",), path="/admin/../admin")
        with caplog.at_level(logging.INFO, logger="authz_service.decision"):
            decision, trace = await pipeline(registry, policy=self.POLICY).explain(request)
        assert decision == Decision.deny(Reason.FORBIDDEN, CLIENT, "admin")
        assert (trace.key_id, trace.resolution, trace.policy_path) == (
            apikeys.hash_key(KEY)[:12],
            "registry",
            "/admin",
        )
        assert not caplog.records

    async def test_explain_for_a_client_skips_the_credential(self, registry: FakeRegistry) -> None:
        admin = Client("ops", "Ops", ("admin",))
        decision, trace = await pipeline(registry, policy=self.POLICY).explain(
            Request(is_http=True, path="/admin"), admin
        )
        assert decision == Decision.allow(admin, rule="admin")
        assert trace.key_id is None


class TestFromWorkerThreads:
    """The check server's worker threads call check_now; only lookups go to the event loop."""

    async def test_an_answer_in_memory_is_decided_without_the_loop(self) -> None:
        answers: dict[str, Client | Reason] = {apikeys.hash_key(KEY): CLIENT}
        decided = pipeline(InMemoryRegistry(answers)).check_now(http((f"ApiKey {KEY}",)))
        assert decided == Decision.allow(CLIENT)

    async def test_a_lookup_is_left_pending_then_finished_once(
        self, registry: FakeRegistry
    ) -> None:
        metrics = Metrics()
        checks = Pipeline(registry, PipelineSettings(CredentialRules(), check_timeout=1.0), metrics)
        pending = checks.check_now(http((f"ApiKey {KEY}",)))
        assert isinstance(pending, Pending)
        assert registry.lookups == 0
        assert await checks.finish(pending) == Decision.allow(CLIENT)
        assert registry.lookups == 1
        labels = {"client_id": "c-1", "decision": "allow", "reason": "allowed"}
        assert metrics.registry.get_sample_value("authz_checks_total", labels) == 1

    def test_counts_stay_exact_across_threads(self) -> None:
        metrics = Metrics()
        answers: dict[str, Client | Reason] = {apikeys.hash_key(KEY): CLIENT}
        checks = Pipeline(
            InMemoryRegistry(answers),
            PipelineSettings(CredentialRules(), check_timeout=1.0),
            metrics,
        )
        request = http((f"ApiKey {KEY}",))

        def work() -> None:
            for _ in range(2000):
                checks.check_now(request)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        labels = {"client_id": "c-1", "decision": "allow", "reason": "allowed"}
        assert metrics.registry.get_sample_value("authz_checks_total", labels) == 16000


class InMemoryRegistry(FakeRegistry):
    """Answers from memory, as the keys file and a cache hit do."""

    def lookup_now(self, credential: Credential) -> Client | Reason:  # type: ignore[override]
        return self.answers.get(credential.key_hash, Reason.UNKNOWN_KEY)
