"""Where keys are resolved to clients. Every backend implements the one ``Registry`` protocol."""

from __future__ import annotations

from typing import Protocol

from authz_service.model import Client, Credential
from authz_service.reasons import Reason


class RegistryError(Exception):
    """No answer could be had from the registry; the check is denied with ``reason``."""

    reason = Reason.REGISTRY_UNAVAILABLE


class RegistryBusyError(RegistryError):
    """The bound on lookups in flight is reached; denied at once rather than queued."""

    reason = Reason.REGISTRY_BUSY


class Registry(Protocol):
    """A source of truth for API keys.

    An answer is the key's client, or the reason the key must be refused (``UNKNOWN_KEY``,
    ``KEY_DISABLED``, ``KEY_EXPIRED``, ``KEY_REVOKED``, ``CLIENT_SUSPENDED``).

    ``lookup_now`` answers from memory without waiting, or returns None when the answer needs
    I/O; the pipeline then awaits ``lookup`` under the check's deadline. Keeping the two apart
    means an in-memory answer (a static file, a cache hit) never pays for a deadline timer.

    Both raise on any failure to get an answer (``RegistryError`` when the reason is known);
    the pipeline turns that into a deny, never an allow.
    """

    @property
    def ready(self) -> bool:
        """True once the backend can answer lookups (for readiness probes)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def lookup_now(self, credential: Credential) -> Client | Reason | None: ...

    async def lookup(self, credential: Credential) -> Client | Reason: ...

    def find_client(self, client_id: str) -> Client | None:
        """The client with this id if it is known in memory (for the admin API's Explain);
        None when it is not, without asking anyone."""
        ...
