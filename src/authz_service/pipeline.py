"""One check, start to finish: credential -> resolution -> authorization -> Decision.

This is the only place that turns failures into decisions: whatever goes wrong below, the caller
gets a deny, never an exception that would leave the outcome to Envoy's ``failure_mode_allow``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from authz_service import credentials, logs
from authz_service.credentials import CredentialRules
from authz_service.metrics import Metrics
from authz_service.model import Client, Decision, Request, Trace
from authz_service.policy import NO_POLICY, Policy
from authz_service.reasons import Reason
from authz_service.registry import Registry, RegistryError

log = logging.getLogger(__name__)

# Time kept back from the caller's deadline so that our answer reaches Envoy before it gives up.
DEADLINE_MARGIN = 0.01
KEY_ID_LENGTH = 12  # hex characters of the key's SHA-256 that name it in logs (not secret)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    credential_rules: CredentialRules
    check_timeout: float  # seconds; our own bound, shorter than Envoy's ext_authz timeout
    max_in_flight: int = 1000  # checks in progress at once; beyond that, deny with 503
    allow_non_http: bool = False


class Pipeline:
    def __init__(
        self,
        registry: Registry,
        settings: PipelineSettings,
        metrics: Metrics | None = None,
        policy: Callable[[], Policy] = lambda: NO_POLICY,
    ) -> None:
        """``policy`` returns the access policy in force (the policy file reloads)."""
        self._registry = registry
        self._metrics = metrics
        self._policy = policy
        self._rules = settings.credential_rules
        self._timeout = settings.check_timeout
        self._max_in_flight = settings.max_in_flight
        self._in_flight = 0
        self._non_http = (
            Decision.allow(None, Reason.NON_HTTP_REQUEST)
            if settings.allow_non_http
            else Decision.deny(Reason.NON_HTTP_REQUEST)
        )

    async def check(self, request: Request, time_remaining: float | None = None) -> Decision:
        """Decide on one request, within our timeout and the caller's remaining time."""
        started = time.perf_counter()
        budget = self._timeout
        if time_remaining is not None:
            budget = min(budget, time_remaining - DEADLINE_MARGIN)
        trace = Trace()
        # An explicit 503 rather than a gRPC RESOURCE_EXHAUSTED: a gRPC error would leave the
        # outcome to Envoy's failure_mode_allow.
        if self._in_flight >= self._max_in_flight:
            decision = Decision.deny(Reason.OVERLOADED)
            self._record(request, decision, time.perf_counter() - started, trace)
            return decision
        self._in_flight += 1
        try:
            decision = await self._decide(request, budget, trace)
        except TimeoutError:
            decision = Decision.deny(Reason.DEADLINE_EXCEEDED)
        except RegistryError as exc:
            decision = Decision.deny(exc.reason)
        except Exception:
            log.exception("check failed; denying", extra={"fields": {"event": "check_error"}})
            decision = Decision.deny(Reason.INTERNAL_ERROR)
        finally:
            self._in_flight -= 1
        self._record(request, decision, time.perf_counter() - started, trace)
        return decision

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def registry(self) -> Registry:
        return self._registry

    async def explain(
        self, request: Request, client: Client | None = None
    ) -> tuple[Decision, Trace]:
        """Decide as ``check`` would, and say how, without logging or counting a decision.
        With ``client``, the credential and resolution steps are skipped for that client."""
        trace = Trace()
        if client is not None:
            return self._authorize(request, client, trace), trace
        try:
            decision = await self._decide(request, self._timeout, trace)
        except TimeoutError:
            decision = Decision.deny(Reason.DEADLINE_EXCEEDED)
        except RegistryError as exc:
            decision = Decision.deny(exc.reason)
        return decision, trace

    def _record(self, request: Request, decision: Decision, elapsed: float, trace: Trace) -> None:
        logs.decision(request, decision, elapsed, trace)
        if self._metrics is not None:
            self._metrics.decision(decision, elapsed, request.size)

    async def _decide(self, request: Request, budget: float, trace: Trace) -> Decision:
        if not request.is_http:
            return self._non_http

        # 1. Identity: the request's one API key, checked offline.
        credential = credentials.extract(request.authorization, self._rules)
        if isinstance(credential, Reason):
            return Decision.deny(credential)
        trace.key_id = credential.key_hash[:KEY_ID_LENGTH]

        # 2. Resolution: the key's client, from memory if possible, else from the registry
        #    within the deadline (only waiting can overrun it, so only waiting pays for a timer).
        client = self._registry.lookup_now(credential)
        trace.resolution = "memory"
        if client is None:
            trace.resolution = "registry"
            asked = time.perf_counter()
            try:
                async with asyncio.timeout(budget):
                    client = await self._registry.lookup(credential)
            finally:
                trace.registry_seconds = time.perf_counter() - asked
        if isinstance(client, Reason):
            return Decision.deny(client)
        return self._authorize(request, client, trace)

    def _authorize(self, request: Request, client: Client, trace: Trace) -> Decision:
        # 3. Authorization: the policy file's rules and the route's own requirements.
        verdict = self._policy().evaluate(request, client)
        trace.policy_path = verdict.path
        if verdict.allowed:
            return Decision.allow(client, Reason.ALLOWED, verdict.rule, verdict.dry_run_rule)
        return Decision.deny(verdict.reason, client, verdict.rule)
