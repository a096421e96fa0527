"""What keeps this replica from serving, in words, and the background tasks that must never die
silently.

- ``Health`` holds the problems that make the replica unready, such as a registry that rejects
  our token: a configuration error, which no retry will mend, and which an operator must see on
  ``/readyz`` rather than only as a stream of 503s.
- ``supervise`` runs a long-lived background task (the change feed, file watchers, ...): when
  it fails it is logged with its traceback, counted, and restarted after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_RESTART_DELAYS = (0.1, 30.0)  # seconds: the first restart delay, and the most it grows to
_STABLE_AFTER = 60.0  # seconds of running after which a failure restarts at the first delay


class Health:
    def __init__(self) -> None:
        self._problems: dict[str, str] = {}

    def report(self, component: str, problem: str | None) -> None:
        """Say what is wrong with a component (None: nothing any more). Logged when it starts
        and when it ends, not on every repetition."""
        before = self._problems.get(component)
        if problem == before:
            return
        if problem is None:
            del self._problems[component]
            log.info(
                f"{component}: recovered",
                extra={"fields": {"event": "problem_cleared", "component": component}},
            )
            return
        self._problems[component] = problem
        log.error(
            f"{component}: {problem}",
            extra={"fields": {"event": "problem", "component": component, "problem": problem}},
        )

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._problems)


@dataclass
class TaskState:
    running: bool = False
    restarts: int = 0


# Every supervised task of the process, by name, for /metrics. (Process-wide, like logging.)
TASKS: dict[str, TaskState] = {}


def supervise(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Start ``run`` as a background task that is restarted whenever it fails or returns."""
    return asyncio.create_task(_keep_running(name, run), name=name)


async def _keep_running(name: str, run: Callable[[], Awaitable[None]]) -> None:
    state = TASKS.setdefault(name, TaskState())
    loop = asyncio.get_running_loop()
    delay = _RESTART_DELAYS[0]
    while True:
        state.running = True
        started = loop.time()
        try:
            await run()
        except asyncio.CancelledError:
            state.running = False
            raise
        except Exception:
            log.exception(
                "background task failed; restarting it",
                extra={"fields": {"event": "task_failed", "task": name, "retry_in": delay}},
            )
        else:
            log.error(
                "background task ended; restarting it",
                extra={"fields": {"event": "task_failed", "task": name, "retry_in": delay}},
            )
        state.running = False
        state.restarts += 1
        if loop.time() - started >= _STABLE_AFTER:
            delay = _RESTART_DELAYS[0]
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RESTART_DELAYS[1])
