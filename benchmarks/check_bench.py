"""Cost of a check: our server against a bare constant-OK servicer, side by side in one run.

    .venv/bin/python benchmarks/check_bench.py [--checks 20000] [--concurrency 32]

Each server runs in its own process and gets the same load from a grpc.aio client in this
process: a warm-up, then --checks checks of a realistic CheckRequest. Reported per server:
checks/s and client-side p50/p99 latency (both depend on the shared 2-core machine), and the
server's own CPU time per check from /proc (user + system), which is the figure to compare.
Ours answers on the cache-hit path of the static keys file, with decision logging on; once more
with the sample access policy (examples/policy.yaml), to show what evaluating the rules costs;
and twice with tracing on (the tracing extra): every check sampled (its request carries a
sampled traceparent) and exported over OTLP/gRPC to a receiver in this process, which counts the
spans it gets; and none sampled (OTEL_TRACES_SAMPLER=traceidratio, 0), the floor of tracing on.
and with the usage ledger (sending to a stand-in of the registry's usage endpoint), a client's
rate limit kept locally, both, and the rate limit kept in a real Redis (a private
redis-server), each against ours without them. The limit is too high to be reached: every
check takes from the bucket and gets its RateLimit headers, and none is denied.

    .venv/bin/python benchmarks/check_bench.py --group usage   # ours and those rows only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

HERE = Path(__file__).resolve().parent
POLICY = HERE.parent / "examples" / "policy.yaml"
sys.path.insert(0, str(HERE.parent))

from tests.e2e import harness  # noqa: E402 (after the path is set)
from tests.e2e.test_shared_cache import redis_server  # noqa: E402
from tests.usage_registry import UsageRegistry  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
USAGE_GROUP = frozenset(
    {
        "ours (tcp)",
        "ours + ledger (tcp)",
        "ours + local limit (tcp)",
        "ours + ledger + local limit (tcp)",
        "ours + Redis limit (tcp)",
    }
)
TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CPU, CLIENT_CPU = 1, 0


@dataclass
class Result:
    name: str
    checks_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_check: float
    shared_share: float | None = None  # of rate-limited checks, those counted in Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def check_request(key: str, traceparent: str = "") -> bytes:
    """Shaped like what Envoy sends for a typical API call."""
    http = AttributeContext.HttpRequest(
        id="4f1c9a52-8e0b-4f3b-9a59-1f0e5d2c7b11",
        method="GET",
        host="api.example.com",
        path="/v1/orders/12345?expand=items",
        scheme="http",
        protocol="HTTP/1.1",
        headers={
            ":authority": "api.example.com",
            ":method": "GET",
            ":path": "/v1/orders/12345",
            ":scheme": "http",
            "authorization": f"ApiKey {key}",
            "user-agent": "curl/8.5.0",
            "accept": "*/*",
            "x-forwarded-proto": "http",
            "x-request-id": "4f1c9a52-8e0b-4f3b-9a59-1f0e5d2c7b11",
            **({"traceparent": traceparent} if traceparent else {}),
        },
    )
    request = CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(http=http),
        )
    )
    payload: bytes = request.SerializeToString()
    return payload


async def drive(target: str, payload: bytes, checks: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)
        remaining = checks

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                reply = await call(payload, timeout=5)
                latencies.append(time.perf_counter() - started)
                if reply.status.code != 0:
                    raise RuntimeError(f"check denied: {reply.status.message}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts the spans it gets and keeps none."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the gRPC method name)
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        with self._lock:
            self.spans += sum(
                len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
            )
        return ExportTraceServiceResponse()


def wait_for_port(target: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with grpc.insecure_channel(target) as channel:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
        except grpc.FutureTimeoutError:
            continue
    raise TimeoutError(target)


def measure(
    name: str,
    *,
    command: list[str],
    env: dict[str, str],
    target: str,
    payload: bytes,
    checks: int,
    concurrency: int,
    metrics_port: int | None,
) -> Result:
    # The server gets one core to itself and the load generator the other, so that neither
    # steals the other's cycles and CPU per check is comparable from server to server.
    process = subprocess.Popen(
        ["taskset", "--cpu-list", str(SERVER_CPU), *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(target, process)
        # Warm-up: one check first, so that a registry lookup (the http row) is not made by 32
        # checks at once, beyond the threads that may wait for the registry (a 503).
        asyncio.run(drive(target, payload, 1, 1))
        asyncio.run(drive(target, payload, max(1000, checks // 10), concurrency))
        cpu_before, started = cpu_seconds(process.pid), time.perf_counter()
        latencies = asyncio.run(drive(target, payload, checks, concurrency))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(process.pid) - cpu_before
        share = None if metrics_port is None else shared_share(metrics_port)
    finally:
        process.terminate()
        process.wait(10)
    latencies.sort()
    return Result(
        name=name,
        checks_per_second=checks / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        cpu_us_per_check=cpu / checks * 1e6,
        shared_share=share,
    )


def shared_share(metrics_port: int) -> float | None:
    """Of the server's rate-limited checks, the share whose bucket was in Redis (the others
    were limited locally, because every slot for waiting on the event loop was taken)."""
    text = harness.send(metrics_port, "/metrics").body.decode()
    counts = {
        mode: float(match.group(1))
        for mode in ("shared", "local")
        if (match := re.search(rf'authz_rate_limit_checks_total{{mode="{mode}"}} (\S+)', text))
    }
    total = sum(counts.values())
    return counts.get("shared", 0.0) / total if total else None


def span_receiver() -> tuple[SpanCounter, grpc.Server, dict[str, str]]:
    """An OTLP receiver that counts the spans it gets, started; and the environment that sends
    a service's spans to it."""
    spans = SpanCounter()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # The generated gRPC module has no type annotations.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        spans, receiver
    )
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    return spans, receiver, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds per server; the median round is reported",
    )
    parser.add_argument(
        "--group",
        choices=("all", "usage"),
        default="all",
        help="every server, or only ours with and without the usage ledger and rate limits",
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    os.sched_setaffinity(0, {CLIENT_CPU})

    from authz_service.model import RateLimit  # noqa: PLC0415 (bench-only imports)
    from authz_service.registry.static_file import add_key  # noqa: PLC0415

    workdir = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    keys = workdir / "keys.yaml"
    key = add_key(keys, "bench", "Benchmark client", ("reader",))
    payload = check_request(key)
    unreachable = RateLimit(1_000_000_000, "second")  # taken from on every check, never reached
    limited_payload = check_request(
        add_key(keys, "bench-limited", "Limited client", ("reader",), rate_limit=unreachable)
    )
    usage_registry = UsageRegistry()
    usage_registry.start()
    ledger_env = {
        "AUTHZ_USAGE_LEDGER": "true",
        "AUTHZ_REGISTRY_URL": usage_registry.url,
        "AUTHZ_REGISTRY_TOKEN": usage_registry.token,
    }
    metrics_port = free_port()
    env = {
        **os.environ,
        "AUTHZ_KEYS_FILE": str(keys),
        # Only the gRPC port and /metrics are named here; the rest bind a free port, or are off.
        "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{metrics_port}",
        "AUTHZ_HTTP_CHECK_ADDRESS": "",
        "AUTHZ_ADMIN_ADDRESS": "",
        "AUTHZ_ACCESS_LOG_ADDRESS": "",
        "AUTHZ_LOG_LEVEL": "info",
    }
    python = sys.executable
    bare = str(HERE / "bare_server.py")
    ours = [python, "-m", "authz_service", "serve"]
    sock = workdir / "authz.sock"
    spans, receiver, tracing_env = span_receiver()
    unsampled_env = {
        **tracing_env,
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    traced = check_request(key, TRACEPARENT)
    with harness.registry_process(workdir) as registry, redis_server() as redis_url:
        # Ours in http mode answers from its cache after the warm-up: the cache-hit path.
        http_payload = check_request(registry.create_client("Benchmark client")["api_key"])
        http_env = {
            "AUTHZ_REGISTRY": "http",
            "AUTHZ_REGISTRY_URL": registry.url,
            "AUTHZ_REGISTRY_TOKEN": registry.service_token(),
            "AUTHZ_CACHE_TTL": "3600",
        }
        runs = [
            ("bare sync (tcp)", [python, bare, "sync", "{address}"], "tcp", {}, payload),
            ("bare aio (tcp)", [python, bare, "aio", "{address}"], "tcp", {}, payload),
            ("ours (tcp)", ours, "tcp", {}, payload),
            ("ours http-hit (tcp)", ours, "tcp", http_env, http_payload),
            # The sample policy; no rule matches the request's path, so every rule is tried.
            ("ours + policy (tcp)", ours, "tcp", {"AUTHZ_POLICY_FILE": str(POLICY)}, payload),
            # Every check sampled (the caller's traceparent says so) and exported; then tracing
            # on with none sampled (traceidratio ignores the caller's flag): the floor.
            ("ours + tracing (tcp)", ours, "tcp", tracing_env, traced),
            ("ours + unsampled (tcp)", ours, "tcp", unsampled_env, traced),
            ("bare aio (unix)", [python, bare, "aio", "{address}"], "unix", {}, payload),
            ("ours (unix)", ours, "unix", {}, payload),
            ("ours + ledger (tcp)", ours, "tcp", ledger_env, payload),
            ("ours + local limit (tcp)", ours, "tcp", {}, limited_payload),
            ("ours + ledger + local limit (tcp)", ours, "tcp", ledger_env, limited_payload),
            (
                "ours + Redis limit (tcp)",
                ours,
                "tcp",
                # A timeout the loaded 2-core machine does not reach, so that the checks are
                # counted in Redis (rather than falling back to the local bucket).
                {"AUTHZ_REDIS_URL": redis_url, "AUTHZ_REDIS_TIMEOUT": "0.1"},
                limited_payload,
            ),
        ]
        if args.group == "usage":
            runs = [run for run in runs if run[0] in USAGE_GROUP]
        rounds: dict[str, list[Result]] = {name: [] for name, *_ in runs}
        for _ in range(args.rounds):  # interleaved: drift on the machine hits every server
            for name, command, transport, extra, body in runs:
                address = f"unix:{sock}" if transport == "unix" else f"127.0.0.1:{free_port()}"
                sock.unlink(missing_ok=True)
                argv = [part.format(address=address) for part in command]
                rounds[name].append(
                    measure(
                        name,
                        command=argv,
                        env={**env, **extra, "AUTHZ_GRPC_ADDRESS": address},
                        target=address,
                        payload=body,
                        checks=args.checks,
                        concurrency=args.concurrency,
                        metrics_port=metrics_port if command is ours else None,
                    )
                )
    receiver.stop(None)
    usage_registry.stop()
    results = {
        name: sorted(runs_of, key=lambda r: r.cpu_us_per_check)[len(runs_of) // 2]
        for name, runs_of in rounds.items()
    }

    print(
        f"{args.checks} checks per server, concurrency {args.concurrency}, "
        f"median of {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, grpcio {grpc.__version__}"
    )
    width = max(len(name) for name in results) + 2
    print(f"{'server':<{width}}{'checks/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/check':>14}")
    for r in results.values():
        note = "" if r.shared_share is None else f"  ({r.shared_share:.0%} counted in Redis)"
        print(
            f"{r.name:<{width}}{r.checks_per_second:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.cpu_us_per_check:>14.1f}{note}"
        )
    sampled = args.rounds * (args.checks + max(1000, args.checks // 10) + 1)
    print(f"spans exported: {spans.spans}, for {sampled} checks of ours + tracing")
    for mine, floor in [
        ("ours (tcp)", "bare aio (tcp)"),
        ("ours http-hit (tcp)", "bare aio (tcp)"),
        ("ours + policy (tcp)", "ours (tcp)"),
        ("ours + tracing (tcp)", "ours (tcp)"),
        ("ours + unsampled (tcp)", "ours (tcp)"),
        ("ours (unix)", "bare aio (unix)"),
        ("ours (tcp)", "bare sync (tcp)"),
        ("bare aio (tcp)", "bare sync (tcp)"),
        ("ours + ledger (tcp)", "ours (tcp)"),
        ("ours + local limit (tcp)", "ours (tcp)"),
        ("ours + ledger + local limit (tcp)", "ours (tcp)"),
        ("ours + Redis limit (tcp)", "ours (tcp)"),
    ]:
        if mine not in results or floor not in results:
            continue
        ratio = results[mine].cpu_us_per_check / results[floor].cpu_us_per_check
        # Paired: the two servers' ratio within each round (they ran back to back, so the
        # machine's drift cancels out), then the median over rounds.
        paired = sorted(
            m.cpu_us_per_check / f.cpu_us_per_check
            for m, f in zip(rounds[mine], rounds[floor], strict=True)
        )
        print(
            f"CPU per check, {mine} / {floor}: {ratio:.2f}x "
            f"(per round: median {paired[len(paired) // 2]:.2f}x, "
            f"range {paired[0]:.2f}-{paired[-1]:.2f}x)"
        )


if __name__ == "__main__":
    main()
