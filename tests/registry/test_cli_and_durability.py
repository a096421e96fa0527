"""The registry as operators run it: zero-configuration start, the management commands, crash
safety, and several replicas on one PostgreSQL database."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.request
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authz_service import apikeys
from client_registry.db import MIGRATIONS, Database
from tests.e2e import harness
from tests.e2e.harness import registry_process
from tests.registry.postgres import create_database

pytestmark = pytest.mark.e2e


def cli(workdir: Path, url: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "client_registry", "clients", "--url", url, *args],
        cwd=workdir,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_serve_needs_no_configuration_and_the_commands_manage_clients(tmp_path: Path) -> None:
    """SQLite and tokens are created on first start; create, get, regenerate and revoke print
    JSON; the tokens file is private and no key reaches the log."""
    with registry_process(tmp_path) as running:
        created = cli(
            tmp_path,
            running.url,
            "create",
            "--name",
            "Demo",
            "--email",
            "d@example.com",
            "--roles",
            "reader",
        )
        key = str(created["api_key"])
        assert apikeys.has_valid_checksum(key)
        shown = cli(tmp_path, running.url, "get", str(created["client_id"]))
        assert shown["roles"] == ["reader"]
        regenerated = cli(tmp_path, running.url, "regenerate", str(created["client_id"]))
        assert regenerated["api_key"] != key
        assert cli(tmp_path, running.url, "revoke", str(created["client_id"])) == {"ok": True}
        assert len(cli(tmp_path, running.url, "list")["clients"]) == 1
    assert (tmp_path / "registry.db").exists()
    assert (tmp_path / "registry-tokens.json").stat().st_mode & 0o777 == 0o600
    log = (tmp_path / "registry.log").read_text()
    assert key not in log
    assert str(regenerated["api_key"]) not in log


def test_the_commands_set_rate_limits_and_export_usage(tmp_path: Path) -> None:
    """create --rate-limit, set-rate-limit N/UNIT and none, and usage, which reads back a
    batch recorded by the registry, as JSON."""
    with registry_process(tmp_path) as running:
        created = cli(
            tmp_path,
            running.url,
            "create",
            "--name",
            "Limited",
            "--email",
            "l@example.com",
            "--rate-limit",
            "5/second",
        )
        client_id = str(created["client_id"])
        assert created["rate_limit"] == {"requests_per_unit": 5, "unit": "second"}
        hourly = cli(tmp_path, running.url, "set-rate-limit", client_id, "100/hour")
        assert hourly["rate_limit"] == {"requests_per_unit": 100, "unit": "hour"}
        assert cli(tmp_path, running.url, "set-rate-limit", client_id, "none")["rate_limit"] is None
        entry = {
            "key_id": created["key_id"],
            "client_id": client_id,
            "minute": "2025-01-31T23:59:00Z",
            "allowed": 3,
            "denied": {},
            "upstream": {"2xx": 3},
            "request_bytes": 0,
            "response_bytes": 30,
        }
        request = urllib.request.Request(  # noqa: S310 (the registry started here, on loopback)
            running.url + "/v1/usage",
            data=json.dumps({"batch_id": "cli", "source": "test", "usage": [entry]}).encode(),
            headers={
                "Authorization": f"Bearer {running.service_token()}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            assert json.loads(reply.read())["accepted"] == 1
        exported = cli(
            tmp_path,
            running.url,
            "usage",
            client_id,
            "--from",
            "2025-01-01T00:00:00Z",
            "--to",
            "2025-02-01T00:00:00Z",
            "--granularity",
            "day",
        )
        assert exported["totals"]["allowed"] == 3
        assert exported["series"][0]["start"] == "2025-01-31T00:00:00Z"
        last_used = cli(tmp_path, running.url, "get", client_id)["keys"][0]["last_used_at"]
        assert last_used == "2025-01-31T23:59:00Z"


@pytest.mark.parametrize("limit", ["5/week", "0/second", "five/second", "5"])
def test_a_malformed_rate_limit_is_refused_before_any_call(tmp_path: Path, limit: str) -> None:
    """Exit status 2 and the form expected; the registry is not asked."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "client_registry",
            "clients",
            "--url",
            "http://127.0.0.1:1",
            "set-rate-limit",
            "cl_x",
            limit,
        ],
        cwd=tmp_path,
        env={**os.environ, "REGISTRY_ADMIN_TOKEN": "a" * 32},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "expected N/UNIT" in result.stderr


def test_acknowledged_writes_survive_a_crash(tmp_path: Path) -> None:
    """Killed with SIGKILL right after a 201, the registry restarts with the client and key."""
    with registry_process(tmp_path) as running:
        created = cli(
            tmp_path, running.url, "create", "--name", "Durable", "--email", "d@example.com"
        )
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
    with registry_process(tmp_path) as running:
        assert (
            cli(tmp_path, running.url, "get", str(created["client_id"]))["client_name"] == "Durable"
        )


