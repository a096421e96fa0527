"""The HTTP floor: an ext_authz http_service that parses each request and answers a constant 200.

python benchmarks/bare_http_server.py HOST:PORT

The same parser (httptools) and event loop (asyncio's default) as authz-service's HTTP check
server, with keep-alive, and nothing else: what any Python HTTP check server costs at least.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import cast

import httptools

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(OK)


async def serve(address: str) -> None:
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, host, int(port), reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
