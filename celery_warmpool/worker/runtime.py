"""WorkerRuntime: one worker's warm pools through its life.

In the worker's main process, before any child is forked, :meth:`WorkerRuntime.prepare`
decides what this node hosts and how (its :class:`ExecutionModel`). The pools are then
built where the execution pool runs tasks: in each prefork child at
``worker_process_init`` (see :mod:`.prefork`), or in the main process for threads,
gevent, eventlet and solo. Prefork children report their numbers to the main process
through the status board, which answers the ``warmpool_status`` command from them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from ..configuration import PoolConfiguration
from ..core.agent import Agent
from ..core.errors import UnknownPool
from ..core.pool import AgentPool
from ..core.spec import PoolSpec
from ..core.status import PoolCounters, PoolStatus
from ..wire.dead_letters import DeadLetter, DeadLetters
from ..wire.membership import NodeRecord
from ..wire.outages import Outages
from ..wire.scoped import scoped
from .backlog import NodeBacklog
from .errands import Errands
from .execution import ExecutionModel, execution_model_of
from .preload import preload
from .process_pools import ProcessPools
from .status_board import STALE_AFTER, StatusBoard, StatusPublisher

__all__ = ["NodeService", "WorkerRuntime"]

logger = logging.getLogger(__name__)

#: Seconds a dead letter is tried while the broker is away, before it is given up.
DEAD_LETTER_WITHIN = 30.0
#: Seconds a process that closes its pools waits for its errands still running.
ERRANDS_AT_EXIT = 5.0
#: Slots on the status board beyond the worker's concurrency, for children added later
#: (autoscaling, a resize). A slot costs address space, not memory, until written.
SPARE_SLOTS = 64


class NodeService(Protocol):
    """Something a worker node runs beside its pools (the metrics server, say), started
    once its agents are warm and stopped as it shuts down."""

    def start(self) -> None:
        """Start serving (in the worker's main process)."""

    def stop(self) -> None:
        """Stop serving. Safe to call twice."""


#: Makes a node's service, or ``None`` when it is off (called before prefork children
#: fork, so that they inherit what it sets up).
ServiceFactory = Callable[["WorkerRuntime"], NodeService | None]


class WorkerRuntime:
    """The warm pools of one worker node of an app (inert outside a worker)."""

    def __init__(self, app: Any, configuration: PoolConfiguration,
                 dead_letters: DeadLetters) -> None:
        self.app = app
        self.configuration = configuration
        self.dead_letters = dead_letters
        # Set in the worker's main process by prepare(); inherited by children on fork.
        self.node: str | None = None
        self.started_at = 0.0
        self.execution: ExecutionModel | None = None
        self.process_specs: dict[str, PoolSpec] = {}
        self.board: StatusBoard | None = None
        self.publisher: StatusPublisher | None = None
        #: Runs after each status write in a child (a service may set it).
        self.after_publish: Any = None
        #: What makes the node's services; the layers above the worker (operations:
        #: metrics) add theirs, so that the worker imports none of them.
        self.service_factories: list[ServiceFactory] = []
        #: The per-pool consumers of this node's main process (see .consumers).
        self.consumers: Any = None
        #: What answers calls that outwait their deadline in this node (a LateCalls).
        self.late_calls: Any = None
        #: What the node holds of each pool's work (see .backlog).
        self.backlog = NodeBacklog(self)
        self.pools: ProcessPools | None = None
        #: What each hosted pool's ``preload`` returned, by pool (shared across the fork).
        self.shared: dict[str, Any] = {}
        #: Casts dead-lettered by this node's main process while its agents live in the
        #: children (a cast whose child died too often): added to the node's counters.
        self._node_dead_lettered: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def in_worker(self) -> bool:
        """Whether this process belongs to a worker that was prepared."""
        return self.execution is not None

    # -- in the main process, before the fork ------------------------------------------

    def prepare(self, worker: Any, hosted: str | None = None) -> None:
        """Decide what this node hosts and how; make the children's status board."""
        self.node = worker.hostname
        self.started_at = time.time()
        self.execution = execution_model_of(worker.pool_cls)
        autoscale = tuple(worker.autoscale) if getattr(worker, "autoscale", None) else None
        # Under --autoscale=max,min the worker starts min children: size is compared with
        # that, overflow with the room up to max.
        concurrency = int((worker.min_concurrency if autoscale else worker.concurrency) or 1)
        most = int(worker.max_concurrency or concurrency)
        self.process_specs = {}
        for name in self.configuration.hosted(hosted):
            spec, warnings = self.execution.process_spec(
                self.configuration.spec(name), concurrency, autoscale)
            for warning in warnings:
                logger.warning("warm pools: %s", warning)
            self.process_specs[name] = spec
        self.shared = preload(self.process_specs.values(),
                              before_fork=self.execution.in_children)
        if self.execution.in_children:
            self.board = StatusBoard(slots=max(most, concurrency) + SPARE_SLOTS)
            self.publisher = StatusPublisher(self.board)

    def wait_for_children(self, worker: Any) -> None:
        """Block until every prefork child reports its pools started (or give up)."""
        if self.board is None or not self.process_specs:
            return
        expected = int(getattr(worker, "min_concurrency", None) or worker.concurrency or 1)
        limit = max(spec.start_timeout for spec in self.process_specs.values()) + 5.0
        deadline = time.monotonic() + limit
        last_report = 0.0
        while True:
            started = [report for report in self.board.read_all(max_age=STALE_AFTER)
                       if report.get("started")]
            if len(started) >= expected:
                for report in started:
                    if report.get("errors"):
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

    def make_services(self) -> list[NodeService]:
        """The services this node runs (see :attr:`service_factories`), made now."""
        return [service for factory in self.service_factories
                if (service := factory(self)) is not None]

    # -- where the agents live ---------------------------------------------------------

    def start_process(self, index: int) -> None:
        """Build this process's pools (once); publish their status from a prefork child."""
        with self._lock:
            if self.pools is not None:
                return
            assert self.execution is not None, "start_process() before prepare()"
            pools = self.pools = ProcessPools(
                self.process_specs.values(), node=self.node,
                process_index=index if self.execution.in_children else None,
                shared=self.shared,
                watch=None if self.publisher is None else self.publisher.watch)
        if self.publisher is not None:
            self.publisher.start(index, pools.snapshot, self.after_publish)
        pools.start()
        self._connect_result_backend()
        if pools.failures:
            logger.error("warm pools: process %d could not build %s; calls to them fail "
                         "with PoolStartError until they start", pools.pid,
                         sorted(pools.failures))

    def stop_process(self) -> None:
        """Close this process's pools (every agent torn down once)."""
        with self._lock:
            pools, self.pools = self.pools, None
        if pools is None:
            return
        if self.publisher is not None:
            self.publisher.stop()
        pools.close()
        # Dead letters and answers still on their way: a moment for them, not forever.
        Errands.of_this_process().wait(ERRANDS_AT_EXIT)

    def local_pool(self, pool: str) -> AgentPool[Agent[Any]]:
        """The pool ``pool`` in this process.

        Outside a worker (eager tasks, scripts), this process's pools are built on
        first use.

        Raises:
            UnknownPool: the pool is not hosted here.
            PoolStartError: it is hosted here but could not start.
        """
        pools = self.pools
        if pools is None:
            if self.in_worker:
                raise UnknownPool(
                    f"pool {pool!r}: this worker process hosts no warm pools", pool)
            pools = self._start_outside_a_worker(pool)
        return pools.get(pool)

    def _start_outside_a_worker(self, pool: str) -> ProcessPools:
        self.configuration.spec(pool)
        with self._lock:
            if self.pools is None:
                # Published only once started: other threads wait on the lock.
                self.process_specs = dict(self.configuration.specs)
                self.shared = preload(self.process_specs.values(), before_fork=False)
                started = ProcessPools(self.process_specs.values(), node=self.node,
                                       shared=self.shared)
                started.start()
                self.pools = started
            return self.pools

    def _connect_result_backend(self) -> None:
        # The first reply a process stores would otherwise open the result backend's
        # connection: do it now, so the first call after "ready" is as fast as the rest.
        try:
            client = getattr(scoped(self.app).results.backend, "client", None)
            ping = getattr(client, "ping", None)
            if callable(ping):
                ping()
        except Exception:
            logger.warning("warm pools: could not pre-connect the result backend",
                           exc_info=True)

    def dead_letter(self, pool: str, signal: dict[str, Any], error: BaseException,
                    **where: Any) -> None:
        """Send a cast that cannot succeed to ``pool``'s dead-letter queue, and count it.

        ``where`` says where it failed (``task_id``, ``pid``, ``attempts``,
        ``may_have_run``). It is sent as an errand (see :mod:`.errands`): a broker that is
        away delays it, for :data:`DEAD_LETTER_WITHIN` seconds at most, then it is logged;
        the cast's own result carries the error either way.
        """
        letter = DeadLetter.of(pool, signal, error, node=self.node, **where)
        spec = self.configuration.spec(pool)

        def send() -> None:
            self.dead_letters.send(spec, letter)
            pools = self.pools
            if pools is not None:
                pools.dead_lettered[pool] += 1
            else:
                self._node_dead_lettered[pool] += 1

        Errands.of_this_process().run(
            f"pool {pool!r}: the dead letter of cast {letter.task_id} ({letter.error_type}: "
            f"{letter.error})", send, outages=Outages.of(self.app), within=DEAD_LETTER_WITHIN)

    def node_record(self) -> NodeRecord:
        """What this node says of itself in its membership record."""
        assert self.execution is not None
        capacity = (self.consumers.capacities() if self.consumers is not None
                    else {name: spec.size + spec.max_overflow
                          for name, spec in self.process_specs.items()})
        return NodeRecord(node=self.node or "", pools=sorted(self.process_specs),
                          execution_pool=self.execution.name, capacity=capacity,
                          started_at=self.started_at, pid=os.getpid())

    # -- what the node reports ---------------------------------------------------------

    def main_process_counts(self) -> list[PoolStatus]:
        """What this node's main process counted itself (dead letters of lost children)."""
        return [PoolStatus(pool=name, state="ready", size=0, max_overflow=0, available=0,
                           overflow=0, checked_out=0, waiting=0,
                           counters=PoolCounters(dead_lettered=count))
                for name, count in self._node_dead_lettered.items()]

    def process_statuses(self) -> list[PoolStatus]:
        """Every process's pool statuses on this node (read from children under prefork)."""
        if self.board is not None:
            return [PoolStatus.model_validate(data)
                    for report in self.board.read_all(max_age=STALE_AFTER)
                    for data in report.get("pools", {}).values()]
        pools = self.pools
        return list(pools.statuses().values()) if pools is not None else []

    def node_statuses(self, pool: str | None = None) -> dict[str, PoolStatus]:
        """This node's status per pool (``pool`` only, if given), processes inside."""
        by_pool: dict[str, list[PoolStatus]] = {}
        for status in self.process_statuses():
            if pool is None or status.pool == pool:
                by_pool.setdefault(status.pool, []).append(status)
        combined = {name: PoolStatus.combine(name, parts, node=self.node)
                    for name, parts in by_pool.items()}
        if self.consumers is not None:
            loads = self.backlog.loads
            for name, (taken, window) in self.consumers.reservations().items():
                if name in combined:
                    node = self.node or ""
                    update: dict[str, Any] = {"reservations": {node: (taken, window)}}
                    if name in loads:
                        update["loads"] = {node: loads[name]}
                    combined[name] = combined[name].model_copy(update=update)
        for name, count in self._node_dead_lettered.items():
            if name in combined:
                status = combined[name]
                counters = status.counters.model_copy(
                    update={"dead_lettered": status.counters.dead_lettered + count})
                combined[name] = status.model_copy(update={"counters": counters})
        return combined

    def node_report(self, pool: str | None = None) -> dict[str, Any]:
        """:meth:`node_statuses` as JSON data, for the ``warmpool_status`` command (on the
        event loop: the pools' loads are measured afresh)."""
        self.backlog.measure()
        return {name: status.model_dump(mode="json")
                for name, status in self.node_statuses(pool).items()}
