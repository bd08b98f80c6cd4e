"""The tasks that run on warm agents: the signal handler, and pool-aware user tasks."""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Ignore

from .errors import CallTimeout, CheckoutTimeout, ConfigurationError, WarmPoolError
from .pool import AgentPool
from .signal import Signal
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .extension import WarmPool

__all__ = ["HANDLE_TASK", "pool_task", "register_handle_task"]

#: The name of the task that carries signals to a pool (routed to the pool's queue).
HANDLE_TASK = "celery_warmpool.handle"


def register_handle_task(warm: WarmPool) -> Task:  # type: ignore[type-arg]
    """Register, on ``warm``'s app, the task that runs signals on a pool's agents."""
    watchdogs: dict[int, Watchdog] = {}
    creating = threading.Lock()

    def watchdog() -> Watchdog:
        # One per process: a prefork child must not share its parent's thread.
        pid = os.getpid()
        found = watchdogs.get(pid)
        if found is None:
            with creating:
                found = watchdogs.get(pid)
                if found is None:
                    watchdogs.clear()
                    found = watchdogs[pid] = Watchdog()
        return found

    def handle(task: Task, pool: str, signals: list[dict[str, Any]],  # type: ignore[type-arg]
               deadline: float | None = None, call_timeout: float | None = None,
               transaction: bool = False) -> list[dict[str, Any]]:
        """Run ``signals`` on one agent of ``pool``; return the replies as JSON data."""
        agent_pool = warm.local_pool(pool)
        events = [Signal.parse(signal) for signal in signals]
        timeout = None
        if deadline is not None:
            timeout = deadline - time.time()
            if timeout <= 0:
                # The caller has stopped waiting: the work must not run late.
                raise CheckoutTimeout(
                    f"pool {pool!r}: the call waited {-timeout:.3f}s past its checkout "
                    "timeout before a worker took it; it was not run",
                    pool, -timeout, agent_pool.size, agent_pool.max_overflow)
        agent = agent_pool.checkout(timeout=timeout)
        if call_timeout is None:
            with agent_pool.lent(agent):
                replies = agent_pool.run_signals(agent, events, transaction=transaction)
            return [reply.to_wire() for reply in replies]
        # The work runs here, inline; if it overruns, the watchdog answers the caller with
        # CallTimeout at the deadline and replaces the agent, and this task's own late
        # outcome is dropped (Ignore) so it cannot overwrite that answer.
        request = task.request
        label = ",".join(event.type for event in events)
        dog = watchdog()
        token = dog.watch(call_timeout, functools.partial(
            _overran, task, request, agent_pool, agent, label, call_timeout))
        lease = None
        try:
            with agent_pool.lent(agent) as lease:
                try:
                    replies = agent_pool.run_signals(agent, events, transaction=transaction)
                finally:
                    lease.abandoned = not dog.done(token)
        finally:
            if lease is not None and lease.abandoned:
                agent_pool.finish_abandoned(agent)
                raise Ignore()
        return [reply.to_wire() for reply in replies]

    registered: Task = warm.app.task(  # type: ignore[type-arg]
        name=HANDLE_TASK, bind=True, acks_late=True, throws=(WarmPoolError,), shared=False,
    )(handle)
    return registered


def _overran(task: Task, request: Any, agent_pool: AgentPool[Any],  # type: ignore[type-arg]
             agent: Any, label: str, call_timeout: float) -> None:
    """At the deadline of overrunning work: replace its agent, tell the caller."""
    agent_pool.abandon(agent, f"call_timeout={call_timeout}s exceeded")
    error = CallTimeout(
        f"pool {agent_pool.name!r}: {label} took longer than call_timeout={call_timeout}s; "
        f"agent {agent.id} is being replaced", label, call_timeout)
    if request.id is not None:  # None when the task was called directly, not sent
        # The request goes along: result backends that reply to the caller (rpc://) need
        # its reply_to, and this runs on the watchdog's thread, not the task's.
        task.backend.mark_as_failure(request.id, error, request=request)


def pool_task(warm: WarmPool, pool: str, function: Callable[..., Any],
              options: dict[str, Any]) -> Task:  # type: ignore[type-arg]
    """Make ``function(agent, *args, **kwargs)`` a Celery task run on an agent of ``pool``.

    Callers pass only ``*args, **kwargs``; the agent is checked out before the function
    runs and checked in after, whatever happens (return, exception, retry, time limit).
    With ``bind=True`` the function gets the task first: ``function(task, agent, ...)``.
    ``checkout_timeout`` (seconds, default: wait) bounds the wait for an agent.
    """
    spec = warm.spec(pool)
    bind = bool(options.pop("bind", False))
    checkout_timeout = options.pop("checkout_timeout", None)
    # The pool's queue is the default destination; task_routes and queue= still win.
    queue = options.pop("queue", None) or spec.queue
    base = options.pop("base", None) or warm.app.Task
    options["base"] = type("PoolTask", (_PoolQueue, base), {"warmpool_queue": queue})
    options.setdefault("acks_late", True)
    options.setdefault("shared", False)

    @functools.wraps(function)
    def run(task: Task, *args: Any, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        with warm.local_pool(pool).agent(timeout=checkout_timeout) as agent:
            if bind:
                return function(task, agent, *args, **kwargs)
            return function(agent, *args, **kwargs)

    run.__signature__ = _without_agent(function, bind)  # type: ignore[attr-defined]
    registered: Task = warm.app.task(bind=True, **options)(run)  # type: ignore[type-arg,no-untyped-call]
    return registered


class _PoolQueue(Task):  # type: ignore[type-arg]
    """Sends the task to its pool's queue unless routed elsewhere."""

    warmpool_queue: str = ""

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, **options: Any) -> Any:
        if "queue" not in options and not self._routed(args, kwargs, options):
            options["queue"] = self.warmpool_queue
        return super().apply_async(args, kwargs, task_id, producer, link, link_error,
                                   shadow, **options)

    def _routed(self, args: Any, kwargs: Any, options: dict[str, Any]) -> bool:
        routes = getattr(self.app.amqp.router, "routes", ())
        return any(route(self.name, args, kwargs, options, task=self) for route in routes)


def _without_agent(function: Callable[..., Any], bind: bool) -> inspect.Signature:
    # Celery checks call arguments against the task's signature: hide the agent
    # parameter, which the worker supplies, and add the bound task parameter.
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    agent_at = 1 if bind else 0
    if len(parameters) <= agent_at or parameters[agent_at].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise ConfigurationError(
            f"{function.__qualname__} must take the agent as its "
            f"{'second' if bind else 'first'} positional parameter", field="task")
    rest = parameters[agent_at + 1:]
    task_parameter = inspect.Parameter("task", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=[task_parameter, *rest])
