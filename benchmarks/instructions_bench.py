"""Instructions per check, counted by callgrind: a figure this machine's noise cannot move.

    .venv/bin/python benchmarks/instructions_bench.py [--checks 2000] [--warmup 400]

CPU time per check swings by a third from one minute to the next on this shared 2-core VM, which
hides differences of 10-20% (envoy_bench.py's ratios are paired per round for that reason).
Valgrind's callgrind (Debian's ``valgrind``) counts the instructions a process executes in user
space, the same from run to run: each server runs under it, gets --warmup checks, then its
counters are reset (``callgrind_control --dump``) and it gets --checks more, so the second dump
counts exactly those checks, every thread of the server included (the decision-log writer
too). Kernel time (the socket calls) is not counted: it is about the same for every server.

The servers, as envoy_bench.py runs them, each on loopback with the same requests:

- HTTP: the bare constant-200 asyncio server (``bare_http_server.py``), and ours
  (``AUTHZ_HTTP_CHECK_ADDRESS``) with decision logging on (info), and off (warning);
- gRPC: the bare constant-OK thread-pool servicer (``bare_server.py sync``), and ours.

Requests come four at a time (HTTP: four keep-alive connections; gRPC: four threads), each a
check of a key from a keys file, as Envoy would send it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from check_bench import check_request
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.e2e import harness  # noqa: E402 (after the path is set)
from tests.usage_registry import UsageRegistry  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
IN_FLIGHT = 4


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    transport: str  # "http" or "grpc"
    port: int
    key: str  # the key its checks carry


def servers(keys_file: Path, usage_registry: UsageRegistry) -> list[Server]:
    """Each on a port of its own."""
    from authz_service.model import RateLimit  # noqa: PLC0415 (bench-only imports)
    from authz_service.registry.static_file import add_key  # noqa: PLC0415

    key = add_key(keys_file, "bench", "Benchmark client", ("reader",))
    unreachable = RateLimit(1_000_000_000, "second")  # taken from on every check, never reached
    limited = add_key(keys_file, "limited", "Limited client", ("reader",), rate_limit=unreachable)
    ledger = {
        "AUTHZ_USAGE_LEDGER": "true",
        "AUTHZ_REGISTRY_URL": usage_registry.url,
        "AUTHZ_REGISTRY_TOKEN": usage_registry.token,
    }
    python = sys.executable
    ours = {
        **os.environ,
        "AUTHZ_KEYS_FILE": str(keys_file),
        "AUTHZ_HTTP_ADDRESS": "127.0.0.1:0",
        "AUTHZ_ADMIN_ADDRESS": "",
        "AUTHZ_ACCESS_LOG_ADDRESS": "",
        "AUTHZ_LOG_LEVEL": "info",
    }
    serve = [harness.tool("authz-service"), "serve"]

    def http_ours(port: int, level: str) -> dict[str, str]:
        return {
            **ours,
            "AUTHZ_GRPC_ADDRESS": "127.0.0.1:0",
            "AUTHZ_HTTP_CHECK_ADDRESS": f"127.0.0.1:{port}",
            "AUTHZ_LOG_LEVEL": level,
        }

    def grpc_ours(port: int, more: dict[str, str] | None = None) -> dict[str, str]:
        address = f"127.0.0.1:{port}"
        return {
            **ours,
            "AUTHZ_GRPC_ADDRESS": address,
            "AUTHZ_HTTP_CHECK_ADDRESS": "",
            **(more or {}),
        }

    p = [harness.free_port() for _ in range(8)]
    return [
        Server("HTTP -> bare asyncio", [python, str(HERE / "bare_http_server.py"),
               f"127.0.0.1:{p[0]}"], dict(os.environ), "http", p[0], key),
        Server("HTTP -> ours", serve, http_ours(p[1], "info"), "http", p[1], key),
        Server("HTTP -> ours, decision log off", serve, http_ours(p[2], "warning"), "http", p[2],
               key),
        Server("gRPC -> bare thread-pool", [python, str(HERE / "bare_server.py"), "sync",
               f"127.0.0.1:{p[3]}"], dict(os.environ), "grpc", p[3], key),
        Server("gRPC -> ours", serve, grpc_ours(p[4]), "grpc", p[4], key),
        Server("gRPC -> ours + ledger", serve, grpc_ours(p[5], ledger), "grpc", p[5], key),
        Server("gRPC -> ours + local limit", serve, grpc_ours(p[6]), "grpc", p[6], limited),
        Server("gRPC -> ours + ledger + local limit", serve, grpc_ours(p[7], ledger), "grpc",
               p[7], limited),
    ]  # fmt: skip


def http_sender(port: int, key: str) -> Callable[[int], None]:
    request = (
        f"GET /v1/orders/1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: ApiKey {key}\r\n"
        "x-request-id: 4f1c9a52-8e0b-4f3b-9a59-1f0e5d2c7b11\r\ncontent-length: 0\r\n\r\n"
    ).encode()

    def send(count: int) -> None:
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(IN_FLIGHT)]
        try:
            for _ in range(0, count, IN_FLIGHT):
                for connection in connections:
                    connection.sendall(request)
                for connection in connections:
                    _read_answer(connection)
        finally:
            for connection in connections:
                connection.close()

    return send


def _read_answer(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536) or _closed()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not an allow: {head[:60]!r}")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536) or _closed()


def _closed() -> bytes:
    raise RuntimeError("the server closed the connection")


def grpc_sender(port: int, key: str) -> Callable[[int], None]:
    payload = check_request(key)

    def send(count: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check: Any = channel.unary_unary(CHECK, response_deserializer=CheckResponse.FromString)

            def calls(n: int) -> None:
                for _ in range(n):
                    if check(payload, timeout=30).status.code != 0:
                        raise RuntimeError("not an allow")

            with ThreadPoolExecutor(IN_FLIGHT) as pool:
                list(pool.map(calls, [count // IN_FLIGHT] * IN_FLIGHT))

    return send


def measure(server: Server, workdir: Path, args: argparse.Namespace) -> float:
    out = workdir / server.name.replace(" ", "_").replace(">", "").replace(",", "")
    out.mkdir()
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", *server.command]
    log = (out / "stderr").open("wb")
    process = subprocess.Popen(command, env=server.env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        send = (http_sender if server.transport == "http" else grpc_sender)(server.port, server.key)
        deadline = time.monotonic() + 180
        while True:  # the first checks, as the warm-up, once the port answers
            try:
                send(IN_FLIGHT)
                break
            except (OSError, grpc.RpcError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not start; see {out}/stderr") from None
                time.sleep(0.5)
        send(args.warmup)
        time.sleep(1)  # the log writer's batch
        dump(process.pid)
        send(args.checks)
        time.sleep(1)
        dump(process.pid)
    finally:
        process.terminate()
        process.wait(60)
        log.close()
    last = max(glob.glob(f"{out}/cg.{process.pid}.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    summary = next(
        line for line in Path(last).read_text().splitlines() if line.startswith("summary:")
    )
    return float(summary.split()[1]) / int(args.checks)


def dump(pid: int) -> None:
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=2000, help="checks counted per server")
    parser.add_argument("--warmup", type=int, default=400, help="checks before counting")
    parser.add_argument("--only", default="", help="only the servers whose name has this text")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("instructions_bench.py needs valgrind (apt-get install valgrind)")
    workdir = Path(tempfile.mkdtemp(prefix="instructions-bench-"))
    usage_registry = UsageRegistry()  # the ledger's flushes go to a stand-in of the registry
    usage_registry.start()
    counted = {}
    try:
        for server in servers(workdir / "keys.yaml", usage_registry):
            if args.only not in server.name:
                continue
            counted[server.name] = measure(server, workdir, args)
            print(f"{server.name:36} {counted[server.name]:>9,.0f} instructions per check")
    finally:
        usage_registry.stop()
    print()
    grpc_ours = "gRPC -> ours"
    pairs = [
        ("HTTP -> ours", "HTTP -> bare asyncio"),
        ("HTTP -> ours, decision log off", "HTTP -> bare asyncio"),
        (grpc_ours, "gRPC -> bare thread-pool"),
        ("HTTP -> ours", grpc_ours),
        ("gRPC -> ours + ledger", grpc_ours),
        ("gRPC -> ours + local limit", grpc_ours),
        ("gRPC -> ours + ledger + local limit", grpc_ours),
    ]
    for ours, floor in pairs:
        if ours in counted and floor in counted:
            print(f"  {ours} / {floor}: {counted[ours] / counted[floor]:.3f}x")
    if "HTTP -> ours" in counted and "HTTP -> ours, decision log off" in counted:
        log_cost = counted["HTTP -> ours"] - counted["HTTP -> ours, decision log off"]
        print(f"  the decision log: {log_cost:,.0f} instructions per check")


if __name__ == "__main__":
    main()
