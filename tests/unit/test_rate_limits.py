"""Per-client rate limits: a token bucket per client, taken from only by allowed checks, with
its parameters from the client of each decision, and a shared bucket that never denies because
it failed. Time is an injected clock; each specification runs through both entry points of the
check core (a worker thread and the event loop) where the core is involved."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from authz_service import apikeys, contract
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.limits import LocalBuckets, RateLimiter, standing
from authz_service.model import Authorization, Client, Decision, Quota, RateLimit, Request
from authz_service.policy import parse
from authz_service.reasons import Reason
from authz_service.registry.snapshot import SnapshotRegistry
from tests.fakes import FakeRegistry

KEY = "azk_limited"
FIVE_A_SECOND = RateLimit(5, "second")
LIMITED = Client("metered", "Metered", ("reader",), FIVE_A_SECOND)
KEY_ID = apikeys.digest(KEY)[:6].hex()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FailingShared:
    """A shared bucket whose Redis always fails (``take`` says so with None)."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.calls = 0

    async def start(self) -> None:
        pass

    async def take(self, client_id: str, limit: RateLimit) -> tuple[bool, float] | None:
        self.calls += 1
        return None

    async def close(self) -> None:
        pass


class HangingShared:
    """A shared bucket whose Redis answers only when released."""

    down = False

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def start(self) -> None:
        pass

    async def take(self, client_id: str, limit: RateLimit) -> tuple[bool, float] | None:
        self.started.set()
        await self.release.wait()
        return (True, 0.0)

    async def close(self) -> None:
        pass


Decide = Callable[[Checker, Request], Awaitable[Decision]]


@pytest.fixture(params=["worker thread", "event loop"])
def decide(request: pytest.FixtureRequest) -> Decide:
    async def on_thread(core: Checker, check: Request) -> Decision:
        return await asyncio.to_thread(core.check, check)

    async def on_loop(core: Checker, check: Request) -> Decision:
        outcome = core.check_on_loop(check)
        return outcome if isinstance(outcome, Decision) else await outcome

    return on_thread if request.param == "worker thread" else on_loop


def checker(
    limiter: RateLimiter | None, client: Client = LIMITED, policy: str = "default: allow"
) -> Checker:
    return Checker(
        FakeRegistry({KEY: client}, in_memory=True),
        CheckSettings(CredentialRules(), check_timeout=1.0),
        asyncio.get_running_loop(),
        policy=lambda: parse(policy, "p"),
        limits=limiter,
    )


def check(path: str = "/") -> Request:
    auth = Authorization((f"ApiKey {KEY}",))
    return Request(is_http=True, authorization=auth, method="GET", path=path)


