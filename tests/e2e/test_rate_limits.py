"""Per-client rate limits end to end: through the real Envoy with both sample configs (a client
limited to 5 a second gets exactly 5 of a burst of 12, 429s with the headers, and is allowed
again after the window), across two replicas sharing a real Redis (5 in total; with Redis
stopped, each replica limits on its own and nothing is denied because of Redis), and through
Envoy's global rate-limit service, which takes each client's limit from our metadata."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from authz_service.model import RateLimit
from authz_service.registry.static_file import add_key
from tests.e2e import harness
from tests.e2e.test_shared_cache import redis_server

pytestmark = pytest.mark.e2e
BURST = 12
RATE_LIMIT_PROXY = harness.ROOT / "envoy" / "front-proxy-ratelimit.yaml"
LIMIT = RateLimit(5, "second")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Keys:
    path: Path
    limited: str  # client "limited": 5 a second
    other: str  # client "also-limited": 5 a second, its own bucket
    plain: str  # client "plain": no limit


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    limited = add_key(path, "limited", "Limited Client", rate_limit=LIMIT)
    other = add_key(path, "also-limited", "Another Limited Client", rate_limit=LIMIT)
    return Keys(path, limited, other, add_key(path, "plain", "No Limit"))


def at_once(count: int, call: Callable[[int], _T]) -> list[_T]:
    """``count`` calls released together (a barrier), as a burst of clients would send them."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        results[index] = call(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def statuses(replies: list[harness.Response]) -> list[int]:
    return sorted(reply.status for reply in replies)


def assert_limited_then_allowed_again(proxy: harness.Envoy, key: str) -> None:
    """Exactly 5 of 12 allowed; the 7 others 429 with the quota; allowed again in time."""
    authorized = [("Authorization", f"ApiKey {key}")]
    replies = at_once(BURST, lambda _: harness.send(proxy.port, "/orders", authorized))
    assert statuses(replies) == [200] * 5 + [429] * 7
    allowed = [r for r in replies if r.status == 200]
    remaining = sorted(int(_param(r.header("ratelimit"), "r")) for r in allowed)
    assert remaining == [0, 1, 2, 3, 4]
    for reply in allowed:
        assert reply.header("ratelimit-policy") == '"client";q=5;w=1'
    for reply in (r for r in replies if r.status == 429):
        assert reply.header("x-ext-authz-reason") == "rate_limited"
        assert reply.header("content-type") == "application/json"
        assert reply.json()["reason"] == "rate_limited"
        assert reply.json()["error"] == "too_many_requests"
        assert reply.header("ratelimit-policy") == '"client";q=5;w=1'
        assert re.fullmatch(r'"client";r=0;t=1', reply.header("ratelimit") or "")
        assert reply.header("retry-after") == "1"
    harness.wait_until(
        lambda: harness.send(proxy.port, "/orders", authorized).status == 200,
        1 + 1,  # retry-after, and a second of slack for a loaded machine
        "an allow after the window",
    )


def _param(value: str | None, name: str) -> str:
    match = re.search(rf";{name}=(\d+)", value or "")
    assert match, value
    return match.group(1)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[harness.Service]:
    with harness.authz_service(tmp_path_factory.mktemp("authz"), keys.path) as running:
        yield running


@pytest.fixture(scope="module")
def upstream() -> Iterator[harness.Upstream]:
    with harness.echo_upstream() as running:
        yield running


def test_through_envoy_a_client_gets_its_quota_then_429_then_its_quota_again(
    tmp_path: Path, service: harness.Service, upstream: harness.Upstream, keys: Keys
) -> None:
    """envoy/front-proxy.yaml (gRPC): the RateLimit headers reach the client, never the
    upstream."""
    config = harness.render_front_proxy(0, 0, service, upstream.port)
    with harness.envoy(tmp_path, config) as proxy:
        before = len(upstream.seen)
        assert_limited_then_allowed_again(proxy, keys.limited)
        assert len(upstream.seen) == before + 5 + 1
        for seen in upstream.seen[before:]:
            assert not {name.lower() for name, _ in seen} & {"ratelimit", "ratelimit-policy"}


def test_through_envoy_in_http_mode_the_same(
    tmp_path: Path, service: harness.Service, upstream: harness.Upstream, keys: Keys
) -> None:
    """envoy/front-proxy-http.yaml: allowed_client_headers_on_success lets the quota through
    on allows, allowed_client_headers on the 429."""
    config = harness.render_front_proxy_http(0, 0, service, upstream.port)
    with harness.envoy(tmp_path, config) as proxy:
        assert_limited_then_allowed_again(proxy, keys.other)


def test_the_decision_log_records_the_limit(service: harness.Service, keys: Keys) -> None:
    lines = [json.loads(line) for line in service.logs().splitlines() if '"decision"' in line]
    limited = [line for line in lines if line.get("client_id") in {"limited", "also-limited"}]
    assert limited
    assert {line["rate_limit"] for line in limited} == {"5/second"}
    assert {line["rate_limit_mode"] for line in limited} == {"local"}
    assert {line["reason"] for line in limited} == {"allowed", "rate_limited"}


# --- two replicas, one Redis ---------------------------------------------------------------------
def check_request(key: str) -> CheckRequest:
    http = AttributeContext.HttpRequest(
        method="GET", host="api", path="/orders", headers={"authorization": f"ApiKey {key}"}
    )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


