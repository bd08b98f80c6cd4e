"""Pool-aware tasks: ``@warm.task(pool="x")`` functions that get a checked-out agent first."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from ..core.errors import ConfigurationError, HandedBack
from ..core.spec import PoolSpec
from ..wire.queues import pool_queue
from .requests import REQUEST
from .runtime import WorkerRuntime

__all__ = ["pool_task"]


def pool_task(app: Celery, runtime: WorkerRuntime, spec: PoolSpec,
              function: Callable[..., Any], options: dict[str, Any]) -> Task:  # type: ignore[type-arg]
    """Make ``function(agent, *args, **kwargs)`` a Celery task run on an agent of ``spec``.

    Callers pass only ``*args, **kwargs``; the agent is checked out before the function
    runs and checked in after, whatever happens (return, exception, retry, time limit).
    With ``bind=True`` the function gets the task first: ``function(task, agent, ...)``.
    ``checkout_timeout`` (seconds, default: wait) bounds the wait for an agent.
    """
    pool = spec.name
    bind = bool(options.pop("bind", False))
    checkout_timeout = options.pop("checkout_timeout", None)
    # The pool's queue is the default destination; task_routes and queue= still win.
    queue = options.pop("queue", None) or spec.queue
    base = options.pop("base", None) or app.Task
    options["base"] = type("PoolTask", (_PoolQueue, base), {
        "warmpool_queue": queue, "warmpool_pool": pool, "warmpool_kind": "task",
        "Request": REQUEST})
    options.setdefault("acks_late", True)
    options.setdefault("shared", False)

    @functools.wraps(function)
    def run(task: Task, *args: Any, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        agent_pool = runtime.local_pool(pool)
        try:
            agent = agent_pool.checkout(timeout=checkout_timeout)
        except HandedBack:
            # The node is draining or stopping: back to the broker, for another node.
            raise Reject(requeue=True) from None
        with agent_pool.lent(agent):
            if bind:
                return function(task, agent, *args, **kwargs)
            return function(agent, *args, **kwargs)

    run.__signature__ = _without_agent(function, bind)  # type: ignore[attr-defined]
    registered: Task = app.task(bind=True, **options)(run)  # type: ignore[type-arg,no-untyped-call]
    return registered


class _PoolQueue(Task):  # type: ignore[type-arg]
    """Sends the task to its pool's queue unless routed elsewhere."""

    warmpool_queue: str = ""

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, **options: Any) -> Any:
        if "queue" not in options and not self._routed(args, kwargs, options):
            # The queue as the package declares it: the app's may not know it.
            options["queue"] = pool_queue(self.app, self.warmpool_queue)
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
