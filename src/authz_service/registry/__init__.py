"""Where keys are resolved to clients. Every backend implements the one ``Registry`` protocol."""

from __future__ import annotations

from typing import Protocol

from authz_service.model import Client, Credential
from authz_service.reasons import Reason


class Registry(Protocol):
    """A source of truth for API keys.

    ``lookup`` answers with the key's client, or with the reason the key must be refused
    (``UNKNOWN_KEY``, ``KEY_DISABLED``, ``KEY_EXPIRED``). It raises on any failure to get an
    answer; the pipeline turns that into a deny, never an allow.
    """

    @property
    def ready(self) -> bool:
        """True once the backend can answer lookups (for readiness probes)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def lookup(self, credential: Credential) -> Client | Reason: ...