def test_a_failed_operation_leaves_nothing_behind(tmp_path: Path) -> None:
    """An operation that fails half-way is rolled back whole (no half-regenerated key)."""
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()

    def half_done(tx: object) -> None:
        tx.execute(  # type: ignore[attr-defined]
            "INSERT INTO changes (at, payload) VALUES (%s, %s)", (0, "{}")
        )
        raise RuntimeError("crash between two statements")

    with pytest.raises(RuntimeError):
        db.run_sync(half_done, write=True)
    assert db.run_sync(lambda tx: tx.one("SELECT COUNT(*) FROM changes")) == (0,)
    assert db.migrate() == len(MIGRATIONS)  # migrations are idempotent
    db.close()


def test_two_replicas_share_one_postgresql_database(tmp_path: Path, postgres: str) -> None:
    """A key created through one replica verifies through the other, and a revocation made on
    one reaches the other's change stream, with the version its verdicts then carry."""
    url = create_database(postgres, "replicas")
    env = {
        "REGISTRY_DATABASE_URL": url,
        "REGISTRY_ADMIN_TOKEN": "a" * 32,
        "REGISTRY_SERVICE_TOKEN": "s" * 32,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        registry_process(tmp_path / "a", env=env) as first_registry,
        registry_process(tmp_path / "b", env=env) as second_registry,
    ):
        created = cli(
            tmp_path / "a",
            first_registry.url,
            "create",
            "--name",
            "Shared",
            "--email",
            "s@example.com",
            env=env,
        )
        assert verify(second_registry.url, str(created["api_key"]))["valid"] is True
        connection, stream = change_stream(second_registry.url)
        with closing(connection):
            cli(tmp_path / "a", first_registry.url, "revoke", str(created["client_id"]), env=env)
            event = next_event(stream)
        assert event["op"] == "delete"
        assert event["key_hash"] == apikeys.hash_key(str(created["api_key"]))
        verdict = verify(second_registry.url, str(created["api_key"]))
        assert (verdict["valid"], verdict["reason"]) == (False, "revoked")
        assert verdict["version"] == event["version"]


def change_stream(base: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Subscribe to the change feed from the current version on."""
    connection = http.client.HTTPConnection("127.0.0.1", int(base.rpartition(":")[2]), timeout=5)
    headers = {"Authorization": "Bearer " + "s" * 32}
    connection.request("GET", "/v1/snapshot", headers=headers)
    version = json.loads(connection.getresponse().read())["version"]
    connection.request("GET", f"/v1/changes/stream?since={version}", headers=headers)
    reply = connection.getresponse()
    assert reply.status == 200
    return connection, reply


def next_event(stream: http.client.HTTPResponse) -> dict[str, object]:
    """The data of the next change event (the ready event and comments are skipped)."""
    name = ""
    while True:
        line = stream.readline().decode()
        if line.startswith("event: "):
            name = line.removeprefix("event: ").strip()
        if line.startswith("data: ") and name == "change":
            return dict(json.loads(line.removeprefix("data: ")))


def verify(base: str, key: str) -> dict[str, object]:
    port = int(base.rpartition(":")[2])
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as connection:
        connection.request(
            "POST",
            "/v1/keys/verify",
            json.dumps({"api_key": key}),
            {"Authorization": "Bearer " + "s" * 32, "Content-Type": "application/json"},
        )
        reply = connection.getresponse()
        assert reply.status == 200
        return dict(json.loads(reply.read()))


def test_an_unreachable_database_stops_serve_with_one_clear_line(tmp_path: Path) -> None:
    """Exit status 1 and the reason, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "client_registry", "serve"],
        cwd=tmp_path,
        env={**os.environ, "REGISTRY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot start: cannot open the postgresql database" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_commands_never_follow_a_redirect_with_the_admin_token(tmp_path: Path) -> None:
    """A registry URL that redirects (a misconfigured proxy, say) is an error: the token is
    not sent on to where it points."""
    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("authorization"))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    with harness.serving(ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)) as elsewhere:

        class Redirecting(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(307)
                self.send_header("location", f"http://127.0.0.1:{elsewhere}{self.path}")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        with harness.serving(ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)) as port:
            result = subprocess.run(
                [sys.executable, "-m", "client_registry", "clients", "list"],
                cwd=tmp_path,
                env={
                    **os.environ,
                    "REGISTRY_URL": f"http://127.0.0.1:{port}",
                    "REGISTRY_ADMIN_TOKEN": "a" * 32,
                },
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
    assert result.returncode != 0
    assert seen == []
