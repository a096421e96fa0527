"""The registry client's connections (``registry.origin``), against raw servers on loopback that
answer exactly as each test says: kept-alive connections are reused, a connection is never
reused with an answer still on its way, and whatever is not a whole HTTP answer within the
bounds is an error."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from authz_service.registry.origin import (
    MAX_HEADER_BYTES,
    InvalidResponseError,
    Origin,
    UnsentError,
)

Answer = Callable[[int, bytes], Awaitable[bytes | None]]  # (request number, request) -> answer


def ok(body: bytes, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Served:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0


@asynccontextmanager
async def serving(
    answer: Answer, *, close_after_each: bool = False, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Served]:
    """A server that reads each request (headers and Content-Length body) and writes what
    ``answer`` returns (None: closes the connection without answering)."""
    served = Served()
    handlers: set[asyncio.Task[object]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        task = asyncio.current_task()
        assert task is not None  # a connection's handler is a task
        handlers.add(task)
        writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                served.requests.append(request)
                reply = await answer(len(served.requests), request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, ssl=tls)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()
        for writer in writers:
            writer.close()  # the handlers' reads end
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 5)
        await server.wait_closed()


def origin(served: Served, path: str = "") -> Origin:
    return Origin(
        f"http://127.0.0.1:{served.port}{path}", {"Authorization": "Bearer t"}, max_body=1024
    )


async def numbered(number: int, _: bytes) -> bytes:
    return ok(b'{"n": %d}' % number)


async def test_a_reply_is_the_status_the_media_type_and_the_body() -> None:
    async with serving(numbered) as served:
        client = origin(served, "/base/")
        reply = await client.request("POST", "/v1/keys/verify", b'{"a": 1}', "application/json")
        client.close()
    assert reply == (200, "application/json", b'{"n": 1}')
    request = served.requests[0]
    assert request.startswith(b"POST /base/v1/keys/verify HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer t\r\n" in request
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % served.port in request
    assert request.endswith(b'\r\n\r\n{"a": 1}')


async def test_https_is_verified_against_the_system_s_authorities(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(tls)
    async with serving(numbered, tls=tls) as served:
        url = f"https://localhost:{served.port}"
        untrusted = Origin(url, {}, max_body=1024)  # built before the authority is trusted
        with pytest.raises(UnsentError):
            await untrusted.request("GET", "/x")
        authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        client = Origin(url, {}, max_body=1024)
        replies = [await client.request("GET", "/x") for _ in range(3)]
        client.close()
    assert [reply.body for reply in replies] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert served.connections == 1  # one for all three (the refused handshake served none)


async def test_kept_alive_connections_are_reused() -> None:
    async with serving(numbered) as served:
        client = origin(served)
        replies = [await client.request("GET", "/x") for _ in range(20)]
        client.close()
    assert [reply.body for reply in replies] == [b'{"n": %d}' % n for n in range(1, 21)]
    assert served.connections == 1


async def test_concurrent_requests_each_get_a_connection_of_their_own() -> None:
    async def slowly(number: int, request: bytes) -> bytes:
        await asyncio.sleep(0.02)
        return await numbered(number, request)

    async with serving(slowly) as served:
        client = origin(served)
        replies = await asyncio.gather(*(client.request("GET", "/x") for _ in range(5)))
        again = [await client.request("GET", "/x") for _ in range(5)]
        client.close()
    assert sorted(reply.body for reply in replies + again) == sorted(
        b'{"n": %d}' % n for n in range(1, 11)
    )
    assert served.connections == 5


async def test_a_connection_the_server_closed_is_not_used_again() -> None:
    async with serving(numbered, close_after_each=True) as served:
        client = origin(served)
        first = await client.request("GET", "/x")
        await asyncio.sleep(0.05)  # the server's close arrives
        second = await client.request("GET", "/x")
        client.close()
    assert (first.body, second.body) == (b'{"n": 1}', b'{"n": 2}')
    assert served.connections == 2


async def test_after_a_kept_alive_connection_fails_unsent_the_others_are_not_trusted() -> None:
    """The registry closes each connection when its second request arrives, as a restarting
    registry would close them all: the first such request is unsent, and the one after it
    (the caller's retry) gets a fresh connection rather than another closed one."""
    per_connection: dict[int, int] = {}

    async def first_only(number: int, request: bytes) -> bytes | None:
        connection = id(asyncio.current_task())
        per_connection[connection] = per_connection.get(connection, 0) + 1
        if per_connection[connection] > 1:
            return None
        await asyncio.sleep(0.02)  # so that the first two need a connection each
        return await numbered(number, request)

    async with serving(first_only) as served:
        client = origin(served)
        await asyncio.gather(client.request("GET", "/x"), client.request("GET", "/x"))
        with pytest.raises(UnsentError):
            await client.request("GET", "/x")
        reply = await client.request("GET", "/x")
        client.close()
    assert reply.status == 200
    assert served.connections == 3


async def test_a_connection_closed_before_any_answer_is_unsent() -> None:
    async def hang_up(number: int, request: bytes) -> None:
        return None

    async with serving(hang_up) as served:
        client = origin(served)
        with pytest.raises(UnsentError):
            await client.request("GET", "/x")
        client.close()


async def test_a_refused_connection_is_unsent() -> None:
    async with serving(numbered) as served:
        pass  # closed: nothing listens there any more
    with pytest.raises(UnsentError):
        await origin(served).request("GET", "/x")


async def test_a_cancelled_request_never_leaves_its_answer_to_the_next() -> None:
    async def first_late(number: int, request: bytes) -> bytes:
        if number == 1:
            await asyncio.sleep(0.2)
        return await numbered(number, request)

    async with serving(first_late) as served:
        client = origin(served)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.request("GET", "/x")
        second = await client.request("GET", "/x")
        client.close()
    assert second.body == b'{"n": 2}'


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not HTTP"),
        pytest.param(ok(b"x" * 1025), id="a body over the limit"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n",
            id="headers over the limit",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10, id="cut short"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n{}", id="delimited by the connection's end"),
    ],
)
async def test_what_is_not_a_whole_answer_within_the_bounds_is_an_error(reply: bytes) -> None:
    async def then_close(number: int, request: bytes) -> bytes | None:
        return reply

    async with serving(then_close, close_after_each=True) as served:
        client = origin(served)
        with pytest.raises(InvalidResponseError):
            await client.request("GET", "/x")
        client.close()


def test_header_values_that_could_split_a_request_are_refused() -> None:
    with pytest.raises(ValueError, match="printable"):
        Origin("http://127.0.0.1:1", {"Authorization": "Bearer t\r\nX-Evil: 1"}, max_body=1)