def spread_burst(replicas: list[harness.Service], key: str) -> list[CheckResponse]:
    """A burst of 12 checks, half to each replica, as Envoy would send them."""
    channels = [grpc.insecure_channel(replica.grpc_target) for replica in replicas]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        calls: list[Any] = [
            channel.unary_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=CheckRequest.SerializeToString,
                response_deserializer=CheckResponse.FromString,
            )
            for channel in channels
        ]
        request = check_request(key)
        return at_once(BURST, lambda index: calls[index % len(calls)](request, timeout=5))
    finally:
        for channel in channels:
            channel.close()


def outcomes(replies: list[CheckResponse]) -> list[int]:
    """The HTTP status of each answer: 200 for an allow."""
    return sorted(
        200 if reply.status.code == 0 else reply.denied_response.status.code for reply in replies
    )


def mode(replica: harness.Service) -> str:
    text = harness.send(replica.http_port, "/metrics").body.decode()
    return next(
        name
        for name in ("shared", "local")
        if f'authz_rate_limit_mode{{mode="{name}"}} 1.0' in text
    )


def test_replicas_sharing_redis_admit_the_limit_in_total_and_alone_when_it_stops(
    tmp_path: Path, keys: Keys
) -> None:
    """5 of 12 across both replicas while Redis is up; with Redis stopped, each replica
    admits its own 5, and every other answer is a 429, never a 503."""
    redis = contextlib.ExitStack()
    redis_url = redis.enter_context(redis_server())
    # A loaded test machine can take longer than the default 20 ms for a Redis round trip;
    # a check that does would be decided by its replica's own bucket (allowing one more).
    timeout = "0.1"
    try:
        with (
            harness.authz_service(
                tmp_path, keys.path, redis_url=redis_url, redis_timeout=timeout
            ) as first,
            harness.authz_service(
                tmp_path, keys.path, redis_url=redis_url, redis_timeout=timeout
            ) as second,
        ):
            replicas = [first, second]
            assert [mode(replica) for replica in replicas] == ["shared", "shared"]
            assert outcomes(spread_burst(replicas, keys.limited)) == [200] * 5 + [429] * 7

            redis.close()  # Redis stops; the replicas keep running
            local = spread_burst(replicas, keys.other)  # a client whose buckets are all full
            assert outcomes(local) == [200] * 10 + [429] * 2
            assert [mode(replica) for replica in replicas] == ["local", "local"]
            for replica in replicas:
                assert '"rate_limit_redis_error"' in replica.logs()
    finally:
        redis.close()


# --- Envoy's global rate-limit service -----------------------------------------------------------
@dataclass
class RateLimitService:
    """A stand-in for the operator's rate-limit service: records what Envoy asks, answers as
    told."""

    port: int = 0
    requests: list[rls_pb2.RateLimitRequest] = field(default_factory=list)
    over_limit: bool = False


@pytest.fixture
def rate_limit_service() -> Iterator[RateLimitService]:
    stub = RateLimitService()

    class Servicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
        def ShouldRateLimit(  # noqa: N802 (the gRPC method name)
            self, request: rls_pb2.RateLimitRequest, context: object
        ) -> rls_pb2.RateLimitResponse:
            stub.requests.append(request)
            response = rls_pb2.RateLimitResponse
            code = response.OVER_LIMIT if stub.over_limit else response.OK
            return response(overall_code=code)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Servicer(), server)
    stub.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield stub
    server.stop(None)


def test_envoys_rate_limit_service_gets_each_clients_limit_from_our_metadata(
    tmp_path: Path,
    keys: Keys,
    upstream: harness.Upstream,
    rate_limit_service: RateLimitService,
) -> None:
    """envoy/front-proxy-ratelimit.yaml, with AUTHZ_RATE_LIMITS=false: Envoy sends one
    descriptor, ("client_id", <id>), with the client's limit as its override, for identified
    clients only; the service's OVER_LIMIT becomes Envoy's 429."""
    with harness.authz_service(tmp_path, keys.path, rate_limits="false") as service:
        endpoints = {
            "authz": service.grpc_port,
            "authz_access_log": service.access_log_port,
            "ratelimit": rate_limit_service.port,
            "upstream": upstream.port,
        }
        config = harness.render(RATE_LIMIT_PROXY, 0, 0, endpoints)
        with harness.envoy(tmp_path, config) as proxy:
            limited = [("Authorization", f"ApiKey {keys.limited}")]
            assert [harness.send(proxy.port, "/x", limited).status for _ in range(7)] == [200] * 7
            assert (
                harness.send(proxy.port, "/x", [("Authorization", f"ApiKey {keys.plain}")]).status
                == 200
            )
            assert (
                harness.send(proxy.port, "/x", [("Authorization", "ApiKey azk_no")]).status == 401
            )
            rate_limit_service.over_limit = True
            assert harness.send(proxy.port, "/x", limited).status == 429
    assert len(rate_limit_service.requests) == 7 + 1 + 1
    first, *_, from_plain, _ = rate_limit_service.requests
    assert first.domain == "authz-service"
    (descriptor,) = first.descriptors
    assert [(e.key, e.value) for e in descriptor.entries] == [("client_id", "limited")]
    assert (descriptor.limit.requests_per_unit, descriptor.limit.unit) == (5, 1)  # SECOND
    (unlimited,) = from_plain.descriptors
    assert [(e.key, e.value) for e in unlimited.entries] == [("client_id", "plain")]
    assert not unlimited.HasField("limit")