class TestTheBucket:
    def test_a_full_bucket_admits_its_quota_then_refuses(self) -> None:
        """5 a second: five requests at once, then none."""
        buckets = LocalBuckets(clock=Clock())
        taken = [buckets.take("c", FIVE_A_SECOND)[0] for _ in range(12)]
        assert taken == [True] * 5 + [False] * 7

    def test_it_refills_at_the_rate_of_the_limit(self) -> None:
        """One request every fifth of a second, never more than the quota."""
        clock = Clock()
        buckets = LocalBuckets(clock=clock)
        for _ in range(5):
            buckets.take("c", FIVE_A_SECOND)
        clock.now += 0.199
        assert buckets.take("c", FIVE_A_SECOND)[0] is False
        clock.now += 0.002
        assert buckets.take("c", FIVE_A_SECOND)[0] is True
        clock.now += 3600
        assert buckets.take("c", FIVE_A_SECOND) == (True, 4.0)

    def test_each_client_has_its_own_bucket(self) -> None:
        buckets = LocalBuckets(clock=Clock())
        for _ in range(5):
            buckets.take("a", FIVE_A_SECOND)
        assert buckets.take("a", FIVE_A_SECOND)[0] is False
        assert buckets.take("b", FIVE_A_SECOND)[0] is True

    @pytest.mark.parametrize(
        ("new", "allowed_next"),
        [
            pytest.param(RateLimit(2, "second"), 0, id="lowered below what was used"),
            pytest.param(RateLimit(10, "second"), 6, id="raised"),
        ],
    )
    def test_a_changed_limit_applies_at_once_and_what_was_used_stays_used(
        self, new: RateLimit, allowed_next: int
    ) -> None:
        """Four used of 5 a second: under 2 a second none is left; under 10, six."""
        buckets = LocalBuckets(clock=Clock())
        for _ in range(4):
            buckets.take("c", FIVE_A_SECOND)
        taken = [buckets.take("c", new)[0] for _ in range(12)]
        assert taken.count(True) == allowed_next

    def test_the_number_of_buckets_is_bounded_and_refilled_ones_go_first(self) -> None:
        """At the bound, buckets that have refilled (the same as none) are dropped, then the
        oldest, down to 90%: a client that used its quota keeps its bucket."""
        clock = Clock()
        buckets = LocalBuckets(max_buckets=10, clock=clock)
        for _ in range(5):
            buckets.take("busy", RateLimit(5, "day"))
        for index in range(9):
            buckets.take(f"idle-{index}", FIVE_A_SECOND)
        clock.now += 1
        buckets.take("new", FIVE_A_SECOND)
        assert len(buckets) == 2
        assert buckets.take("busy", RateLimit(5, "day"))[0] is False

    def test_the_oldest_buckets_go_when_none_has_refilled(self) -> None:
        buckets = LocalBuckets(max_buckets=10, clock=Clock())
        for index in range(11):
            buckets.take(f"c-{index}", RateLimit(1, "day"))
        assert len(buckets) == 10
        assert buckets.take("c-0", RateLimit(1, "day"))[0] is True  # forgotten: full again
        assert buckets.take("c-10", RateLimit(1, "day"))[0] is False


@pytest.mark.parametrize(
    ("limit", "tokens", "expected"),
    [
        pytest.param(FIVE_A_SECOND, 4.0, (4, 1), id="a fifth of a second, rounded up"),
        pytest.param(FIVE_A_SECOND, 0.5, (0, 1), id="none left"),
        pytest.param(RateLimit(100, "minute"), 99.0, (99, 1), id="0.6 s"),
        pytest.param(RateLimit(1000, "day"), 0.0, (0, 87), id="86.4 s"),
        pytest.param(RateLimit(10, "hour"), 10.0, (10, 0), id="full: nothing more to come"),
    ],
)
def test_a_quota_says_what_is_left_and_when_one_more_comes(
    limit: RateLimit, tokens: float, expected: tuple[int, int]
) -> None:
    """Whole requests left, and the seconds until the next one, rounded up."""
    quota = standing(limit, tokens, shared=False)
    assert (quota.remaining, quota.reset) == expected


