"""The usage ledger end to end: a known mix of requests through the real Envoy, and the exact
totals per key in the real client registry, read back as billing reads them (`GET
/clients/{id}/usage`): allows, denials by reason, upstream answers by class, bytes. Across a
graceful restart of authz-service, in HTTP mode, and across a registry outage longer than a
flush interval with an answer lost on the way."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authz_service import apikeys
from authz_service.contract import parse_time
from authz_service.registry.static_file import add_key
from tests.e2e import harness
from tests.e2e.test_telemetry import scrape, value

pytestmark = pytest.mark.e2e
FLUSH_INTERVAL = "0.5"


class Registry:
    """The reference registry in one work directory on one port: it can stop and start again
    there, keeping its SQLite database and tokens (an outage)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, harness.free_port()
        self._running = ExitStack()
        self.process: harness.RegistryProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = self._running.enter_context(
            harness.registry_process(self.workdir, port=self.port)
        )

    def stop(self) -> None:
        self._running.close()

    @property
    def running(self) -> harness.RegistryProcess:
        assert self.process is not None
        return self.process

    def usage(self, client_id: str) -> dict[str, Any]:
        """The client's usage over the last day, by hour (the defaults)."""
        return dict(self.running.admin("GET", f"/clients/{client_id}/usage"))

    def billed_clients(self) -> set[str]:
        """Every client id that has usage stored, from the registry's own database."""
        with sqlite3.connect(self.workdir / "registry.db") as connection:
            rows = connection.execute("SELECT DISTINCT client_id FROM usage_minutes").fetchall()
        return {client_id for (client_id,) in rows}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    workdir = tmp_path / "registry"
    workdir.mkdir()
    real = Registry(workdir)
    real.start()
    yield real
    real.stop()


@dataclass(frozen=True)
class Client:
    client_id: str
    key: str

    @property
    def key_id(self) -> str:
        return apikeys.hash_key(self.key)[:12]


@dataclass(frozen=True)
class Clients:
    metered: Client  # its totals are the ones checked
    warmup: Client  # requests that only wait for a (re)started service
    keys_file: Path | None = None  # for a service that reads keys from a file


def registered(registry: Registry) -> Clients:
    """Two clients registered in the registry."""
    metered, warmup = (registry.running.create_client(name) for name in ("Metered", "Warm-up"))
    return Clients(
        Client(metered["client_id"], metered["api_key"]),
        Client(warmup["client_id"], warmup["api_key"]),
    )


@dataclass(frozen=True)
class Mix:
    """What one round of the known mix sends, and what the ledger must say of it."""

    ok: int = 6  # GET /status/200/100
    failing: int = 4  # GET /status/503/50
    forbidden: int = 3  # GET /billing/x: the route needs a role the client lacks
    unknown: int = 2  # an unknown key: nobody's usage

    def send(self, proxy: harness.Envoy, key: str) -> None:
        authorized = [("Authorization", f"ApiKey {key}")]
        for _ in range(self.ok):
            assert harness.send(proxy.port, "/status/200/100", authorized).status == 200
        for _ in range(self.failing):
            assert harness.send(proxy.port, "/status/503/50", authorized).status == 503
        for _ in range(self.forbidden):
            assert harness.send(proxy.port, "/billing/x", authorized).status == 403
        for _ in range(self.unknown):
            reply = harness.send(proxy.port, "/status/200/1", [("Authorization", "ApiKey azk_x")])
            assert reply.status == 401

    @property
    def upstream(self) -> int:
        return self.ok + self.failing


@dataclass
class Ports:
    grpc: int = field(default_factory=harness.free_port)
    http: int = field(default_factory=harness.free_port)
    access_log: int = field(default_factory=harness.free_port)


@contextmanager
def ledger_service(
    tmp_path: Path, clients: Clients, usage_url: str, token: str, ports: Ports
) -> Iterator[harness.Service]:
    """authz-service with the ledger on, on fixed ports (Envoy keeps pointing at them across a
    restart): keys from the registry (HTTP mode), or from the clients' keys file."""
    source: Any = {"registry": "http"} if clients.keys_file is None else {}
    with harness.authz_service(
        tmp_path,
        clients.keys_file,
        grpc_port=ports.grpc,
        http_port=ports.http,
        access_log_address=f"127.0.0.1:{ports.access_log}",
        usage_ledger="true",
        usage_flush_interval=FLUSH_INTERVAL,
        registry_url=usage_url,
        registry_token=token,
        **source,
    ) as service:
        yield service


