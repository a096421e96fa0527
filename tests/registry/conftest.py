from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client_registry import app
from client_registry.settings import RegistrySettings
from tests.registry.postgres import create_database, postgres_server

ADMIN = "admin-token-0123456789abcdef"
SERVICE = "service-token-0123456789abcdef"
_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    with postgres_server() as server:
        yield server


@dataclass
class Registry:
    base: str
    session: aiohttp.ClientSession
    settings: RegistrySettings

    async def call(
        self, method: str, path: str, token: str | None = ADMIN, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            method, self.base + path, headers=headers, **kwargs
        ) as reply:
            text = await reply.text()
            body = None
            if text and reply.content_type == "application/json":
                body = await reply.json()
            return reply.status, body

    async def create(self, name: str = "Acme", roles: list[str] | None = None) -> dict[str, Any]:
        status, body = await self.call(
            "POST",
            "/clients",
            json={"client_name": name, "email": "ops@acme.example", "roles": roles or []},
        )
        assert status == 201, body
        return dict(body)

    async def verify(self, key: str) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/keys/verify", token=SERVICE, json={"api_key": key}
        )
        assert status == 200, body
        return dict(body)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server = request.getfixturevalue("postgres")
    return create_database(server, f"registry_{next(_databases)}")


@pytest.fixture
async def registry(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    settings = RegistrySettings(
        address="127.0.0.1:0",
        database_url=database_url,
        admin_token=ADMIN,
        service_token=SERVICE,
        tokens_file=tmp_path / "tokens.json",
        max_grace_seconds=3600,
        feed_poll_interval=0.05,
    )
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(app.serve(settings, stop, port))
    bound = await asyncio.wait_for(port, 30)
    async with aiohttp.ClientSession() as session:
        yield Registry(f"http://127.0.0.1:{bound}", session, settings)
    stop.set()
    await server
