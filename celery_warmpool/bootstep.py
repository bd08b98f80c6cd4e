"""WarmPoolStep: the worker bootstep that puts warm pools inside a Celery worker.

It runs in the worker's main process, after the execution pool has started and before
the consumer takes any message:

- in ``__init__`` (before prefork children are forked): validates the pools, picks the
  pools this node hosts, makes the worker consume their queues, raises Celery's
  ``worker_proc_alive_timeout`` so slow warm-ups are not killed, and makes the status
  board the children will write to;
- in ``start``: under threads, gevent and eventlet builds the pools in this process;
  under prefork waits until every child reports its agents warm (children build them at
  ``worker_process_init``, see :mod:`celery_warmpool.prefork`); then bounds the
  consumer's prefetch to the pools' capacity;
- in ``info``: adds a ``warmpool`` entry to the worker's stats (``celery inspect stats``,
  Flower).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

from . import metrics
from .deadlines import LateCalls
from .execution import node_capacity

if TYPE_CHECKING:
    from .extension import WarmPool

__all__ = ["WarmPoolStep"]

logger = logging.getLogger(__name__)

#: Extra seconds Celery waits for a child beyond the slowest pool's ``start_timeout``.
ALIVE_MARGIN = 10.0


def _close_after_drain(warm: WarmPool) -> Any:
    def close(sender: Any = None, **kwargs: Any) -> None:
        warm.stop_process()

    return close


def _extension(worker: Any) -> WarmPool:
    warm: WarmPool = worker.app.warmpool
    return warm


class WarmPoolStep(bootsteps.StartStopStep):
    """Build warm agent pools before the worker takes tasks; report them in stats."""

    label = "WarmPool"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, warmpool_pools: str | None = None, **kwargs: Any) -> None:
        warm = _extension(worker)
        warm.prepare_worker(worker, hosted=warmpool_pools)
        alive = max((spec.start_timeout for spec in warm.process_specs.values()), default=0.0)
        wanted = alive + ALIVE_MARGIN
        if warm.execution == "prefork" and worker.app.conf.worker_proc_alive_timeout < wanted:
            # Celery reads this when the execution pool starts, which is after __init__.
            worker.app.conf.worker_proc_alive_timeout = wanted
        # Before the fork, so that prefork children record timings too.
        self.metrics = metrics.exporter_for(warm)
        signals.worker_shutdown.connect(_close_after_drain(warm), weak=False)
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        warm = _extension(worker)
        started = time.monotonic()
        if warm.execution == "prefork":
            warm.wait_for_children(worker)
        else:
            warm.start_process(index=0)
        self._bound_prefetch(worker, warm)
        if warm.process_specs and getattr(worker, "timer", None) is not None:
            LateCalls(worker.app).start(worker.timer)
        if self.metrics is not None:
            self.metrics.start()
        logger.info("warm pools ready on %s in %.2fs: %s", warm.node,
                    time.monotonic() - started, ", ".join(sorted(warm.process_specs)) or "none")

    def _bound_prefetch(self, worker: Any, warm: WarmPool) -> None:
        # Late acks keep running tasks unacknowledged, so the prefetch count bounds
        # running + reserved messages: capacity running and at most as many waiting.
        if not worker.app.conf.get("warmpool_limit_prefetch", True) or not warm.process_specs:
            return
        consumer = getattr(worker, "consumer", None)
        if consumer is None or not consumer.initial_prefetch_count:
            return
        concurrency = worker.max_concurrency or worker.concurrency
        capacity = node_capacity(warm.process_specs.values(), warm.execution or "custom",
                                 concurrency)
        bound = 2 * capacity
        if consumer.initial_prefetch_count > bound:
            logger.info("warm pools: prefetch bounded from %d to %d (capacity %d)",
                        consumer.initial_prefetch_count, bound, capacity)
            consumer.initial_prefetch_count = bound

    def stop(self, worker: Any) -> None:
        # Warm shutdown: this step stops before the execution pool has drained, and
        # tasks still running or waiting need their agents. The pools close at
        # worker_shutdown, sent once the pool has stopped (see __init__).
        if self.metrics is not None:
            self.metrics.stop()

    def terminate(self, worker: Any) -> None:
        # Cold shutdown: running tasks are being killed anyway; close the pools now.
        if self.metrics is not None:
            self.metrics.stop()
        _extension(worker).stop_process()

    def info(self, worker: Any) -> dict[str, Any]:  # type: ignore[override]
        return {"warmpool": _extension(worker).stats()}