class TestInTheCheck:
    async def test_a_limited_client_gets_its_quota_then_429(self, decide: Decide) -> None:
        """Allowed checks carry the quota; the sixth is rate_limited, with the client and key."""
        core = checker(RateLimiter(LocalBuckets(clock=Clock())))
        decisions = [await decide(core, check()) for _ in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert [d.quota.remaining for d in decisions if d.quota] == [4, 3, 2, 1, 0, 0]
        assert decisions[0] == Decision.allow(LIMITED, key_id=KEY_ID)._replace(
            quota=Quota(FIVE_A_SECOND, 4, 1, False)
        )
        limited = decisions[-1]
        assert (limited.reason, limited.client, limited.key_id) == (
            Reason.RATE_LIMITED,
            LIMITED,
            KEY_ID,
        )

    async def test_a_client_without_a_limit_is_never_limited(self, decide: Decide) -> None:
        core = checker(RateLimiter(LocalBuckets()), Client("free", "Free"))
        decisions = [await decide(core, check()) for _ in range(20)]
        assert all(d.allowed and d.quota is None for d in decisions)

    async def test_denied_checks_take_nothing_from_the_quota(self, decide: Decide) -> None:
        """A request the policy forbids is a 403, and costs the client no request."""
        policy = "default: allow\nrules: [{id: admin, paths: [{prefix: /admin}], allow: none}]"
        core = checker(RateLimiter(LocalBuckets(clock=Clock())), policy=policy)
        for _ in range(10):
            assert (await decide(core, check("/admin"))).reason is Reason.FORBIDDEN
        assert [(await decide(core, check())).allowed for _ in range(6)] == [True] * 5 + [False]

    async def test_without_enforcement_the_limit_is_not_applied(self, decide: Decide) -> None:
        """AUTHZ_RATE_LIMITS=false: the limit only travels on (in the dynamic metadata)."""
        core = checker(None)
        assert all([(await decide(core, check())).allowed for _ in range(10)])

    async def test_explain_does_not_take_from_the_quota(self) -> None:
        core = checker(RateLimiter(LocalBuckets(clock=Clock())))
        for _ in range(10):
            decision, _ = await core.explain(check())
            assert decision.allowed
            assert decision.quota is None
        assert (await asyncio.to_thread(core.check, check())).quota == Quota(
            FIVE_A_SECOND, 4, 1, False
        )

    async def test_when_the_shared_bucket_fails_the_local_one_decides(self, decide: Decide) -> None:
        """Redis trouble never denies: five allowed, from this replica's own bucket."""
        shared = FailingShared()
        core = checker(RateLimiter(LocalBuckets(clock=Clock()), shared))
        decisions = [await decide(core, check()) for _ in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert all(d.quota is not None and not d.quota.shared for d in decisions)
        assert shared.calls == 6

    async def test_while_redis_is_down_the_check_does_not_wait_for_it(self, decide: Decide) -> None:
        """With the breaker open, the local bucket answers at once, on any thread."""
        shared = FailingShared(down=True)
        limiter = RateLimiter(LocalBuckets(clock=Clock()), shared)
        assert limiter.mode == "local"
        assert (await decide(checker(limiter), check())).allowed
        assert shared.calls == 0

    @pytest.mark.parametrize("entry", ["worker thread", "event loop"])
    async def test_a_check_that_may_not_wait_for_redis_is_limited_locally(self, entry: str) -> None:
        """With every waiting slot taken, the local bucket decides: never a 503 for it."""
        shared = HangingShared()
        core = Checker(
            FakeRegistry({KEY: LIMITED}, in_memory=True),
            CheckSettings(
                CredentialRules(), check_timeout=5.0, max_waiting=1, max_waiting_threads=1
            ),
            asyncio.get_running_loop(),
            limits=RateLimiter(LocalBuckets(clock=Clock()), shared),
        )
        waiting = asyncio.ensure_future(asyncio.to_thread(core.check, check()))
        await shared.started.wait()
        if entry == "worker thread":
            other = await asyncio.to_thread(core.check, check())
        else:
            outcome = core.check_on_loop(check())
            other = outcome if isinstance(outcome, Decision) else await outcome
        assert other.allowed
        assert other.quota == Quota(FIVE_A_SECOND, 4, 1, shared=False)
        shared.release.set()
        first = await waiting
        assert first.quota == Quota(FIVE_A_SECOND, 0, 1, shared=True)

    async def test_a_limit_changed_by_the_change_feed_applies_from_the_next_check(
        self, decide: Decide
    ) -> None:
        """The snapshot registry takes the client's new limit from an upsert: the very next
        check of its key is counted against it, with no TTL to wait for."""
        snapshot = SnapshotRegistry("http://registry", "t")
        snapshot.apply(upsert(1, FIVE_A_SECOND))
        core = Checker(
            snapshot,
            CheckSettings(CredentialRules(), check_timeout=1.0),
            asyncio.get_running_loop(),
            limits=RateLimiter(LocalBuckets(clock=Clock())),
        )
        assert [(await decide(core, check())).allowed for _ in range(6)] == [True] * 5 + [False]
        snapshot.apply(upsert(2, RateLimit(10, "second")))
        decisions = [await decide(core, check()) for _ in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert decisions[0].quota is not None
        assert decisions[0].quota.limit == RateLimit(10, "second")


def upsert(version: int, limit: RateLimit) -> contract.Change:
    digest = apikeys.digest(KEY)
    client = Client(LIMITED.client_id, LIMITED.name, LIMITED.roles, limit)
    return contract.Change(
        version, "upsert", digest, client.client_id, entry=contract.Entry(digest, client, None)
    )
