"""A circuit breaker: after ``failures`` consecutive failures, calls are refused for
``cooldown`` seconds (so a dead dependency costs nothing per request); then one trial call is let
through, and its outcome closes or re-opens the circuit.

Every call that ``allow`` lets through must end in exactly one of ``succeeded``, ``failed`` or
``abandoned``. In case a caller breaks that rule, a trial also lapses after one cooldown, so the
circuit can never stay half-open with no trial running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_since: float | None = None  # when the running trial started

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return State.CLOSED
        if self._clock() - self._opened_at < self._cooldown:
            return State.OPEN
        return State.HALF_OPEN

    def allow(self) -> bool:
        """May a call go ahead now? In the half-open state, only one trial at a time."""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            return False
        now = self._clock()
        if self._trial_since is None or now - self._trial_since >= self._cooldown:
            self._trial_since = now
            return True
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_since = None

    def failed(self) -> None:
        self._failures += 1
        self._trial_since = None
        if self._opened_at is not None or self._failures >= self._threshold:
            self._opened_at = self._clock()

    def abandoned(self) -> None:
        """The call was given up (cancelled) before it had an outcome: it says nothing about
        the dependency, and a trial slot it held is free again."""
        self._trial_since = None
