"""What a call does inside the worker: the task that runs signals on a pool's agents.

``warm.call``, ``warm.cast`` and ``warm.transaction`` all send this one task to the
pool's queue. In the process that takes it, it:

1. drops the call unrun if its deadline (the caller's ``timeout``) has passed;
2. checks an agent out, waiting at most until that deadline;
3. runs the signals on it inline (a transaction: all or nothing);
4. with a ``call_timeout``, has the process's watchdog answer the caller with
   :class:`CallTimeout` at that deadline and replace the agent, while the overrunning
   work finishes in its own time and its late outcome is dropped;
5. checks the agent back in and returns the replies as JSON data.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from ..core.agent import Agent
from ..core.errors import CheckoutTimeout, WarmPoolError
from ..core.pool import AgentPool
from ..core.signal import Signal
from .runtime import WorkerRuntime
from .watchdog import Watchdog

__all__ = ["HANDLE_TASK", "CallHandler", "register_handle_task"]

#: The name of the task that carries signals to a pool (routed to the pool's queue).
HANDLE_TASK = "celery_warmpool.handle"


class CallHandler:
    """Runs the signals of one call on an agent of this process (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def handle(self, task: Task, pool: str, signals: list[dict[str, Any]],  # type: ignore[type-arg]
               deadline: float | None, call_timeout: float | None,
               transaction: bool) -> list[dict[str, Any]]:
        """Run ``signals`` on one agent of ``pool``; return the replies as JSON data."""
        agent_pool = self.runtime.local_pool(pool)
        events = [Signal.parse(signal) for signal in signals]
        agent = agent_pool.checkout(timeout=_time_left(agent_pool, deadline))
        if call_timeout is None:
            with agent_pool.lent(agent):
                replies = agent_pool.run_signals(agent, events, transaction=transaction)
            return [reply.to_wire() for reply in replies]
        return self._watched(task, agent_pool, agent, events, call_timeout, transaction)

    def _watched(self, task: Task, agent_pool: AgentPool[Agent[Any]],  # type: ignore[type-arg]
                 agent: Agent[Any], events: list[Signal], call_timeout: float,
                 transaction: bool) -> list[dict[str, Any]]:
        # The work runs here, inline; if it overruns, the watchdog answers the caller at
        # the deadline and replaces the agent, and this task's own late outcome is
        # dropped (Ignore) so it cannot overwrite that answer.
        label = ",".join(event.type for event in events)
        watchdog = Watchdog.of_this_process()
        token = watchdog.watch(call_timeout, functools.partial(
            _overran, task, task.request, agent_pool, agent, label, call_timeout))
        lease = None
        try:
            with agent_pool.lent(agent) as lease:
                try:
                    replies = agent_pool.run_signals(agent, events, transaction=transaction)
                finally:
                    lease.abandoned = not watchdog.done(token)
        finally:
            if lease is not None and lease.abandoned:
                # Whatever the late work ended with, even an error, the caller has had
                # its answer.
                agent_pool.finish_abandoned(agent)
                raise Ignore()
        return [reply.to_wire() for reply in replies]


def _time_left(agent_pool: AgentPool[Agent[Any]], deadline: float | None) -> float | None:
    """Seconds left to the caller's deadline for the checkout.

    Raises:
        CheckoutTimeout: the deadline passed before the call started; it is not run.
    """
    if deadline is None:
        return None
    left = deadline - time.time()
    if left <= 0:
        raise CheckoutTimeout(
            f"pool {agent_pool.name!r}: the call waited {-left:.3f}s past its checkout "
            "timeout before a worker took it; it was not run",
            agent_pool.name, -left, agent_pool.size, agent_pool.max_overflow)
    return left


def _overran(task: Task, request: Any, agent_pool: AgentPool[Agent[Any]],  # type: ignore[type-arg]
             agent: Agent[Any], label: str, call_timeout: float) -> None:
    """At the deadline of overrunning work: replace its agent, tell the caller."""
    error = agent_pool.overran(agent, label, call_timeout)
    if request.id is not None:  # None when the task was called directly, not sent
        # The request goes along: result backends that reply to the caller (rpc://) need
        # its reply_to, and this runs on the watchdog's thread, not the task's.
        task.backend.mark_as_failure(request.id, error, request=request)


def register_handle_task(app: Celery, runtime: WorkerRuntime) -> Task:  # type: ignore[type-arg]
    """Register, on ``app``, the task that runs signals on a pool's agents."""
    handler = CallHandler(runtime)

    def handle(task: Task, pool: str, signals: list[dict[str, Any]],  # type: ignore[type-arg]
               deadline: float | None = None, call_timeout: float | None = None,
               transaction: bool = False) -> list[dict[str, Any]]:
        """Run ``signals`` on one agent of ``pool``; return the replies as JSON data."""
        return handler.handle(task, pool, signals, deadline, call_timeout, transaction)

    registered: Task = app.task(  # type: ignore[type-arg]
        name=HANDLE_TASK, bind=True, acks_late=True, throws=(WarmPoolError,), shared=False,
    )(handle)
    return registered
