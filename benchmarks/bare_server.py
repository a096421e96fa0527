"""The floor: an Authorization servicer that parses the request and answers a constant OK.

python benchmarks/bare_server.py aio|sync ADDRESS
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

OK = CheckResponse()
OK.status.code = 0


class AsyncBare(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: CheckRequest, context: Any) -> CheckResponse:  # noqa: N802
        return OK


class SyncBare(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def Check(self, request: CheckRequest, context: Any) -> CheckResponse:  # noqa: N802
        return OK


async def serve_aio(address: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AsyncBare(), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def serve_sync(address: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SyncBare(), server)
    server.add_insecure_port(address)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    mode, address = sys.argv[1], sys.argv[2]
    if mode == "aio":
        asyncio.run(serve_aio(address))
    else:
        serve_sync(address)
