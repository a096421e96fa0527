"""The circuit breaker opens after repeated failures, waits, then tries once."""

from __future__ import annotations

from authz_service.breaker import CircuitBreaker, State


def state_of(breaker: CircuitBreaker) -> State:
    return breaker.state  # read afresh: the state changes with the clock and the calls


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_it_stays_closed_below_the_failure_threshold() -> None:
    """Fewer consecutive failures than the threshold keep calls flowing; a success resets."""
    breaker = CircuitBreaker(failures=3, cooldown=5, clock=Clock())
    breaker.failed()
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    breaker.failed()
    assert state_of(breaker) is State.CLOSED
    assert breaker.allow()


def test_it_opens_at_the_threshold_and_refuses_calls_during_the_cooldown() -> None:
    """An open circuit costs nothing: allow() is False until the cooldown ends."""
    clock = Clock()
    breaker = CircuitBreaker(failures=2, cooldown=5, clock=clock)
    breaker.failed()
    breaker.failed()
    assert state_of(breaker) is State.OPEN
    assert not breaker.allow()
    clock.now = 4.9
    assert not breaker.allow()


def test_after_the_cooldown_one_trial_decides() -> None:
    """Half-open lets exactly one call through; success closes, failure re-opens."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=5, clock=clock)
    breaker.failed()
    clock.now = 5
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # the trial is still running
    breaker.failed()
    assert state_of(breaker) is State.OPEN
    clock.now = 10
    assert breaker.allow()
    breaker.succeeded()
    assert state_of(breaker) is State.CLOSED
    assert breaker.allow()
