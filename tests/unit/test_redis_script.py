"""The rate limits' Redis client: one pipelined connection whose replies are matched to calls in
order, however they are split on the wire; NOSCRIPT answered with EVAL; a timeout or a lost
connection fails the calls waiting on it, and the next call connects afresh. Against a fake
Redis that speaks RESP (the real one is in the end-to-end tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from authz_service.redis_script import RedisError, RedisScript, _parse
from tests.e2e.harness import free_port

SCRIPT = "return {1, ARGV[1]}"


class FakeRedis:
    """Reads RESP commands; answers each with ``answer(command)`` (None: no answer)."""

    def __init__(self, answer: Callable[[list[bytes]], bytes | None]) -> None:
        self.answer = answer
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                count = int((await reader.readline())[1:])
                command = []
                for _ in range(count):
                    length = int((await reader.readline())[1:])
                    command.append((await reader.readexactly(length + 2))[:-2])
                self.commands.append(command)
                reply = self.answer(command)
                if reply is not None:
                    # Byte by byte: the client must put replies together itself.
                    for index in range(len(reply)):
                        writer.write(reply[index : index + 1])
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()


def ok(command: list[bytes]) -> bytes:
    return b"*2\r\n:1\r\n$%d\r\n%s\r\n" % (len(command[-1]), command[-1])


@pytest.fixture
async def fake() -> AsyncIterator[Callable[..., object]]:
    servers: list[FakeRedis] = []

    async def start(answer: Callable[[list[bytes]], bytes | None] = ok) -> FakeRedis:
        server = FakeRedis(answer)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    fake: Callable[..., object],
) -> None:
    server = await fake()  # type: ignore[misc]
    script = RedisScript(f"redis://127.0.0.1:{server.port}", SCRIPT, timeout=5)
    try:
        replies = await asyncio.gather(*(script.call(["k"], [n]) for n in range(20)))
    finally:
        await script.close()
    assert replies == [[1, str(n).encode()] for n in range(20)]
    assert server.connections == 1
    assert {c[0] for c in server.commands} == {b"EVALSHA"}


async def test_a_redis_without_the_script_gets_it_once_with_eval(
    fake: Callable[..., object],
) -> None:
    def answer(command: list[bytes]) -> bytes:
        if command[0] == b"EVALSHA":
            return b"-NOSCRIPT No matching script.\r\n"
        return ok(command)

    server = await fake(answer)  # type: ignore[misc]
    script = RedisScript(f"redis://127.0.0.1:{server.port}", SCRIPT, timeout=5)
    try:
        assert await script.call(["k"], [7]) == [1, b"7"]
    finally:
        await script.close()
    assert [c[0] for c in server.commands] == [b"EVALSHA", b"EVAL"]
    assert server.commands[1][1] == SCRIPT.encode()


async def test_the_urls_password_user_and_database_are_used_first(
    fake: Callable[..., object],
) -> None:
    server = await fake(lambda c: b"+OK\r\n" if c[0] in {b"AUTH", b"SELECT"} else ok(c))  # type: ignore[misc]
    script = RedisScript(f"redis://app:s%40cret@127.0.0.1:{server.port}/3", SCRIPT, timeout=5)
    try:
        await script.call(["k"], [1])
    finally:
        await script.close()
    assert server.commands[:2] == [[b"AUTH", b"app", b"s@cret"], [b"SELECT", b"3"]]


async def test_an_error_reply_fails_that_call_only(fake: Callable[..., object]) -> None:
    replies = iter([b"-ERR boom\r\n", None])

    def answer(command: list[bytes]) -> bytes:
        return next(replies) or ok(command)

    server = await fake(answer)  # type: ignore[misc]
    script = RedisScript(f"redis://127.0.0.1:{server.port}", SCRIPT, timeout=5)
    try:
        with pytest.raises(RedisError, match="ERR boom"):
            await script.call(["k"], [1])
        assert await script.call(["k"], [2]) == [1, b"2"]
    finally:
        await script.close()
    assert server.connections == 1


async def test_a_timeout_fails_the_call_and_the_next_call_connects_afresh(
    fake: Callable[..., object],
) -> None:
    silent = {"on": True}
    server = await fake(lambda c: None if silent["on"] else ok(c))  # type: ignore[misc]
    script = RedisScript(f"redis://127.0.0.1:{server.port}", SCRIPT, timeout=0.05)
    try:
        with pytest.raises(TimeoutError):
            await script.call(["k"], [1])
        silent["on"] = False
        assert await script.call(["k"], [2]) == [1, b"2"]
    finally:
        await script.close()
    assert server.connections == 2


async def test_a_redis_that_is_not_there_is_an_error_not_a_hang() -> None:
    port = free_port()  # nothing listens there
    script = RedisScript(f"redis://127.0.0.1:{port}", SCRIPT, timeout=1)
    with pytest.raises(ConnectionRefusedError):
        await script.call(["k"], [1])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"+OK\r\n", (b"OK", 5)),
        (b":42\r\n", (42, 5)),
        (b"$3\r\nabc\r\n", (b"abc", 9)),
        (b"$-1\r\n", (None, 5)),
        (b"*2\r\n:1\r\n$1\r\nx\r\n", ([1, b"x"], 15)),
        (b"*2\r\n:1\r\n$1\r\n", None),
        (b"$3\r\nab", None),
        (b":4", None),
    ],
)
def test_replies_are_read_whole_or_not_at_all(raw: bytes, expected: object) -> None:
    assert _parse(bytearray(raw), 0) == expected


@pytest.mark.parametrize("raw", [b"?\r\n", b":x\r\n", b"$abc\r\n"])
def test_what_is_not_resp_is_an_error(raw: bytes) -> None:
    with pytest.raises(RedisError):
        _parse(bytearray(raw), 0)
