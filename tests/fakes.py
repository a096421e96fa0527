"""Test doubles for unit tests and in-process servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from authz_service.model import Client, Credential
from authz_service.reasons import Reason


class FakeRegistry:
    """Answers from a dict; can be told to hang or to fail."""

    def __init__(
        self,
        answers: dict[str, Client | Reason],
        delay: float = 0.0,
        error: Exception | None = None,
    ) -> None:
        self.answers = answers
        self.delay = delay
        self.error = error
        self.lookups = 0

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def find_client(self, client_id: str) -> Client | None:
        clients = (c for c in self.answers.values() if isinstance(c, Client))
        return next((c for c in clients if c.client_id == client_id), None)

    def lookup_now(self, credential: Credential) -> None:
        return None  # always take the waiting path, where delays and errors are injected

    async def lookup(self, credential: Credential) -> Client | Reason:
        self.lookups += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.answers.get(credential.key_hash, Reason.UNKNOWN_KEY)


async def wait_for(condition: Callable[[], object], within: float = 3.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
