"""The check core: one request in, one Decision out, whichever transport brought it.

A check reads top to bottom in ``_decide``: the request as the transport read it, then
1. identity (the one API key, checked offline), 2. resolution (from memory, or by the
registry), 3. authorization (the policy file and the route's requirements), 4. the client's
rate limit, once it is allowed. Whatever part of it must wait for I/O (a registry lookup, the
shared rate-limit bucket) comes back as a coroutine, and each entry point runs that in the one
place it may wait:

- ``check``, for a worker thread (the gRPC transport): the coroutine runs on the event loop
  while the thread waits, within the check's deadline;
- ``check_on_loop``, on the event loop (the HTTP transport): it runs the coroutine as a task
  of its own and returns a future of the decision, or the decision itself when nothing waits.

This is the only place that turns failures into decisions: whatever goes wrong below (an
exception, a deadline, a bound reached), the caller gets a deny, never an exception that would
leave the outcome to Envoy's ``failure_mode_allow``. Every check is recorded here, exactly once:
the decision log, the metrics and the usage ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from authz_service import credentials, logs
from authz_service.credentials import CredentialRules
from authz_service.limits import RateLimiter
from authz_service.metrics import Metrics
from authz_service.model import Client, Decision, Request, Trace
from authz_service.policy import NO_POLICY, Policy
from authz_service.reasons import Reason
from authz_service.registry import Known, Registry, RegistryError
from authz_service.usage import UsageLedger

if TYPE_CHECKING:
    from authz_service.tracing import Tracing

log = logging.getLogger(__name__)

# Time kept back from the caller's deadline so that our answer reaches Envoy before it gives up.
DEADLINE_MARGIN = 0.01
# How much longer than a check's own deadline a worker waits for the event loop's decision,
# should the loop be stuck: the loop keeps the deadline itself.
LOOP_BACKSTOP_SLACK = 0.05
_UNTRACED = contextlib.nullcontext()


class Pending(NamedTuple):
    """The rest of a check that must wait for I/O: what it waits for (a registry lookup, the
    shared rate-limit bucket), and what then decides, which may wait again."""

    work: Coroutine[Any, Any, Any]
    then: Callable[[Any], Decision | Pending]
    trace: Trace
    timed: Callable[[Trace, float], None]  # records the wait in the trace (decision log)
    # What decides when the check may not wait (every waiting slot taken); None: 503.
    instead: Callable[[], Decision] | None = None


@dataclass(frozen=True, slots=True)
class CheckSettings:
    credential_rules: CredentialRules
    check_timeout: float  # seconds; our own bound, shorter than Envoy's ext_authz timeout
    max_waiting: int = 1000  # checks waiting for the registry at once; beyond, deny with 503
    # Worker threads that may wait for the registry at once; the others stay free for the
    # checks answered from memory, so that slow lookups never queue them (a flood of unknown
    # keys, a slow registry).
    max_waiting_threads: int = 24
    allow_non_http: bool = False


class Checker:
    def __init__(
        self,
        registry: Registry,
        settings: CheckSettings,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics | None = None,
        policy: Callable[[], Policy] | None = None,
        *,
        tracing: Tracing | None = None,
        limits: RateLimiter | None = None,
        usage: UsageLedger | None = None,
    ) -> None:
        """``loop`` runs the registry lookups. ``policy`` returns the access policy in force
        (the policy file reloads); without one, every identified client is allowed, subject
        to its route's requirements. With ``tracing``, each check has a span. ``limits``
        enforces clients' rate limits (without it, they are not enforced here); ``usage``
        counts every check of a known key."""
        self.registry = registry
        self._settings = settings
        self._rules = settings.credential_rules
        self._loop = loop
        self._metrics = metrics
        self._policy = policy or _no_policy
        self._tracing = tracing
        self._limits = limits
        self._usage = usage
        self._waiting = 0  # checks waiting for I/O; changed on the event loop only
        self._waiting_threads = threading.BoundedSemaphore(settings.max_waiting_threads)
        self._non_http = (
            Decision.allow(None, Reason.NON_HTTP_REQUEST)
            if settings.allow_non_http
            else Decision.deny(Reason.NON_HTTP_REQUEST)
        )

    @property
    def waiting(self) -> int:
        """Checks waiting for the registry."""
        return self._waiting

    @property
    def traced(self) -> bool:
        """Whether each check has a span (tracing is on)."""
        return self._tracing is not None

    def check(self, request: Request, time_remaining: float | None = None) -> Decision:
        """Decide one check on a worker thread, within our timeout and the caller's remaining
        time; log and count it."""
        started, trace, decision = self._begin(request)
        if not isinstance(decision, Decision):
            try:
                decision = self._wait_on_loop(decision, self._budget(time_remaining))
            except Exception as exc:  # every failure is a deny, never an error
                decision = _denial(exc, trace.key_id)
        self._record(request, decision, started, trace)
        return decision

    def check_on_loop(
        self, request: Request, time_remaining: float | None = None
    ) -> Decision | asyncio.Future[Decision]:
        """``check``, on the event loop: the decision, or, for a check that must wait for the
        registry, a future of it (the rest of the check runs as a task of its own)."""
        started, trace, decision = self._begin(request)
        if isinstance(decision, Decision):
            self._record(request, decision, started, trace)
            return decision
        return self._loop.create_task(
            self._finish(request, decision, self._budget(time_remaining), started)
        )

    def _begin(self, request: Request) -> tuple[float, Trace, Decision | Pending]:
        """A check's start, its trace, and its decision from memory or what it must wait for."""
        started = time.perf_counter()
        trace = Trace()
        try:
            if self._tracing is not None:
                trace.span = self._tracing.start(request)
            return started, trace, self._decide(request, trace)
        except Exception as exc:  # every failure is a deny, never an error
            return started, trace, _denial(exc, trace.key_id)

    async def explain(
        self, request: Request, client: Client | None = None
    ) -> tuple[Decision, Trace]:
        """Decide as a check would, and say how, without logging or counting a decision, and
        without taking from the client's rate limit. With ``client``, the credential and
        resolution steps are skipped for that client."""
        trace = Trace()
        if client is not None:
            return self._authorize(request, client, trace), trace
        try:
            decision = self._decide(request, trace, metered=False)
            if not isinstance(decision, Decision):
                decision = await self._within(decision, self._budget(None))
        except Exception as exc:  # as in check
            decision = _denial(exc, trace.key_id)
        return decision, trace

    # --- the check, top to bottom --------------------------------------------------------------
    def _decide(
        self, request: Request, trace: Trace, *, metered: bool = True
    ) -> Decision | Pending:
        if request.problem is not None:  # the transport could not read it
            return Decision.deny(request.problem)
        if not request.is_http:
            return self._non_http

        # 1. Identity: the request's one API key, checked offline.
        credential = credentials.extract(request.authorization.reveal(), self._rules)
        if isinstance(credential, Reason):
            return Decision.deny(credential)
        trace.key_id = credential.key_id

        # 2. Resolution: from memory, or else by the registry (the part that waits).
        known = self.registry.lookup(credential)
        if not isinstance(known, Client | Reason):
            trace.resolution = "registry"
            admit = functools.partial(self._admit, request, trace, metered)
            return Pending(known, admit, trace, _registry_wait)
        trace.resolution = "memory"
        return self._admit(request, trace, metered, known)

    def _admit(
        self, request: Request, trace: Trace, metered: bool, known: Known
    ) -> Decision | Pending:
        if isinstance(known, Reason):
            return Decision.deny(known, key_id=trace.key_id)
        decision = self._authorize(request, known, trace)
        limit = known.rate_limit
        if limit is None or not decision.allowed or self._limits is None or not metered:
            return decision
        # 4. Rate limit: the client's own bucket, taken from only by checks it is allowed
        # (locally, or, in Redis, the part that waits).
        taken = self._limits.take(decision, limit)
        if isinstance(taken, Decision):
            return taken
        return Pending(taken.work, _as_decided, trace, _rate_limit_wait, taken.locally)

    def _authorize(self, request: Request, client: Client, trace: Trace) -> Decision:
        # 3. Authorization: the policy file's rules and the route's own requirements.
        verdict = self._policy().evaluate(request, client)
        trace.policy_path = verdict.path
        if verdict.allowed:
            return Decision.allow(
                client, Reason.ALLOWED, verdict.rule, verdict.dry_run_rule, trace.key_id
            )
        return Decision.deny(verdict.reason, client, verdict.rule, trace.key_id)

    # --- waiting, in one place per entry point -------------------------------------------------
    def _wait_on_loop(self, pending: Pending, budget: float) -> Decision:
        """A worker thread waits for the rest of its check, run on the event loop."""
        if not self._waiting_threads.acquire(blocking=False):
            return _without_waiting(pending)
        try:
            future = asyncio.run_coroutine_threadsafe(self._within(pending, budget), self._loop)
            try:
                return future.result(timeout=max(budget, 0) + LOOP_BACKSTOP_SLACK)
            except TimeoutError:
                if future.done():
                    raise  # the check's own deadline, kept by the loop
                future.cancel()
                log.error(
                    "no decision from the event loop in time; denying",
                    extra={"fields": {"event": "loop_backstop"}},
                )
                return Decision.deny(Reason.DEADLINE_EXCEEDED, key_id=pending.trace.key_id)
        finally:
            self._waiting_threads.release()

    async def _finish(
        self, request: Request, pending: Pending, budget: float, started: float
    ) -> Decision:
        """The rest of a check that ``check_on_loop`` could not decide at once."""
        try:
            decision = await self._within(pending, budget)
        except Exception as exc:  # as in check
            decision = _denial(exc, pending.trace.key_id)
        self._record(request, decision, started, pending.trace)
        return decision

    async def _within(self, pending: Pending, budget: float) -> Decision:
        """Run the rest of a check on the loop, within its deadline and the bound on waiting
        checks: an explicit 503 rather than a queue."""
        if budget <= 0:
            pending.work.close()
            return Decision.deny(Reason.DEADLINE_EXCEEDED, key_id=pending.trace.key_id)
        if self._waiting >= self._settings.max_waiting:
            return _without_waiting(pending)
        self._waiting += 1
        try:
            # The check's span is current while it waits: the spans of the I/O it starts (the
            # registry call, in a task of its own that copies the context) are its children.
            async with asyncio.timeout(budget), pending.trace.span or _UNTRACED:
                step: Decision | Pending = pending
                while isinstance(step, Pending):
                    started = time.perf_counter()
                    try:
                        done = await step.work
                    finally:
                        step.timed(step.trace, time.perf_counter() - started)
                    step = step.then(done)
                return step
        finally:
            self._waiting -= 1

    def _budget(self, time_remaining: float | None) -> float:
        """Our timeout, shortened by the caller's deadline if it has one (gRPC reports a huge
        number for a call without a deadline, as grpcurl makes by default)."""
        budget = self._settings.check_timeout
        if time_remaining is not None:
            budget = min(budget, time_remaining - DEADLINE_MARGIN)
        return budget

    def _record(self, request: Request, decision: Decision, started: float, trace: Trace) -> None:
        elapsed = time.perf_counter() - started
        logs.decision(request, decision, elapsed, trace)
        if self._metrics is not None:
            self._metrics.decision(decision, elapsed, request.size)
        if trace.span is not None:
            trace.span.end(decision, trace)
        if self._usage is not None:
            self._usage.check(decision)


def _denial(exc: Exception, key_id: str | None) -> Decision:
    """The deny for a failure: its own reason for registry errors, 503 for the rest."""
    if isinstance(exc, TimeoutError):
        return Decision.deny(Reason.DEADLINE_EXCEEDED, key_id=key_id)
    if isinstance(exc, RegistryError):
        return Decision.deny(exc.reason, key_id=key_id)
    log.exception("check failed; denying", extra={"fields": {"event": "check_error"}})
    return Decision.deny(Reason.INTERNAL_ERROR, key_id=key_id)


def _without_waiting(pending: Pending) -> Decision:
    """A check that may not wait: decided without what it would wait for, where it can be
    (a rate limit, by this replica's own bucket), else an explicit 503 rather than a queue."""
    pending.work.close()
    if pending.instead is not None:
        return pending.instead()
    return Decision.deny(Reason.OVERLOADED, key_id=pending.trace.key_id)


def _registry_wait(trace: Trace, seconds: float) -> None:
    trace.registry_seconds = seconds


def _rate_limit_wait(trace: Trace, seconds: float) -> None:
    trace.rate_limit_seconds = seconds


def _as_decided(decision: Decision) -> Decision:
    return decision


def _no_policy() -> Policy:
    return NO_POLICY
