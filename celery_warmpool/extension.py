"""WarmPool: the Celery extension that gives a Celery app warm agent pools."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
from celery import Celery, Task

from . import control, prefork, telemetry
from .agent import Agent
from .board import StatusBoard
from .bootstep import WarmPoolStep
from .client import PoolClient, SignalLike
from .errors import ConfigurationError, UnknownPool
from .execution import ExecutionPool, execution_pool_of, per_process_spec
from .host import PoolHost
from .pool import AgentPool
from .reply import AgentReply
from .spec import PoolSpec
from .status import PoolStatus
from .tasks import pool_task, register_handle_task

__all__ = ["WarmPool"]

logger = logging.getLogger(__name__)

#: Seconds after which a prefork child's silent status slot is taken as gone.
STALE_AFTER = 2.0

assert control  # imported for its inspect command registration

#: Telemetry that changes a pool's numbers: a prefork child republishes its status on it.
CHANGES = (telemetry.agent_checkout, telemetry.agent_checkin, telemetry.agent_replaced,
           telemetry.agent_started, telemetry.agent_dismissed, telemetry.pool_exhausted)


def _notify(changed: threading.Event) -> Callable[..., None]:
    def receiver(sender: Any = None, **kwargs: Any) -> None:
        changed.set()

    return receiver


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
        self._specs: dict[str, PoolSpec] | None = None
        if pools is not None:
            self._specs = self._parse(pools)
        self._host_names = list(host) if host is not None else None
        # Set in the worker (see WarmPoolStep); inherited by prefork children on fork.
        self.node: str | None = None
        self.execution: ExecutionPool | None = None
        self.process_specs: dict[str, PoolSpec] = {}
        self.board: StatusBoard | None = None
        self.host: PoolHost | None = None
        self._process_index = 0
        self._publisher_stop = threading.Event()
        self._host_lock = threading.Lock()
        self.client = PoolClient(self)
        app.warmpool = self  # type: ignore[attr-defined]
        app.steps["worker"].add(WarmPoolStep)
        app.user_options["worker"].add(click.Option(
            ["--warmpool-pools"], default=None,
            help="Comma-separated warm pools this worker hosts (default: all)."))
        self.handle_task = register_handle_task(self)
        prefork.connect(self)

    # -- configuration -----------------------------------------------------------------

    @property
    def specs(self) -> dict[str, PoolSpec]:
        """Every configured pool's spec, by name (read once from ``app.conf`` if needed)."""
        if self._specs is None:
            self._specs = self._parse(self.app.conf.get("warmpool_pools") or [])
        return self._specs

    def spec(self, pool: str) -> PoolSpec:
        """The spec of ``pool``.

        Raises:
            UnknownPool: no pool of that name is configured.
        """
        try:
            return self.specs[pool]
        except KeyError:
            known = ", ".join(sorted(self.specs)) or "none"
            raise UnknownPool(f"no pool named {pool!r} is configured (pools: {known})",
                              pool) from None

    @staticmethod
    def _parse(pools: Iterable[Any]) -> dict[str, PoolSpec]:
        if isinstance(pools, str | bytes | Mapping):
            raise ConfigurationError(
                "warm pools must be a list of PoolSpec, mappings or (name, agent, {options})",
                field="pools")
        specs: dict[str, PoolSpec] = {}
        for given in pools:
            spec = PoolSpec.parse(given).with_environment()
            if spec.name in specs:
                raise ConfigurationError(f"pool {spec.name!r} is configured twice",
                                         spec.name, "name")
            specs[spec.name] = spec
        return specs

    # -- tasks and calls ---------------------------------------------------------------

    def task(self, pool: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:  # type: ignore[type-arg]
        """Decorate ``function(agent, *args, **kwargs)`` as a task run on ``pool``'s agents.

        Callers use ``.delay(*args)`` / ``.apply_async(args).get()`` without the agent.
        Celery task options pass through; the task goes to the pool's queue and acks late
        unless told otherwise. ``checkout_timeout`` bounds the wait for an agent.
        """

        def decorator(function: Callable[..., Any]) -> Task:  # type: ignore[type-arg]
            return pool_task(self, pool, function, dict(options))

        return decorator

    def call(self, pool: str, signal: SignalLike, timeout: float = 5.0,
             call_timeout: float | None = 5.0) -> AgentReply:
        """Handle ``signal`` on an agent of ``pool``; see :meth:`PoolClient.call`."""
        return self.client.call(pool, signal, timeout=timeout, call_timeout=call_timeout)

    def cast(self, pool: str, signal: SignalLike, timeout: float | None = None,
             call_timeout: float | None = None) -> Any:
        """Send ``signal`` to ``pool`` without waiting; see :meth:`PoolClient.cast`."""
        return self.client.cast(pool, signal, timeout=timeout, call_timeout=call_timeout)

    def transaction(self, pool: str, signals: Iterable[SignalLike], timeout: float = 5.0,
                    call_timeout: float | None = 5.0) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing."""
        return self.client.transaction(pool, signals, timeout=timeout,
                                       call_timeout=call_timeout)

    def status(self, pool: str, timeout: float = 1.0) -> PoolStatus:
        """``pool``'s status over every node hosting it; see :meth:`PoolClient.status`."""
        return self.client.status(pool, timeout=timeout)

    # -- inside the worker -------------------------------------------------------------

    def prepare_worker(self, worker: Any, hosted: str | None = None) -> None:
        """Decide what this worker hosts and how; runs in the main process before forking."""
        self.node = worker.hostname
        self.execution = execution_pool_of(worker.pool_cls)
        names = self._hosted_names(hosted)
        autoscale = tuple(worker.autoscale) if getattr(worker, "autoscale", None) else None
        # Under --autoscale=max,min the worker starts min children: size is compared with
        # that, overflow with the room up to max.
        concurrency = int((worker.min_concurrency if autoscale else worker.concurrency) or 1)
        most = int(worker.max_concurrency or concurrency)
        self.process_specs = {}
        for name in names:
            spec, warnings = per_process_spec(self.spec(name), self.execution, concurrency,
                                              autoscale)
            for warning in warnings:
                logger.warning("warm pools: %s", warning)
            self.process_specs[name] = spec
            worker.app.amqp.queues.select_add(spec.queue)
        if self.execution == "prefork":
            self.board = StatusBoard(slots=max(most, concurrency, 1))

    def _hosted_names(self, hosted: str | None) -> list[str]:
        chosen: Iterable[str] | None = None
        if hosted:
            chosen = [name.strip() for name in hosted.split(",") if name.strip()]
        elif self._host_names is not None:
            chosen = self._host_names
        elif self.app.conf.get("warmpool_host_pools"):
            chosen = self.app.conf.get("warmpool_host_pools")
        if chosen is None:
            return list(self.specs)
        names = list(chosen)
        unknown = [name for name in names if name not in self.specs]
        if unknown:
            raise ConfigurationError(
                f"this worker is asked to host unknown pools {unknown} "
                f"(configured: {sorted(self.specs)})", field="warmpool_pools")
        return names

    def start_process(self, index: int) -> None:
        """Build this process's pools (once); publish their status if a child."""
        with self._host_lock:
            if self.host is not None:
                return
            self._process_index = index
            self.host = PoolHost(self.process_specs.values(), node=self.node,
                                 process_index=index if self.execution == "prefork" else None)
            host = self.host
        if self.board is not None:
            self._publisher_stop = threading.Event()
            changed = threading.Event()
            for event in CHANGES:
                event.connect(_notify(changed), weak=False)
            self.board.publish_forever(index, host.snapshot, self._publisher_stop, changed)
        host.start()
        self._warm_up_connections()
        if host.failures:
            logger.error("warm pools: process %d could not build %s; calls to them fail "
                         "with PoolStartError until they start", host.pid, sorted(host.failures))

    def _warm_up_connections(self) -> None:
        # The first reply a process stores would otherwise open the result backend's
        # connection: do it now, so the first call after "ready" is as fast as the rest.
        try:
            client = getattr(self.app.backend, "client", None)
            ping = getattr(client, "ping", None)
            if callable(ping):
                ping()
        except Exception:
            logger.warning("warm pools: could not pre-connect the result backend",
                           exc_info=True)

    def stop_process(self) -> None:
        """Close this process's pools (every agent torn down once)."""
        with self._host_lock:
            host, self.host = self.host, None
        if host is None:
            return
        self._publisher_stop.set()
        host.close()
        if self.board is not None and self.execution == "prefork":
            self.board.clear(self._process_index)

    def wait_for_children(self, worker: Any) -> None:
        """Block until every prefork child reports its pools started (or give up)."""
        if self.board is None or not self.process_specs:
            return
        expected = int(getattr(worker, "min_concurrency", None) or worker.concurrency or 1)
        limit = max(spec.start_timeout for spec in self.process_specs.values()) + 5.0
        deadline = time.monotonic() + limit
        last_report = 0.0
        while True:
            reports = self.board.read_all(max_age=STALE_AFTER)
            started = [report for report in reports if report.get("started")]
            if len(started) >= expected:
                failed = [report for report in started if report.get("errors")]
                for report in failed:
                    logger.error("warm pools: child %s failed to start pools: %s",
                                 report.get("pid"), report.get("errors"))
                return
            now = time.monotonic()
            if now >= deadline:
                logger.error("warm pools: only %d of %d children warm after %.0fs",
                             len(started), expected, limit)
                return
            if now - last_report >= 2.0:
                logger.info("warm pools: waiting for children to warm up (%d of %d ready)",
                            len(started), expected)
                last_report = now
            time.sleep(0.05)

    def local_pool(self, pool: str) -> AgentPool[Agent[Any]]:
        """The pool ``pool`` in this process.

        Outside a worker (eager tasks, scripts), this process's pools are built on
        first use.

        Raises:
            UnknownPool: the pool is not hosted here.
            PoolStartError: it is hosted here but could not start.
        """
        host = self.host
        if host is None:
            if self.execution is not None:
                raise UnknownPool(
                    f"pool {pool!r}: this worker process hosts no warm pools", pool)
            self.spec(pool)
            with self._host_lock:
                if self.host is None:
                    # Published only once started: other threads wait on the lock.
                    self.process_specs = dict(self.specs)
                    started = PoolHost(self.process_specs.values(), node=self.node)
                    started.start()
                    self.host = started
                host = self.host
        return host.get(pool)

    def process_statuses(self) -> list[PoolStatus]:
        """Every process's pool statuses on this node (read from children under prefork)."""
        if self.board is not None:
            found: list[PoolStatus] = []
            for report in self.board.read_all(max_age=STALE_AFTER):
                found.extend(PoolStatus.model_validate(data)
                             for data in report.get("pools", {}).values())
            return found
        host = self.host
        return list(host.statuses().values()) if host is not None else []

    def node_report(self, pool: str | None = None) -> dict[str, Any]:
        """This node's status per pool, each with its per-process detail (JSON data)."""
        by_pool: dict[str, list[PoolStatus]] = {}
        for status in self.process_statuses():
            if pool is None or status.pool == pool:
                by_pool.setdefault(status.pool, []).append(status)
        return {name: PoolStatus.combine(name, parts, node=self.node).model_dump(mode="json")
                for name, parts in by_pool.items()}

    def stats(self) -> dict[str, Any]:
        """A compact summary per pool for the worker's stats (Flower, ``inspect stats``)."""
        summary: dict[str, Any] = {}
        for name, data in self.node_report().items():
            # Flower prints each stats value as one line of text: keep only the numbers,
            # leaving out what the key or the worker already says (pool name, node).
            for redundant in ("pool", "node", "pid", "process_index", "updated_at"):
                data.pop(redundant, None)
            if data.get("last_error") is None:
                data.pop("last_error", None)
            data["processes"] = len(data.pop("processes", []))
            data["execution_pool"] = self.execution
            summary[name] = data
        return summary
