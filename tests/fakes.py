"""Test doubles for unit tests and in-process servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from authz_service import apikeys
from authz_service.contract import Answer
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import Known, Lookup


class FakeRegistry:
    """A ``Registry`` answering from a dict of keys. By default every lookup waits (a coroutine
    the check runs on the event loop), where delays and errors are injected; ``in_memory``
    answers at once instead, as the keys file and the snapshot do."""

    def __init__(
        self,
        answers: Mapping[str, Known],
        delay: float = 0.0,
        error: Exception | None = None,
        in_memory: bool = False,
    ) -> None:
        self.answers = {apikeys.digest(key): answer for key, answer in answers.items()}
        self.delay = delay
        self.error = error
        self.in_memory = in_memory
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

    def invalidate(self, digest: bytes | None, client_id: str | None) -> None:
        return None

    def lookup(self, credential: Credential) -> Lookup:
        if self.in_memory:
            self.lookups += 1
            return self.answers.get(credential.digest, Reason.UNKNOWN_KEY)
        return self._ask(credential)

    async def _ask(self, credential: Credential) -> Known:
        self.lookups += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.answers.get(credential.digest, Reason.UNKNOWN_KEY)


class FakeVerifier:
    """The registry's validation endpoint, for the resolver: answers from a dict of keys, can
    fail, and can hold answers until a test releases them (``hold``), to force interleavings."""

    def __init__(self, answers: Mapping[str, Answer | Known]) -> None:
        self.answers = {
            apikeys.digest(key): answer if isinstance(answer, Answer) else Answer(answer)
            for key, answer in answers.items()
        }
        self.error: Exception | None = None
        self.calls = 0
        self.started = asyncio.Event()  # set when a call begins
        self.release: asyncio.Event | None = None  # when set, calls wait for it

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def hold(self) -> asyncio.Event:
        """Make calls wait until the returned event is set."""
        self.release = asyncio.Event()
        return self.release

    async def verify(self, credential: Credential) -> Answer:
        self.calls += 1
        answer = self.answers.get(credential.digest, Answer(Reason.UNKNOWN_KEY))
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return answer


async def wait_for(condition: Callable[[], object], within: float = 3.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
