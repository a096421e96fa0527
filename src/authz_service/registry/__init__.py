"""Where keys are resolved to clients. Every source implements the one ``Registry`` protocol."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from authz_service.contract import Change
from authz_service.model import Client, Credential
from authz_service.reasons import Reason

Known = Client | Reason  # what a registry says of a key: its client, or why it is refused
Lookup = Known | Coroutine[Any, Any, Known]


class RegistryError(Exception):
    """No answer could be had from the registry; the check is denied with ``reason``. The
    message is ours, never text the registry sent."""

    reason = Reason.REGISTRY_UNAVAILABLE
    safe_to_log = True


class RegistryBusyError(RegistryError):
    """The bound on lookups in flight is reached; denied at once rather than queued."""

    reason = Reason.REGISTRY_BUSY


class Registry(Protocol):
    """A source of truth for API keys.

    ``lookup`` answers a key: its client, or the reason it is refused (``UNKNOWN_KEY``,
    ``KEY_DISABLED``, ``KEY_EXPIRED``, ``KEY_REVOKED``, ``CLIENT_SUSPENDED``). A source that
    holds its keys in memory (the keys file, the snapshot) always answers at once, from any
    thread. A source that must ask the registry returns, for a key it has no fresh answer for,
    a coroutine that asks it; the check then awaits that coroutine on the event loop, within
    its deadline. It raises on any failure to get an answer (``RegistryError`` when the reason
    is known); the check turns that into a deny, never an allow.
    """

    @property
    def ready(self) -> bool:
        """True once the source can answer lookups (for readiness probes)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def lookup(self, credential: Credential) -> Lookup: ...

    def find_client(self, client_id: str) -> Client | None:
        """The client with this id if it is known in memory (for the admin API's Explain);
        None when it is not, without asking anyone."""
        ...

    def invalidate(self, digest: bytes | None, client_id: str | None) -> int | None:
        """Forget cached answers for a key and/or a client; return how many went, or None
        when this source caches nothing (its copy is the registry's, applied as it changes)."""
        ...


class ChangeConsumer(Protocol):
    """What follows the registry's change feed (see ``feed.ChangeFeed``)."""

    def apply(self, change: Change) -> None:
        """Take one change into account; changes arrive in version order."""
        ...

    async def resync(self) -> int | None:
        """Start afresh, because changes may have been missed: return the change-log version
        the consumer now reflects, or None if it keeps no version of its own (the feed then
        follows on from where it is, or from the registry's current version)."""
        ...
