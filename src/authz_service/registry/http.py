"""The client registry's validation endpoint: one call per lookup (the cache in front of it is a
separate concern, ``resolver.CachingResolver``).

The answer is parsed strictly by the contract: only the documented shapes become an answer,
anything else (another status, a redirect, another content type, an oversized, deeply nested
or malformed body) is an error, and errors are denials, never allows. Any failure of a call,
whatever its kind, counts against the circuit breaker, so that a dead registry costs nothing
per request, and a bound on calls in flight keeps a flood of checks from becoming a flood of
calls. A registry that rejects our token is a configuration error: reported on /readyz until
it accepts the token again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from authz_service import contract, logs
from authz_service.breaker import CircuitBreaker
from authz_service.contract import Answer, ContractError
from authz_service.health import Health
from authz_service.model import Credential
from authz_service.registry import RegistryBusyError, RegistryError
from authz_service.registry.origin import Origin, UnsentError

if TYPE_CHECKING:
    from authz_service.tracing import Tracing

log = logging.getLogger(__name__)

VERIFY_PATH = "/v1/keys/verify"
MAX_RESPONSE_BYTES = 16 * 1024
RETRY_PAUSE = (0.002, 0.01)  # seconds: short, as the check's deadline is counted in milliseconds
REJECTED = "the registry rejected AUTHZ_REGISTRY_TOKEN (HTTP {status}): set its service token"
# Asked now and then while the registry rejects our token: it needs the service token and,
# without a version, reads nothing, so /readyz clears once the token is accepted again even if
# no check arrives (an unready replica gets none).
PROBE_PATH = "/v1/changes"
_PROBE_DELAYS = (1.0, 30.0)  # seconds: the first wait between probes, and the longest


class InvalidAnswerError(RegistryError):
    """The registry answered something the contract does not allow."""


class TokenRejectedError(RegistryError):
    """The registry refused our service token (401 or 403)."""


class HttpRegistry:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float,
        max_in_flight: int,
        breaker: CircuitBreaker,
        health: Health,
        observe_latency: Callable[[float], None] = lambda _: None,
        tracing: Tracing | None = None,
    ) -> None:
        self._base = base_url
        self._url = base_url.rstrip("/") + VERIFY_PATH
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._breaker = breaker
        self._health = health
        self._observe_latency = observe_latency
        self._tracing = tracing
        self._origin: Origin | None = None
        self._probe: asyncio.Task[None] | None = None
        self.outcomes = {"ok": 0, "error": 0, "busy": 0, "circuit_open": 0, "token_rejected": 0}

    @property
    def breaker_state(self) -> str:
        return self._breaker.state.value

    @property
    def ready(self) -> bool:
        return self._origin is not None

    async def start(self) -> None:
        self._origin = Origin(self._base, self._headers, max_body=MAX_RESPONSE_BYTES)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._origin is not None:
            self._origin.close()

    async def verify(self, credential: Credential) -> Answer:
        """The registry's answer for one key; raises RegistryError when there is none."""
        if self._slots.locked():
            self.outcomes["busy"] += 1
            raise RegistryBusyError("registry lookups in flight at the bound")
        if not self._breaker.allow():
            self.outcomes["circuit_open"] += 1
            raise RegistryError("registry circuit open")
        async with self._slots:
            started = time.perf_counter()
            try:
                call = self._call_once_more_if_unsent(credential)
                if self._tracing is not None:
                    call = self._tracing.registry_call(call, self._url)
                answer = await call
            except asyncio.CancelledError:
                # The check was abandoned (our deadline or Envoy's): no verdict on the registry.
                self._breaker.abandoned()
                raise
            except Exception as exc:  # any failure at all counts: none may leave a trial open
                self._observe_latency(time.perf_counter() - started)
                self._breaker.failed()
                if isinstance(exc, TokenRejectedError):
                    self.outcomes["token_rejected"] += 1
                    self._token_rejected(str(exc))
                else:
                    self.outcomes["error"] += 1
                    logs.failure(
                        log,
                        "registry lookup failed",
                        "registry_error",
                        exc,
                        breaker=self._breaker.state.value,
                    )
                if isinstance(exc, RegistryError):
                    raise
                raise RegistryError(type(exc).__name__) from None
            self._observe_latency(time.perf_counter() - started)
            self.outcomes["ok"] += 1
            self._breaker.succeeded()
            self._health.report("registry", None)
            return answer

    def _token_rejected(self, problem: str) -> None:
        self._health.report("registry", problem)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_token())

    async def _probe_token(self) -> None:
        """Until the registry accepts our token again, ask it now and then, with backoff."""
        delay = _PROBE_DELAYS[0]
        while self._origin is not None:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self._timeout):
                    status = (await self._origin.request("GET", PROBE_PATH)).status
            except Exception:  # unreachable for now: that is not an answer about the token
                status = 0
            if 200 <= status < 300:
                self._health.report("registry", None)
                return
            delay = min(delay * 2, _PROBE_DELAYS[1])

    async def _call_once_more_if_unsent(self, credential: Credential) -> Answer:
        """One retry, after a short random pause, when the request never reached the registry
        (refused connection, or a pooled connection it had closed). Validation has no side
        effects, so that is safe; a timeout or an answer is never retried."""
        try:
            return await self._call(credential)
        except UnsentError:
            await asyncio.sleep(random.uniform(*RETRY_PAUSE))  # noqa: S311 (jitter, not secrets)
            return await self._call(credential)

    async def _call(self, credential: Credential) -> Answer:
        if self._origin is None:
            raise RegistryError("the registry client is not started")
        body = json.dumps({"api_key": credential.key.reveal()}).encode()
        async with asyncio.timeout(self._timeout):
            reply = await self._origin.request("POST", VERIFY_PATH, body, "application/json")
        if reply.status in (401, 403):
            raise TokenRejectedError(REJECTED.format(status=reply.status))
        if reply.status != 200:
            raise InvalidAnswerError(f"HTTP status {reply.status}")
        if reply.content_type != "application/json":
            raise InvalidAnswerError("a content type other than application/json")
        try:
            document = json.loads(reply.body)
        except (ValueError, RecursionError):
            raise InvalidAnswerError("an answer that is not JSON") from None
        try:
            return contract.parse_answer(document)
        except ContractError as exc:  # its message is ours: it never quotes the registry
            raise InvalidAnswerError(f"an answer outside the contract: {exc}") from None
