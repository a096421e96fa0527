from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    parts: app.Running | None = None

    @property
    def running(self) -> app.Running:
        assert self.parts is not None, "a registry served in this process"
        return self.parts

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
        """The verdict, without its change-log version (which tests of their own check)."""
        verdict = await self.verify_versioned(key)
        assert isinstance(verdict.pop("version"), int)
        return verdict

    async def verify_versioned(self, key: str) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/keys/verify", token=SERVICE, json={"api_key": key}
        )
        assert status == 200, body
        return dict(body)


class Event(NamedTuple):
    """One Server-Sent Event."""

    id: int | None
    name: str
    data: dict[str, Any]


async def read_event(stream: aiohttp.ClientResponse) -> Event:
    """The next event of a change stream (comments, such as heartbeats, are skipped)."""
    fields: dict[str, str] = {}
    while True:
        line = (await stream.content.readline()).decode()
        if not line:
            raise EOFError("the change stream ended")
        line = line.rstrip("\n")
        if not line:
            if "data" in fields:
                number = fields.get("id")
                return Event(
                    None if number is None else int(number),
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            continue
        if not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server = request.getfixturevalue("postgres")
    return create_database(server, f"registry_{next(_databases)}")


@pytest.fixture
def registry_settings(database_url: str, tmp_path: Path) -> RegistrySettings:
    return RegistrySettings(
        address="127.0.0.1:0",
        database_url=database_url,
        admin_token=ADMIN,
        service_token=SERVICE,
        tokens_file=tmp_path / "tokens.json",
        max_grace_seconds=3600,
        feed_poll_interval=0.05,
    )


@contextlib.asynccontextmanager
async def started(settings: RegistrySettings, **changes: Any) -> AsyncIterator[Registry]:
    """A registry served in this process, with ``changes`` to its settings."""
    settings = dataclasses.replace(settings, **changes)
    async with app.running(settings) as parts, aiohttp.ClientSession() as session:
        yield Registry(f"http://127.0.0.1:{parts.port}", session, settings, parts)


@pytest.fixture
async def registry(registry_settings: RegistrySettings) -> AsyncIterator[Registry]:
    async with started(registry_settings) as running:
        yield running
