"""The client registry's validation endpoint as a backend: one call per lookup (the cache in
front of it is a separate concern).

The answer is parsed strictly: only the documented shapes become an answer, anything else
(another status, a redirect, another content type, an oversized or malformed body) is an error,
and errors are denials, never allows. A circuit breaker makes a dead registry cost nothing per
request, and a bound on calls in flight keeps a flood of checks from becoming a flood of calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import aiohttp

from authz_service import logs
from authz_service.breaker import CircuitBreaker
from authz_service.model import Client, Credential
from authz_service.reasons import Reason
from authz_service.registry import RegistryBusyError, RegistryError
from authz_service.registry.static_file import CLIENT_ID_PATTERN, ROLE_PATTERN

log = logging.getLogger(__name__)

VERIFY_PATH = "/v1/keys/verify"
MAX_RESPONSE_BYTES = 16 * 1024
RETRY_PAUSE = (0.002, 0.01)  # seconds: short, as the check's deadline is counted in milliseconds
_REFUSALS = {
    "unknown": Reason.UNKNOWN_KEY,
    "revoked": Reason.KEY_REVOKED,
    "expired": Reason.KEY_EXPIRED,
    "suspended": Reason.CLIENT_SUSPENDED,
}


class InvalidAnswerError(RegistryError):
    """The registry answered something the contract does not allow."""


class HttpRegistry:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float,
        max_in_flight: int,
        breaker: CircuitBreaker,
        observe_latency: Callable[[float], None] = lambda _: None,
    ) -> None:
        self._url = base_url.rstrip("/") + VERIFY_PATH
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._breaker = breaker
        self._observe_latency = observe_latency
        self._session: aiohttp.ClientSession | None = None
        self.outcomes = {"ok": 0, "error": 0, "busy": 0, "circuit_open": 0}  # for /metrics

    @property
    def breaker_state(self) -> str:
        return self._breaker.state.value

    @property
    def ready(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            timeout=self._timeout,
            headers=self._headers,
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def lookup_now(self, credential: Credential) -> None:
        return None  # every answer comes from the registry

    def find_client(self, client_id: str) -> None:
        return None  # the verification API resolves keys, not client ids

    async def lookup(self, credential: Credential) -> Client | Reason:
        if self._slots.locked():
            self.outcomes["busy"] += 1
            raise RegistryBusyError("registry lookups in flight at the bound")
        if not self._breaker.allow():
            self.outcomes["circuit_open"] += 1
            raise RegistryError("registry circuit open")
        async with self._slots:
            started = time.perf_counter()
            try:
                answer = await self._call_once_more_if_unsent(credential.key)
            except (aiohttp.ClientError, TimeoutError, RegistryError) as exc:
                self._observe_latency(time.perf_counter() - started)
                self.outcomes["error"] += 1
                self._breaker.failed()
                logs.failure(
                    log,
                    "registry lookup failed",
                    "registry_error",
                    exc,
                    breaker=self._breaker.state.value,
                )
                if isinstance(exc, RegistryError):
                    raise
                raise RegistryError(type(exc).__name__) from exc
            except asyncio.CancelledError:
                # The check was abandoned (our deadline or Envoy's): no verdict on the registry.
                raise
            self._observe_latency(time.perf_counter() - started)
            self.outcomes["ok"] += 1
            self._breaker.succeeded()
            return answer

    async def _call_once_more_if_unsent(self, key: str) -> Client | Reason:
        """One retry, after a short random pause, when the request never reached the registry
        (refused connection, or a pooled connection it had closed). Validation has no side
        effects, so that is safe; a timeout or an answer is never retried."""
        try:
            return await self._call(key)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
            await asyncio.sleep(random.uniform(*RETRY_PAUSE))  # noqa: S311 (jitter, not secrets)
            return await self._call(key)

    async def _call(self, key: str) -> Client | Reason:
        if self._session is None:
            raise RegistryError("the registry client is not started")
        async with self._session.post(
            self._url, json={"api_key": key}, allow_redirects=False
        ) as reply:
            if reply.status != 200:
                raise InvalidAnswerError(f"status {reply.status}")
            if reply.content_type != "application/json":
                raise InvalidAnswerError(f"content type {reply.content_type!r}")
            body = await reply.content.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise InvalidAnswerError("answer over the size limit")
        try:
            return parse_answer(json.loads(body))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidAnswerError(f"malformed answer: {exc}") from None


def parse_answer(answer: Any) -> Client | Reason:
    """The two documented shapes, exactly; anything else raises."""
    if not isinstance(answer, dict):
        raise TypeError("not an object")
    fields = set(answer) - {"version"}  # the change-log version is optional in the contract
    if answer.get("valid") is False and fields == {"valid", "reason"}:
        return _REFUSALS[answer["reason"]]
    if answer.get("valid") is not True or fields != {"valid", "client", "valid_until"}:
        raise ValueError("neither a valid nor an invalid verdict")
    client = parse_identity(answer["client"])
    valid_until = parse_time(answer["valid_until"])
    return client if valid_until is None else replace(client, valid_until=valid_until)


def parse_time(value: Any) -> float | None:
    """An ISO 8601 timestamp of the contract (or null) as Unix time."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("expected an ISO 8601 timestamp or null")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.timestamp()


def parse_identity(client: Any) -> Client:
    """A client identity as the registry contract describes it; anything else raises."""
    if not isinstance(client, dict) or set(client) != {
        "client_id",
        "client_name",
        "roles",
        "status",
    }:
        raise ValueError("client is not an identity")
    client_id, name, roles = client["client_id"], client["client_name"], client["roles"]
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ValueError("client_id")
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ValueError("client_name")
    if not isinstance(roles, list) or not all(
        isinstance(role, str) and ROLE_PATTERN.fullmatch(role) for role in roles
    ):
        raise ValueError("roles")
    if client["status"] != "active":
        raise ValueError("a valid verdict for a client that is not active")
    return Client(client_id=client_id, name=name, roles=tuple(roles))
