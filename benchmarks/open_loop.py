"""An open-loop HTTP/1.1 load generator: requests at a fixed rate, latency from the schedule.

wrk is closed-loop: a slow answer delays the requests behind it, so it under-reports the tail
(coordinated omission). Here request i is due at ``start + i / rate`` whatever happened before,
and its latency runs from that due time to the end of its answer, so time spent waiting for a
free connection, or behind a late send, is counted. The event loop polls with select(), whose
timeout has microsecond resolution (epoll's is a millisecond, as large as the effects measured).
"""

from __future__ import annotations

import asyncio
import selectors
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import httptools


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)  # seconds, from each due time
    lateness: list[float] = field(default_factory=list)  # seconds each send came after its due time
    failures: int = 0  # answers other than 200


class _Connection(asyncio.Protocol):
    transport: asyncio.Transport  # set once connected, before the connection is used

    def __init__(self, generator: _Generator) -> None:
        self._generator = generator
        self._parser = httptools.HttpResponseParser(self)
        self.due = 0.0  # the due time of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        self._generator.answered(self, self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._generator.lost(self)


class _Generator:
    def __init__(self, request: bytes, measure_from: float, run: Run) -> None:
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._measure_from = measure_from  # answers to requests due earlier are the warm-up
        self._run = run
        self.idle: deque[_Connection] = deque()
        self._backlog: deque[float] = deque()  # due times of requests waiting for a connection
        self.outstanding = 0
        self.done = asyncio.Event()
        self.broken: str | None = None
        self.finished = False

    def send(self, due: float) -> None:
        self.outstanding += 1
        if self.idle:
            self._write(self.idle.popleft(), due)
        else:
            self._backlog.append(due)

    def _write(self, connection: _Connection, due: float) -> None:
        connection.due = due
        if due >= self._measure_from:
            self._run.lateness.append(self._loop.time() - due)
        connection.transport.write(self._request)

    def answered(self, connection: _Connection, status: int) -> None:
        if connection.due >= self._measure_from:
            self._run.latencies.append(self._loop.time() - connection.due)
            if status != 200:
                self._run.failures += 1
        self.outstanding -= 1
        if self._backlog:
            self._write(connection, self._backlog.popleft())
        else:
            self.idle.append(connection)
        if not self.outstanding:
            self.done.set()

    def lost(self, connection: _Connection) -> None:
        if not self.finished:
            self.broken = "a connection closed during the run"
            self.done.set()


async def _drive(
    host: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    connections: int,
) -> Run:
    loop = asyncio.get_running_loop()
    run = Run()
    start = loop.time() + 0.1
    generator = _Generator(request, start + warmup, run)
    for _ in range(connections):
        _, connection = await loop.create_connection(lambda: _Connection(generator), host, port)
        generator.idle.append(connection)
    for i in range(int((warmup + seconds) * rate)):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if generator.broken:
            break
        generator.send(due)
    if generator.outstanding:
        generator.done.clear()
        await asyncio.wait_for(generator.done.wait(), 30)
    generator.finished = True
    for connection in generator.idle:
        connection.transport.close()
    await asyncio.sleep(0)  # lets the transports finish closing
    if generator.broken:
        raise RuntimeError(generator.broken)
    return run


def run(
    host: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    seconds: float,
    warmup: float = 1.0,
    connections: int = 32,
) -> Run:
    """Send ``request`` at ``rate`` per second for ``warmup + seconds`` over ``connections``
    kept-alive connections; report the requests due after the warm-up."""
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        return loop.run_until_complete(
            _drive(
                host,
                port,
                request,
                rate=rate,
                seconds=seconds,
                warmup=warmup,
                connections=connections,
            )
        )
    finally:
        loop.close()
