"""One check, start to finish: credential -> resolution -> authorization -> Decision.

This is the only place that turns failures into decisions: whatever goes wrong below, the caller
gets a deny, never an exception that would leave the outcome to Envoy's ``failure_mode_allow``.

``check_now`` runs on the check server's worker threads and decides whatever needs no I/O;
``finish`` runs on the event loop for the checks that must await the registry. Everything a
worker thread touches (the registry's in-memory answers, the policy, metrics, logs) is safe to
use from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from authz_service import credentials, logs
from authz_service.credentials import CredentialRules
from authz_service.metrics import Metrics
from authz_service.model import Client, Credential, Decision, Request, Trace
from authz_service.policy import NO_POLICY, Policy
from authz_service.reasons import Reason
from authz_service.registry import Registry, RegistryError

log = logging.getLogger(__name__)

# Time kept back from the caller's deadline so that our answer reaches Envoy before it gives up.
DEADLINE_MARGIN = 0.01
KEY_ID_LENGTH = 12  # hex characters of the key's SHA-256 that name it in logs (not secret)


class Pending(NamedTuple):
    """A check that has to wait for the registry, as ``check_now`` left it."""

    request: Request
    credential: Credential
    trace: Trace
    started: float  # time.perf_counter() when the check began


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    credential_rules: CredentialRules
    check_timeout: float  # seconds; our own bound, shorter than Envoy's ext_authz timeout
    max_in_flight: int = 1000  # checks waiting for the registry at once; beyond, deny with 503
    allow_non_http: bool = False


class Pipeline:
    def __init__(
        self,
        registry: Registry,
        settings: PipelineSettings,
        metrics: Metrics | None = None,
        policy: Callable[[], Policy] | None = None,
    ) -> None:
        """``policy`` returns the access policy in force (the policy file reloads); without
        one, every identified client is allowed, subject to its route's requirements."""
        self._registry = registry
        self._metrics = metrics
        self._policy = policy or _no_policy
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
        outcome = self.check_now(request)
        if isinstance(outcome, Pending):
            return await self.finish(outcome, time_remaining)
        return outcome

    def check_now(self, request: Request) -> Decision | Pending:
        """Decide without waiting, from any thread: the decision (logged and counted), or the
        check as it stands when the registry must be asked; ``finish`` that on the event loop.
        A check whose answer is in memory (the keys file, a cache hit, the snapshot) is decided
        here."""
        started = time.perf_counter()
        trace = Trace()
        try:
            decision = self._decide_now(request, trace)
        except Exception as exc:  # every failure is a deny, never an error
            decision = _denial(exc)
        if isinstance(decision, Credential):
            return Pending(request, decision, trace, started)
        self._record(request, decision, time.perf_counter() - started, trace)
        return decision

    async def finish(self, pending: Pending, time_remaining: float | None = None) -> Decision:
        """Ask the registry for a pending check, then decide, log and count it."""
        try:
            decision = await self._decide_after_lookup(
                pending.request, pending.credential, time_remaining, pending.trace
            )
        except Exception as exc:  # as in check_now
            decision = _denial(exc)
        elapsed = time.perf_counter() - pending.started
        self._record(pending.request, decision, elapsed, pending.trace)
        return decision

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def in_flight(self) -> int:
        """Checks waiting for the registry."""
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
            decision = self._decide_now(request, trace)
            if isinstance(decision, Credential):
                decision = await self._decide_after_lookup(request, decision, None, trace)
        except Exception as exc:  # as in check
            decision = _denial(exc)
        return decision, trace

    def _record(self, request: Request, decision: Decision, elapsed: float, trace: Trace) -> None:
        logs.decision(request, decision, elapsed, trace)
        if self._metrics is not None:
            self._metrics.decision(decision, elapsed, request.size)

    def _decide_now(self, request: Request, trace: Trace) -> Decision | Credential:
        """The decision if it needs no I/O; else the credential the registry must resolve."""
        if not request.is_http:
            return self._non_http

        # 1. Identity: the request's one API key, checked offline.
        credential = credentials.extract(request.authorization, self._rules)
        if isinstance(credential, Reason):
            return Decision.deny(credential)
        trace.key_id = credential.key_hash[:KEY_ID_LENGTH]

        # 2. Resolution, from memory if the registry can answer without waiting.
        client = self._registry.lookup_now(credential)
        if client is None:
            return credential
        trace.resolution = "memory"
        if isinstance(client, Reason):
            return Decision.deny(client)
        return self._authorize(request, client, trace)

    async def _decide_after_lookup(
        self,
        request: Request,
        credential: Credential,
        time_remaining: float | None,
        trace: Trace,
    ) -> Decision:
        """2. Resolution by the registry, within the deadline; then 3. authorization."""
        # An explicit 503 rather than queueing, or a gRPC RESOURCE_EXHAUSTED that would leave
        # the outcome to Envoy's failure_mode_allow.
        if self._in_flight >= self._max_in_flight:
            return Decision.deny(Reason.OVERLOADED)
        budget = self._timeout
        if time_remaining is not None:
            budget = min(budget, time_remaining - DEADLINE_MARGIN)
        trace.resolution = "registry"
        asked = time.perf_counter()
        self._in_flight += 1
        try:
            async with asyncio.timeout(budget):
                client = await self._registry.lookup(credential)
        finally:
            self._in_flight -= 1
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


def _denial(exc: Exception) -> Decision:
    """The deny for a failure: its own reason for registry errors, 503 for the rest."""
    if isinstance(exc, TimeoutError):
        return Decision.deny(Reason.DEADLINE_EXCEEDED)
    if isinstance(exc, RegistryError):
        return Decision.deny(exc.reason)
    log.exception("check failed; denying", extra={"fields": {"event": "check_error"}})
    return Decision.deny(Reason.INTERNAL_ERROR)


def _no_policy() -> Policy:
    return NO_POLICY