def wait_for_access_logs(service: harness.Service, client: Client, count: int) -> None:
    """Until Envoy's access logs of the client's requests have all arrived."""
    harness.wait_until(
        lambda: (
            value(scrape(service), "authz_upstream_responses_total", client_id=client.client_id)
            >= count
        ),
        10,
        "access logs",
    )


def warm_up(proxy: harness.Envoy, clients: Clients) -> None:
    """Until Envoy reaches the (re)started service."""
    harness.wait_until(
        lambda: (
            harness.send(
                proxy.port, "/", [("Authorization", f"ApiKey {clients.warmup.key}")]
            ).status
            == 200
        ),
        20,
        "Envoy reaching authz-service",
    )


def assert_totals(registry: Registry, clients: Clients, mix: Mix, rounds: int) -> None:
    """The metered client's usage, as the registry reports it, is exactly ``rounds`` of the
    mix, all under its one key; nobody else but the warm-up client has any."""
    body = registry.usage(clients.metered.client_id)
    totals = body["totals"]
    assert totals["allowed"] == rounds * mix.upstream
    assert totals["denied"] == {"forbidden": rounds * mix.forbidden}
    assert totals["upstream"] == {
        "1xx": 0,
        "2xx": rounds * mix.ok,
        "3xx": 0,
        "4xx": 0,
        "5xx": rounds * mix.failing,
        "unknown": 0,
    }
    assert totals["response_bytes"] == rounds * (mix.ok * 100 + mix.failing * 50)
    assert totals["request_bytes"] == 0  # GETs without a body
    assert [key["key_id"] for key in body["keys"]] == [clients.metered.key_id]
    assert sum(point["allowed"] for point in body["series"]) == totals["allowed"]
    assert registry.billed_clients() <= {clients.metered.client_id, clients.warmup.client_id}


