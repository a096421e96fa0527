"""A client registry that misbehaves on cue, for the robustness suite.

It speaks the registry's contract (src/client_registry/openapi.yaml) for what authz-service
uses: ``POST /v1/keys/verify`` (answers carry the change-log ``version``), ``GET /v1/snapshot``
(JSON, or NDJSON when asked), ``GET /v1/changes`` and ``GET /v1/changes/stream`` (Server-Sent
Events: ``event: ready`` with the starting ``id`` first, then one ``event: change`` per change,
resumed by ``Last-Event-ID``; 410 when the log no longer reaches back that far). Its keys live
in memory and are set by the test.

It runs as its own process, as a real registry would:

    python -m tests.robustness.faulty_registry --token TOKEN

binds port 0 on loopback and prints ``{"event": "serving", "port": N}`` as its first line. The
test steers it through ``/_control/...`` (see ``FaultyRegistry``, which starts and drives it):
which faults are in force (``Faults``), keys and changes, raw events pushed to every open
stream, the release of held answers, and counts of what it was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from authz_service import apikeys
from authz_service.contract import format_time, identity_document

ROOT = Path(__file__).resolve().parents[2]
NDJSON = "application/x-ndjson"
HEARTBEAT_SECONDS = 5.0
HANG_SECONDS = 60.0  # a hung answer is given up after this, so that the process can stop
JSON_TYPE = "application/json"
SERVICE_TOKEN = "faulty-registry-service-token"

# What a verify answer can be made to be, besides the truth ("ok").
VERIFY_MODES = (
    "ok",
    "slow",  # the true answer, after ``delay`` seconds
    "hang",  # no answer at all
    "reset",  # the connection reset (RST) once the request is read
    "error",  # HTTP ``status`` with an error body
    "garbage",  # 200, application/json, bytes that are not JSON
    "nested",  # 200, a JSON array nested thousands deep
    "huge",  # 200, a well-formed valid answer of a megabyte
    "wrong_types",  # 200, a valid answer with a wrongly typed member (``variant`` picks which)
    "other_client",  # a valid answer naming ``client_id``'s client, whatever the key
    "expired",  # a valid answer whose valid_until has passed
    "echo",  # an answer outside the contract that quotes the key (``variant`` picks where)
    "hold",  # the true answer as of the request, sent only once the test releases it
)
# "wrong_types": what is changed in a valid answer, by name.
WRONG_TYPES: dict[str, dict[str, Any]] = {
    "valid-a-string": {"valid": "true"},
    "client-id-a-number": {"client": {"client_id": 42}},
    "roles-a-string": {"client": {"roles": "admin"}},
    "client-a-list": {"client": ["not", "an", "object"]},
    "valid-until-a-number": {"valid_until": 1700000000},
    "version-a-string": {"version": "7"},
    "client-not-active": {"client": {"status": "suspended"}},
}
# "echo": where the key is put in an answer the contract refuses.
ECHOES = ("reason", "extra-member", "client-id-list", "error-body", "text-plain", "valid-until")


@dataclass
class Faults:
    """How the registry misbehaves now; every field left out is well-behaved."""

    verify: str = "ok"  # one of VERIFY_MODES
    delay: float = 0.0  # "slow"
    status: int = 500  # "error"
    variant: str = ""  # "wrong_types" (a WRONG_TYPES name), "echo" (one of ECHOES)
    client_id: str = ""  # "other_client"
    # A stale replica: verify answers come from the state (and version) frozen when lag was
    # turned on, while the change log and its stream go on.
    lag: bool = False
    stream: str = "ok"  # "refuse": 503 with Retry-After, as at the subscriber limit
    retry_after: int = 1
    # "401" or "403": the service token refused, as by a registry that no longer knows it (401:
    # as if none were sent); its open streams end, as after a rotation.
    token: str = "accept"
    snapshot: str = "ok"  # "cut": an NDJSON snapshot without its trailer line
    versions: bool = True  # verify answers carry the change-log version (the contract's option)


@dataclass(frozen=True)
class ClientState:
    client_id: str
    name: str
    roles: tuple[str, ...]
    status: str = "active"

    def document(self) -> dict[str, Any]:
        return identity_document(self.client_id, self.name, self.roles, self.status)


@dataclass(frozen=True)
class KeyState:
    client_id: str
    refused: str | None = None  # None: the key validates; else the verify reason
    valid_until: float | None = None


@dataclass
class View:
    """What a verify answer is computed from: the live state, or a stale replica's copy."""

    version: int
    keys: dict[str, KeyState]
    clients: dict[str, ClientState]


