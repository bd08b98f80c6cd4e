"""WarmPool: the Celery extension that gives a Celery app warm agent pools.

It wires three parts onto the app and adds nothing of its own:

- :class:`~celery_warmpool.configuration.PoolConfiguration`: which pools there are;
- the caller's side (:mod:`celery_warmpool.client`): call, cast, transaction, status;
- the worker's side (:class:`~celery_warmpool.worker.runtime.WorkerRuntime` and the
  bootstep): where agents live and how calls are served, inert outside a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import click
from celery import Celery, Task

from .client.calls import PoolClient, SignalLike
from .client.fanout import afan_out, fan_out
from .client.shells import AsyncStream
from .client.status import StatusReader
from .configuration import PoolConfiguration
from .core.agent import Agent
from .core.pool import AgentPool
from .core.reply import AgentReply
from .core.spec import PoolSpec
from .core.status import PoolStatus
from .core.stream import Stream
from .ops import metrics
from .wire.dead_letters import DeadLetters
from .wire.membership import NodeRecord
from .worker import control, prefork
from .worker.bootstep import WarmPoolStep
from .worker.consumers import PoolConsumers
from .worker.handler import register_tasks
from .worker.pool_tasks import pool_task
from .worker.runtime import WorkerRuntime

__all__ = ["WarmPool"]

assert control  # imported for its inspect command registration


class WarmPool:
    """Warm agent pools for a Celery app.

    ::

        app = Celery("proj", broker="redis://127.0.0.1:6379/0", backend="redis://...")
        warm = WarmPool(app, pools=[PoolSpec("search", SearchAgent, size=2)])

        @warm.task(pool="search")
        def search(agent, query):
            return agent.search(query)

        warm.call("search", Signal.new("search.run", {"query": "pools"}))

    Without ``pools``, the specs are read from ``app.conf.warmpool_pools`` (a list of
    :class:`PoolSpec`, mappings, or ``(name, agent, {options})`` tuples; agents as
    classes or ``"module:Class"`` strings). ``WARMPOOL_<POOL>_<OPTION>`` environment
    variables override options. A worker hosts every pool unless ``host`` (or the worker
    option ``--warmpool-pools a,b``, or ``app.conf.warmpool_host_pools``) names a subset.

    Raises:
        ConfigurationError: a spec is invalid; the message names the pool and the field.
    """

    def __init__(self, app: Celery, pools: Iterable[Any] | None = None, *,
                 host: Iterable[str] | None = None) -> None:
        self.app = app
        self.configuration = PoolConfiguration(app, pools, host)
        self.dead_letters = DeadLetters(app)
        self.runtime = WorkerRuntime(app, self.configuration, self.dead_letters)
        self.runtime.service_factories.append(metrics.exporter_for)
        self.handle_task, self.cast_task = register_tasks(app, self.runtime)
        self.client = PoolClient(self.configuration, self.handle_task, self.cast_task)
        self.status_reader = StatusReader(app, self.configuration)
        app.warmpool = self  # type: ignore[attr-defined]
        app.steps["worker"].add(WarmPoolStep)
        app.steps["consumer"].add(PoolConsumers)
        app.user_options["worker"].add(click.Option(
            ["--warmpool-pools"], default=None,
            help="Comma-separated warm pools this worker hosts (default: all)."))
        prefork.connect(self.runtime)

    @property
    def specs(self) -> dict[str, PoolSpec]:
        """Every configured pool's spec, by name."""
        return self.configuration.specs

    def spec(self, pool: str) -> PoolSpec:
        """The spec of ``pool``; raises :class:`UnknownPool` if there is none."""
        return self.configuration.spec(pool)

    def task(self, pool: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:  # type: ignore[type-arg]
        """Decorate ``function(agent, *args, **kwargs)`` as a task run on ``pool``'s agents.

        Callers use ``.delay(*args)`` / ``.apply_async(args).get()`` without the agent.
        Celery task options pass through; the task goes to the pool's queue and acks late
        unless told otherwise. ``checkout_timeout`` bounds the wait for an agent.
        """

        def decorator(function: Callable[..., Any]) -> Task:  # type: ignore[type-arg]
            return pool_task(self.app, self.runtime, self.spec(pool), function, dict(options))

        return decorator

    def call(self, pool: str, signal: SignalLike, timeout: float = 5.0,
             call_timeout: float | None = 5.0, *, model: str | None = None) -> AgentReply:
        """Handle ``signal`` on an agent of ``pool`` (for ``model``, in a pool with
        ``max_models``); see :meth:`PoolClient.call`."""
        return self.client.call(pool, signal, timeout=timeout, call_timeout=call_timeout,
                                model=model)

    def cast(self, pool: str, signal: SignalLike, timeout: float | None = None,
             call_timeout: float | None = None, *, model: str | None = None) -> Any:
        """Send ``signal`` to ``pool`` without waiting; see :meth:`PoolClient.cast`."""
        return self.client.cast(pool, signal, timeout=timeout, call_timeout=call_timeout,
                                model=model)

    def transaction(self, pool: str, signals: Iterable[SignalLike], timeout: float = 5.0,
                    call_timeout: float | None = 5.0, *,
                    model: str | None = None) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing."""
        return self.client.transaction(pool, signals, timeout=timeout,
                                       call_timeout=call_timeout, model=model)

    def status(self, pool: str, timeout: float = 1.0) -> PoolStatus:
        """``pool``'s status over every node hosting it; see :meth:`StatusReader.status`."""
        return self.status_reader.status(pool, timeout=timeout)

    def nodes(self, pool: str | None = None, timeout: float = 1.0) -> list[NodeRecord]:
        """The live nodes hosting ``pool``; see :meth:`StatusReader.nodes`."""
        return self.status_reader.nodes(pool, timeout=timeout)

    def stream(self, pool: str, signal: SignalLike, timeout: float = 5.0,
               call_timeout: float | None = 60.0, *, model: str | None = None) -> Stream:
        """Stream ``signal``'s chunks from an agent of ``pool``; see
        :meth:`PoolClient.stream`."""
        return self.client.stream(pool, signal, timeout=timeout, call_timeout=call_timeout,
                                  model=model)

    def astream(self, pool: str, signal: SignalLike, timeout: float = 5.0,
                call_timeout: float | None = 60.0, *,
                model: str | None = None) -> AsyncStream:
        """:meth:`stream` as an async iterator; see :meth:`PoolClient.astream`."""
        return self.client.astream(pool, signal, timeout=timeout, call_timeout=call_timeout,
                                   model=model)

    def map(self, pool: str, signals: Iterable[SignalLike], *, concurrency: int = 64,
            timeout: float = 5.0, call_timeout: float | None = 5.0,
            return_exceptions: bool = False, model: str | None = None) -> Iterator[Any]:
        """Call ``pool`` once per signal, many at once; see :func:`~.client.fanout.fan_out`."""
        return fan_out(self.client, pool, signals, concurrency=concurrency, timeout=timeout,
                       call_timeout=call_timeout, return_exceptions=return_exceptions,
                       model=model)

    # -- asyncio ---------------------------------------------------------------------------

    async def acall(self, pool: str, signal: SignalLike, timeout: float = 5.0,
                    call_timeout: float | None = 5.0, *,
                    model: str | None = None) -> AgentReply:
        """:meth:`call`, awaited; see :meth:`PoolClient.acall`."""
        return await self.client.acall(pool, signal, timeout=timeout,
                                       call_timeout=call_timeout, model=model)

    async def atransaction(self, pool: str, signals: Iterable[SignalLike],
                           timeout: float = 5.0, call_timeout: float | None = 5.0, *,
                           model: str | None = None) -> list[AgentReply]:
        """:meth:`transaction`, awaited."""
        return await self.client.atransaction(pool, signals, timeout=timeout,
                                              call_timeout=call_timeout, model=model)

    async def acast(self, pool: str, signal: SignalLike, timeout: float | None = None,
                    call_timeout: float | None = None, *, model: str | None = None) -> Any:
        """:meth:`cast`, awaited: it returns once the message is published."""
        return await self.client.acast(pool, signal, timeout=timeout,
                                       call_timeout=call_timeout, model=model)

    async def astatus(self, pool: str, timeout: float = 1.0) -> PoolStatus:
        """:meth:`status`, awaited (the nodes are asked from a thread)."""
        return await asyncio.to_thread(self.status, pool, timeout)

    async def anodes(self, pool: str | None = None, timeout: float = 1.0) -> list[NodeRecord]:
        """:meth:`nodes`, awaited (read from a thread)."""
        return await asyncio.to_thread(self.nodes, pool, timeout)

    def amap(self, pool: str, signals: Iterable[SignalLike] | AsyncIterable[SignalLike], *,
             concurrency: int = 64, timeout: float = 5.0, call_timeout: float | None = 5.0,
             return_exceptions: bool = False, model: str | None = None) -> AsyncIterator[Any]:
        """:meth:`map` as an async iterator; see :func:`~.client.fanout.afan_out`."""
        return afan_out(self.client, pool, signals, concurrency=concurrency, timeout=timeout,
                        call_timeout=call_timeout, return_exceptions=return_exceptions,
                        model=model)

    def local_pool(self, pool: str) -> AgentPool[Agent[Any]]:
        """The pool ``pool`` in this process (built on first use outside a worker)."""
        return self.runtime.local_pool(pool)

