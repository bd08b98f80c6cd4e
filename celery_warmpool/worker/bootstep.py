"""WarmPoolStep: the worker bootstep that puts warm pools inside a Celery worker.

It runs in the worker's main process, after the execution pool has started and before
the consumer takes any message:

- in ``__init__`` (before prefork children are forked): validates the pools, picks the
  pools this node hosts, raises Celery's
  ``worker_proc_alive_timeout`` so slow warm-ups are not killed, and makes the status
  board the children will write to;
- in ``start``: under threads, gevent and eventlet builds the pools in this process;
  under prefork waits until every child reports its agents warm (children build them at
  ``worker_process_init``, see :mod:`.prefork`). Each pool's queue is then consumed with
  its own bound (see :mod:`.consumers`), and the node's membership record and backlog
  reports are kept fresh (see :mod:`.heartbeat`, :mod:`.backlog`);
- in ``info``: adds the pools to the worker's stats (``celery inspect stats``, Flower;
  see :mod:`.stats`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from ..wire.membership import Membership
from . import scaling
from .backlog import BacklogReporter
from .heartbeat import Heartbeat
from .late_calls import LateCalls
from .stats import worker_stats

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["WarmPoolStep"]

logger = logging.getLogger(__name__)

#: Extra seconds Celery waits for a child beyond the slowest pool's ``start_timeout``.
ALIVE_MARGIN = 10.0


def _close_after_drain(runtime: WorkerRuntime) -> Any:
    def close(sender: Any = None, **kwargs: Any) -> None:
        runtime.stop_process()

    return close


def _hand_back_on_shutdown(runtime: WorkerRuntime) -> Any:
    def hand_back(sender: Any = None, **kwargs: Any) -> None:
        # Calls still waiting for an agent go back to the broker, for other nodes.
        scaling.hand_back_all(runtime)

    return hand_back


def _runtime(worker: Any) -> WorkerRuntime:
    runtime: WorkerRuntime = worker.app.warmpool.runtime
    return runtime


class WarmPoolStep(bootsteps.StartStopStep):
    """Build warm agent pools before the worker takes tasks; report them in stats."""

    label = "WarmPool"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, warmpool_pools: str | None = None, **kwargs: Any) -> None:
        runtime = _runtime(worker)
        runtime.prepare(worker, hosted=warmpool_pools)
        assert runtime.execution is not None
        alive = max((spec.start_timeout for spec in runtime.process_specs.values()),
                    default=0.0)
        wanted = alive + ALIVE_MARGIN
        if runtime.execution.in_children and worker.app.conf.worker_proc_alive_timeout < wanted:
            # Celery reads this when the execution pool starts, which is after __init__.
            worker.app.conf.worker_proc_alive_timeout = wanted
        # Before the fork, so that prefork children record metrics too (a service that
        # the operations layer plugs in: see WorkerRuntime.services).
        self.services = runtime.make_services()
        self.heartbeat: Heartbeat | None = None
        self.reporter: BacklogReporter | None = None
        signals.worker_shutdown.connect(_close_after_drain(runtime), weak=False)
        signals.worker_shutting_down.connect(_hand_back_on_shutdown(runtime), weak=False)
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        runtime = _runtime(worker)
        assert runtime.execution is not None
        started = time.monotonic()
        if runtime.execution.in_children:
            runtime.wait_for_children(worker)
        else:
            runtime.start_process(index=0)
        if runtime.process_specs and getattr(worker, "timer", None) is not None:
            runtime.late_calls = LateCalls(worker.app)
            runtime.late_calls.start(worker.timer)
        for service in self.services:
            service.start()
        if runtime.process_specs:
            self.heartbeat = Heartbeat(Membership(worker.app), runtime.node_record)
            self.heartbeat.start()
            # Only now, warm: the node's capacity counts from here (see .backlog).
            self.reporter = BacklogReporter(runtime, runtime.backlog)
            self.reporter.start()
        logger.info("warm pools ready on %s in %.2fs: %s", runtime.node,
                    time.monotonic() - started,
                    ", ".join(sorted(runtime.process_specs)) or "none")

    def stop(self, worker: Any) -> None:
        # Warm shutdown: this step stops before the execution pool has drained, and
        # tasks still running or waiting need their agents. The pools close at
        # worker_shutdown, sent once the pool has stopped (see __init__). The node leaves
        # membership now: it takes no more work.
        self._leave()

    def terminate(self, worker: Any) -> None:
        # Cold shutdown: running tasks are being killed anyway; close the pools now.
        self._leave()
        _runtime(worker).stop_process()

    def _leave(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.reporter is not None:
            self.reporter.stop()
            self.reporter = None
        for service in self.services:
            service.stop()

    def info(self, worker: Any) -> dict[str, Any]:  # type: ignore[override]
        return worker_stats(_runtime(worker))