@dataclass
class Counts:
    verify_calls: int = 0
    held: int = 0
    streams_open: int = 0
    streams_opened: int = 0
    streams_refused: int = 0
    gone: int = 0  # 410 answers
    changes_calls: int = 0
    snapshot_calls: int = 0
    rejected_tokens: int = 0
    last_event_ids: list[str] = field(default_factory=list)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Registry:
    def __init__(self, token: str) -> None:
        self.token = token
        self.faults = Faults()
        self.live = View(0, {}, {})
        self.frozen: View | None = None
        self.log: list[tuple[int, dict[str, Any]]] = []
        self.pruned_through = 0
        self.streams: set[asyncio.Queue[bytes | None]] = set()
        self.counts = Counts()
        self._release = asyncio.Event()
        self._never = asyncio.Event()

    # --- changes ---------------------------------------------------------------------------------
    def change(self, payload: dict[str, Any], silent: bool = False) -> int:
        """Record a change at the next version and push it to every open stream. A silent one
        is lost to the log at once (as if pruned), so only a resync can learn of it."""
        version = self.live.version = self.live.version + 1
        if silent:
            self.pruned_through = version
            return version
        self.log.append((version, payload))
        self.push(event(version, "change", json.dumps({"version": version, **payload})))
        return version

    def poison(self, payload: dict[str, Any]) -> int:
        """A change the contract refuses, in the log (for followers that poll), not streamed."""
        version = self.live.version = self.live.version + 1
        self.log.append((version, payload))
        return version

    def push(self, data: bytes | None) -> None:
        for queue in self.streams:
            queue.put_nowait(data)

    def upsert(self, key: str) -> int:
        state = self.live.keys[key]
        client = self.live.clients[state.client_id]
        entry = {
            "key_hash": key_hash(key),
            "key_id": key_hash(key)[:12],
            "valid_until": format_time(state.valid_until),
            "client": client.document(),
        }
        payload = {"op": "upsert", "key_hash": key_hash(key), "client_id": client.client_id}
        return self.change({**payload, "entry": entry})

    def delete(self, key: str, reason: str, silent: bool = False) -> int:
        payload = {
            "op": "delete",
            "key_hash": key_hash(key),
            "client_id": self.live.keys[key].client_id,
            "reason": reason,
        }
        return self.change(payload, silent)

    # --- verification ----------------------------------------------------------------------------
    def verdict(self, view: View, key: str) -> dict[str, Any]:
        state = view.keys.get(key)
        answer: dict[str, Any]
        if state is None:
            answer = {"valid": False, "reason": "unknown"}
        elif state.refused is not None:
            answer = {"valid": False, "reason": state.refused}
        elif view.clients[state.client_id].status != "active":
            answer = {"valid": False, "reason": "suspended"}
        else:
            answer = {
                "valid": True,
                "client": view.clients[state.client_id].document(),
                "valid_until": format_time(state.valid_until),
            }
        return {**answer, "version": view.version} if self.faults.versions else answer

    async def verify(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        self.counts.verify_calls += 1
        key = str((await request.json())["api_key"])
        answer = self.verdict(self.frozen or self.live, key)  # as of now, whenever it is sent
        faults = self.faults
        await self.delay(faults)
        if faults.verify == "reset":
            return reset(request)
        misanswer = MISANSWERS.get(faults.verify)
        if misanswer is not None:
            return misanswer(faults, key, answer)
        if faults.verify == "other_client":
            client = self.live.clients[faults.client_id].document()
            answer = {"valid": True, "client": {**client, "status": "active"}, "valid_until": None}
        return web.json_response(answer)

    async def delay(self, faults: Faults) -> None:
        """Wait as the fault in force says before answering: a while, forever, or until the
        test releases held answers."""
        if faults.verify == "slow":
            await asyncio.sleep(faults.delay)
        elif faults.verify == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._never.wait(), HANG_SECONDS)
        elif faults.verify == "hold":
            release = self._release
            self.counts.held += 1
            try:
                await release.wait()
            finally:
                self.counts.held -= 1

    # --- following changes -----------------------------------------------------------------------
    def check_since(self, since: int) -> None:
        if since < self.pruned_through or since > self.live.version:
            self.counts.gone += 1
            raise web.HTTPGone(
                text=json.dumps(
                    {
                        "error": "resync_required",
                        "message": "reload the snapshot",
                        "current_version": self.live.version,
                    }
                ),
                content_type=JSON_TYPE,
            )

    async def changes(self, request: web.Request) -> web.Response:
        self.authorize(request)
        self.counts.changes_calls += 1
        current = self.live.version
        if "since" not in request.query:
            return web.json_response(
                {"version": current, "current_version": current, "changes": []}
            )
        since = int(request.query["since"])
        limit = int(request.query.get("limit", "1000"))
        self.check_since(since)
        changes = [{"version": v, **p} for v, p in self.log if v > since][:limit]
        last = changes[-1]["version"] if changes else current
        return web.json_response({"version": last, "current_version": current, "changes": changes})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        if self.faults.stream == "refuse":
            self.counts.streams_refused += 1
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "unavailable", "message": "too many subscribers"}),
                content_type=JSON_TYPE,
                headers={"Retry-After": str(self.faults.retry_after)},
            )
        since = request.headers.get("Last-Event-ID") or request.query.get("since")
        if since is not None:
            self.counts.last_event_ids.append(since)
        start = self.live.version if since is None else int(since)
        self.check_since(start)
        # The replay and the subscription are taken together (no await in between), so that no
        # change falls between them.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        for version, payload in self.log:
            if version > start:
                queue.put_nowait(
                    event(version, "change", json.dumps({"version": version, **payload}))
                )
        self.streams.add(queue)
        self.counts.streams_open += 1
        self.counts.streams_opened += 1
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        try:
            await response.prepare(request)
            await response.write(event(start, "ready", json.dumps({"version": start})))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    data = b": heartbeat\n\n"
                if data is None:
                    break
                await response.write(data)
            await response.write_eof()
        finally:
            self.streams.discard(queue)
            self.counts.streams_open -= 1
        return response

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        self.counts.snapshot_calls += 1
        view = self.live
        etag = f'"v{view.version}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        entries = [
            {
                "key_hash": key_hash(key),
                "key_id": key_hash(key)[:12],
                "valid_until": format_time(state.valid_until),
                "client": view.clients[state.client_id].document(),
            }
            for key, state in view.keys.items()
            if state.refused is None and view.clients[state.client_id].status == "active"
        ]
        if NDJSON not in request.headers.get("Accept", ""):
            return web.json_response(
                {"version": view.version, "keys": entries}, headers={"ETag": etag}
            )
        lines = [{"version": view.version}, *entries]
        if self.faults.snapshot != "cut":
            lines.append({"end": True, "count": len(entries)})
        body = "".join(json.dumps(line) + "\n" for line in lines)
        return web.Response(text=body, content_type=NDJSON, headers={"ETag": etag})

    def authorize(self, request: web.Request) -> None:
        sent = request.headers.get("Authorization", "")
        if not sent.startswith("Bearer ") or self.faults.token == "401":
            self.counts.rejected_tokens += 1
            raise web.HTTPUnauthorized(
                text='{"error": "unauthorized", "message": "a bearer token is required"}',
                content_type=JSON_TYPE,
            )
        if self.faults.token == "403" or sent != f"Bearer {self.token}":
            self.counts.rejected_tokens += 1
            raise web.HTTPForbidden(
                text='{"error": "forbidden", "message": "wrong token"}', content_type=JSON_TYPE
            )

    # --- control, by the test --------------------------------------------------------------------
    async def control(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        action = self._actions().get(request.match_info["action"])
        if action is None:
            raise web.HTTPNotFound()
        result = action(body)
        return web.json_response(
            {"result": result, "version": self.live.version, **asdict(self.counts)}
        )

    def _actions(self) -> dict[str, Callable[[dict[str, Any]], int | None]]:
        return {
            "faults": self.set_faults,
            "key": self.add_key,
            "revoke": self.revoke,
            "restore": self.restore,
            "suspend": self.suspend,
            "event": lambda body: self.push(event(body["id"], "change", body["data"])),
            "poison-log": lambda body: self.poison(body["payload"]),
            "release": lambda _: self.release(),
            "end-streams": lambda _: self.push(None),
            "state": lambda _: None,
        }

    def set_faults(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {f.name for f in fields(Faults)}
        if unknown or body.get("verify", "ok") not in VERIFY_MODES:
            raise web.HTTPBadRequest(text=f"unknown faults: {sorted(unknown)} {body}")
        faults = Faults(**body)
        if not faults.lag:
            self.frozen = None
        elif self.frozen is None:
            self.frozen = View(self.live.version, dict(self.live.keys), dict(self.live.clients))
        if faults.token != "accept" and self.faults.token == "accept":
            self.push(None)  # a rotated token ends the streams opened with the old one
        if faults.verify != "hold":
            self.release()
        self.faults = faults

    def add_key(self, body: dict[str, Any]) -> int:
        client = ClientState(body["client_id"], body["client_name"], tuple(body["roles"]))
        self.live.clients.setdefault(client.client_id, client)
        self.live.keys[body["api_key"]] = KeyState(client.client_id, None, body["valid_until"])
        return self.upsert(body["api_key"])

    def revoke(self, body: dict[str, Any]) -> int:
        key, reason = body["api_key"], body["reason"]
        self.live.keys[key] = replace(self.live.keys[key], refused=reason)
        return self.delete(key, reason, body["silent"])

    def restore(self, body: dict[str, Any]) -> int:
        key = body["api_key"]
        self.live.keys[key] = replace(self.live.keys[key], refused=None)
        return self.upsert(key)

    def suspend(self, body: dict[str, Any]) -> int | None:
        client_id = body["client_id"]
        self.live.clients[client_id] = replace(self.live.clients[client_id], status="suspended")
        versions = [
            self.delete(key, "suspended")
            for key, state in list(self.live.keys.items())
            if state.client_id == client_id
        ]
        return max(versions, default=None)

    def release(self) -> None:
        self._release.set()
        self._release = asyncio.Event()


def event(event_id: int | str | None, name: str, data: str) -> bytes:
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


def valid_answer(key: str) -> dict[str, Any]:
    client = identity_document("echo-client", "Echo", (), "active")
    return {"valid": True, "client": client, "valid_until": None}


def merged(answer: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``answer`` with ``change`` applied one level deep (a member of ``client`` replaced)."""
    result = dict(answer)
    for name, value in change.items():
        if name == "client" and isinstance(value, dict):
            result["client"] = {**answer["client"], **value}
        else:
            result[name] = value
    return result


def echo(key: str, where: str) -> web.Response:
    """An answer the contract refuses, with the key in it, as a buggy registry might send."""
    if where == "error-body":
        return web.json_response({"error": "bad_key", "message": f"no such key {key}"}, status=400)
    if where == "text-plain":
        return web.Response(text=f"valid: {key}")
    document: dict[str, Any] = {
        "reason": {"valid": False, "reason": key},
        "extra-member": {**valid_answer(key), "api_key": key},
        "client-id-list": merged(valid_answer(key), {"client": {"client_id": [key]}}),
        "valid-until": {**valid_answer(key), "valid_until": key},
    }[where]
    return web.json_response(document)


Misanswer = Callable[[Faults, str, dict[str, Any]], web.Response]
MISANSWERS: dict[str, Misanswer] = {
    "error": lambda faults, _key, _answer: web.json_response(
        {"error": "internal", "message": "the registry failed"}, status=faults.status
    ),
    "garbage": lambda _faults, _key, _answer: web.Response(
        body=b"\x00\xff{not json", content_type=JSON_TYPE
    ),
    "nested": lambda _faults, _key, _answer: web.Response(
        text="[" * 5000 + "]" * 5000, content_type=JSON_TYPE
    ),
    "huge": lambda _faults, _key, answer: web.json_response({**answer, "padding": "x" * (1 << 20)}),
    "wrong_types": lambda faults, key, _answer: web.json_response(
        merged(valid_answer(key), WRONG_TYPES[faults.variant])
    ),
    "expired": lambda _faults, key, _answer: web.json_response(
        {**valid_answer(key), "valid_until": format_time(time.time() - 60)}
    ),
    "echo": lambda faults, key, _answer: echo(key, faults.variant),
}


def reset(request: web.Request) -> web.Response:
    """Reset the connection: SO_LINGER 0 makes the close an RST rather than a FIN."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


def build_app(registry: Registry) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/keys/verify", registry.verify)
    app.router.add_get("/v1/snapshot", registry.snapshot)
    app.router.add_get("/v1/changes", registry.changes)
    app.router.add_get("/v1/changes/stream", registry.stream)
    app.router.add_route("*", "/_control/{action}", registry.control)
    return app


async def serve(token: str) -> None:
    registry = Registry(token)
    runner = web.AppRunner(build_app(registry), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    registry.push(None)
    registry.release()
    await runner.cleanup()


# --- the test's side: start it, steer it --------------------------------------------------------
@dataclass
class FaultyRegistry:
    """A running faulty registry and the test's controls."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    async def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/_control/{action}", json=body or {}) as reply,
        ):
            if reply.status != 200:
                raise RuntimeError(f"control {action}: HTTP {reply.status}: {await reply.text()}")
            result: dict[str, Any] = await reply.json()
            return result

    async def faults(self, **faults: Any) -> None:
        """Put exactly these faults in force (all others off)."""
        await self.control("faults", faults)

    async def add_key(
        self,
        client_id: str,
        *,
        key: str | None = None,
        roles: tuple[str, ...] = (),
        valid_until: float | None = None,
    ) -> str:
        """A key that validates, for ``client_id`` (created if new); an upsert change."""
        key = key or apikeys.generate()
        await self.control(
            "key",
            {
                "api_key": key,
                "client_id": client_id,
                "client_name": f"Client {client_id}",
                "roles": list(roles),
                "valid_until": valid_until,
            },
        )
        return key

    async def revoke(self, key: str, reason: str = "revoked", *, silent: bool = False) -> int:
        """Revoke a key (a delete change); return its version. ``silent``: the change is
        made but lost to the change log, as if pruned."""
        reply = await self.control("revoke", {"api_key": key, "reason": reason, "silent": silent})
        return int(reply["result"])

    async def restore(self, key: str) -> int:
        return int((await self.control("restore", {"api_key": key}))["result"])

    async def suspend(self, client_id: str) -> int:
        return int((await self.control("suspend", {"client_id": client_id}))["result"])

    async def event(self, data: str, event_id: str | None = None) -> None:
        """Push a raw ``change`` event (``data`` as is) to every open stream."""
        await self.control("event", {"data": data, "id": event_id})

    async def poison_log(self, payload: dict[str, Any]) -> int:
        """Put ``payload`` in the change log as the next change, unchecked and not streamed."""
        return int((await self.control("poison-log", {"payload": payload}))["result"])

    async def release(self) -> None:
        await self.control("release")

    async def end_streams(self) -> None:
        await self.control("end-streams")

    async def state(self) -> dict[str, Any]:
        return await self.control("state")

    async def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], what: str, within: float = 5.0
    ) -> dict[str, Any]:
        """Poll the counts until ``condition`` holds."""
        state: dict[str, Any] = await poll(self.state, condition, what, within)
        return state


async def poll(
    read: Callable[[], Awaitable[Any]],
    condition: Callable[[Any], bool],
    what: str,
    within: float,
) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await read()
        if condition(value):
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"no {what} within {within}s (last: {value!r:.500})")
        await asyncio.sleep(0.01)


@contextmanager
def faulty_registry(workdir: Path, token: str = SERVICE_TOKEN) -> Iterator[FaultyRegistry]:
    """Start the faulty registry as its own process (port 0, reported on its first line)."""
    log_path = workdir / "faulty-registry.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.robustness.faulty_registry", "--token", token],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        port = _reported_port(process, log_path, within=20)
        yield FaultyRegistry(f"http://127.0.0.1:{port}", token, process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _reported_port(process: subprocess.Popen[bytes], log_path: Path, within: float) -> int:
    """The port from the child's first line; its exit fails the wait at once."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(within):
            raise TimeoutError(f"faulty registry reported no port within {within}s")
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise RuntimeError(
            f"faulty registry exited with code {process.returncode}: {log_path.read_text()[-2000:]}"
        )
    return int(json.loads(line)["port"])


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a client registry that misbehaves on cue.")
    parser.add_argument("--token", required=True, help="the service token it accepts")
    args = parser.parse_args()
    asyncio.run(serve(args.token))


if __name__ == "__main__":
    main()