def test_totals_are_exact_across_a_graceful_restart(tmp_path: Path, registry: Registry) -> None:
    """Keys from the registry (HTTP mode). The mix, a graceful restart (SIGTERM: the last flush
    happens after the servers stop), and the mix again: the registry's totals are exactly two
    rounds of it, and the key's last_used_at is a minute of the test."""
    started = time.time()
    clients = registered(registry)
    token = registry.running.service_token()
    mix = Mix()
    ports = Ports()
    with (
        harness.echo_upstream() as upstream,
        ledger_service(tmp_path, clients, registry.url, token, ports) as first,
    ):
        config = harness.render_front_proxy(0, 0, first, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            warm_up(proxy, clients)
            mix.send(proxy, clients.metered.key)
            wait_for_access_logs(first, clients.metered, mix.upstream)
            assert first.terminate() == 0
            with ledger_service(tmp_path, clients, registry.url, token, ports) as second:
                warm_up(proxy, clients)
                mix.send(proxy, clients.metered.key)
                wait_for_access_logs(second, clients.metered, mix.upstream)
                assert second.terminate() == 0
    assert_totals(registry, clients, mix, rounds=2)
    shown = registry.running.admin("GET", f"/clients/{clients.metered.client_id}")
    (key,) = shown["keys"]
    last_used = datetime_seconds(key["last_used_at"])
    assert started - 60 < last_used <= time.time()


def datetime_seconds(text: str) -> float:
    moment = parse_time(text)
    assert moment is not None
    return moment


def test_in_http_mode_upstream_usage_is_counted_under_the_key_too(
    tmp_path: Path, registry: Registry
) -> None:
    """envoy/front-proxy-http.yaml: the key arrives in the access log as the x-authz-key-id
    metadata that Envoy made from our answer header."""
    clients = registered(registry)
    mix = Mix(ok=3, failing=2, forbidden=1, unknown=1)
    with (
        harness.echo_upstream() as upstream,
        ledger_service(
            tmp_path, clients, registry.url, registry.running.service_token(), Ports()
        ) as service,
    ):
        config = harness.render_front_proxy_http(0, 0, service, upstream.port)
        with harness.envoy(tmp_path, config) as proxy:
            warm_up(proxy, clients)
            mix.send(proxy, clients.metered.key)
            wait_for_access_logs(service, clients.metered, mix.upstream)
            assert service.terminate() == 0
    assert_totals(registry, clients, mix, rounds=1)


@dataclass
class AnswerDropper:
    """A relay in front of the registry's POST /v1/usage that can pass a batch on and then
    drop the registry's answer (the registry has counted the batch; the sender never learns
    it): the one thing the real registry cannot be made to do. While the registry is down,
    the relay drops the connection too."""

    upstream: int
    port: int = 0
    drop_answers: int = 0  # answers to drop, from the next batch on
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take_drop(self) -> bool:
        with self._lock:
            if self.drop_answers <= 0:
                return False
            self.drop_answers -= 1
            self.dropped += 1
            return True


@contextmanager
def answer_dropper(upstream: int) -> Iterator[AnswerDropper]:
    relay = AnswerDropper(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            connection = HTTPConnection("127.0.0.1", relay.upstream, timeout=10)
            try:
                connection.request("POST", self.path, body, dict(self.headers.items()))
                reply = connection.getresponse()
                answer = reply.read()
            except OSError:
                self.close_connection = True  # the registry is down: so is the relay
                return
            finally:
                connection.close()
            if relay.take_drop():
                self.close_connection = True
                return
            self.send_response(reply.status)
            for name in ("content-type", "retry-after"):
                if reply.getheader(name):
                    self.send_header(name, str(reply.getheader(name)))
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with harness.serving(server, poll_interval=0.05) as relay.port:
        yield relay


def test_totals_are_exact_across_a_registry_outage_longer_than_a_flush_interval(
    tmp_path: Path, registry: Registry
) -> None:
    """Keys from a keys file, so that checks go on while the registry is down; usage goes to
    the registry through a relay. The registry is down while the mix runs and while its
    minute is flushed, and again after: the batches wait and arrive when it is back. The first
    answer after the outage is lost on the way, so the same batch arrives twice; the registry
    counts it once. The registry has never heard of these clients: their usage is stored and
    reported all the same."""
    keys = tmp_path / "keys.yaml"
    clients = Clients(
        Client("metered", add_key(keys, "metered", "Metered")),
        Client("warmup", add_key(keys, "warmup", "Warm-up")),
        keys,
    )
    token = registry.running.service_token()
    mix = Mix()
    with answer_dropper(registry.port) as relay, harness.echo_upstream() as upstream:
        relayed = f"http://127.0.0.1:{relay.port}"
        with ledger_service(tmp_path, clients, relayed, token, Ports()) as service:
            config = harness.render_front_proxy(0, 0, service, upstream.port)
            with harness.envoy(tmp_path, config) as proxy:
                warm_up(proxy, clients)
                if time.time() % 60 > 45:  # keep the mix inside one minute, so that it is sealed
                    harness.wait_until(lambda: time.time() % 60 < 1, 20, "the next minute")
                registry.stop()
                mix.send(proxy, clients.metered.key)
                wait_for_access_logs(service, clients.metered, mix.upstream)
                minute_end = (time.time() // 60 + 1) * 60

                def failures() -> float:
                    return value(
                        scrape(service), "authz_usage_flush_failures_total", kind="unavailable"
                    )

                # The mix's minute ends (within 60 s) and is sealed; then at least two flushes
                # fail. (Flushes of the warm-up's minute may have failed before it ended.)
                harness.wait_until(lambda: time.time() > minute_end + 1, 62, "the minute's end")
                failed_before = failures()
                harness.wait_until(
                    lambda: failures() >= failed_before + 2, 30, "flushes failing while it is down"
                )
                relay.drop_answers = 1
                registry.start()
                harness.wait_until(
                    lambda: (
                        relay.dropped == 1
                        and value(scrape(service), "authz_usage_entries_buffered") == 0
                    ),
                    30,
                    "the backlog delivered",
                )
                assert_totals(registry, clients, mix, rounds=1)
                # The batch sent again was a duplicate. (Waited for here: the log is written
                # every 50 ms, and the service is killed when the block ends.)
                harness.wait_until(
                    lambda: "usage_batch_duplicate" in events(service), 5, "the duplicate logged"
                )


def events(service: harness.Service) -> list[str]:
    """The events of the service's JSON log lines, in order."""
    found = []
    for line in service.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            found.append(str(record["event"]))
    return found
