"""ProcessPools: the warm pools of one process, built from their specs, started together."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core.agent import Agent
from ..core.errors import PoolStartError, UnknownPool
from ..core.pool import BACKOFF_CAP, AgentPool
from ..core.spec import PoolSpec
from ..core.status import PoolCounters, PoolStatus

__all__ = ["ProcessPools"]

logger = logging.getLogger(__name__)


class ProcessPools:
    """The pools one process serves: started together, looked up by name, closed together.

    A pool whose agents cannot be built is not dropped silently: ``get()`` raises its
    :class:`PoolStartError`, its status carries the error, and the host keeps trying to
    start it in the background with back-off.
    """

    def __init__(self, specs: Iterable[PoolSpec], *, node: str | None = None,
                 process_index: int | None = None,
                 shared: dict[str, Any] | None = None,
                 watch: Callable[[AgentPool[Agent[Any]]], None] | None = None) -> None:
        """``watch`` is given each pool before it starts (to listen to its telemetry)."""
        self.specs = {spec.name: spec for spec in specs}
        self._watch = watch
        self.shared = shared or {}
        self.node = node
        self.process_index = process_index
        self.pid = os.getpid()
        self.pools: dict[str, AgentPool[Agent[Any]]] = {}
        self.failures: dict[str, PoolStartError] = {}
        #: Whether start() has finished: every pool is warm or has failed.
        self.started = False
        #: Casts of each pool this process sent to the dead-letter queue.
        self.dead_lettered: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every pool, in parallel; return when each is warm or has failed."""
        self.pid = os.getpid()
        specs = list(self.specs.values())
        if specs:
            with ThreadPoolExecutor(max_workers=len(specs),
                                    thread_name_prefix="warmpool-start") as executor:
                list(executor.map(self._start_one, specs))
        self.started = True
        for name, error in self.failures.items():
            logger.error("warm pool %r failed to start in process %d: %s", name, self.pid, error)
            threading.Thread(target=self._retry, args=(self.specs[name],), daemon=True,
                             name=f"warmpool-{name}-restart").start()

    def _start_one(self, spec: PoolSpec) -> None:
        pool = AgentPool.from_spec(spec, node=self.node, shared=self.shared.get(spec.name),
                                   process_index=self.process_index or 0)
        if self._watch is not None:
            self._watch(pool)
        try:
            pool.start()
        except PoolStartError as exc:
            with self._lock:
                self.failures[spec.name] = exc
            return
        with self._lock:
            closing = self._stop.is_set()
            if not closing:
                self.pools[spec.name] = pool
        if closing:  # started by a retry while the host was being closed
            pool.close()
            return
        logger.info("warm pool %r ready in process %d: %d agents", spec.name, self.pid,
                    pool.size)

    def _retry(self, spec: PoolSpec) -> None:
        delay = 1.0
        while not self._stop.wait(delay):
            self._start_one(spec)
            with self._lock:
                if spec.name in self.pools:
                    del self.failures[spec.name]
                    logger.info("warm pool %r started after earlier failures", spec.name)
                    return
            delay = min(delay * 2, BACKOFF_CAP)

    def get(self, name: str) -> AgentPool[Agent[Any]]:
        """The pool called ``name`` in this process.

        Raises:
            UnknownPool: this process hosts no pool of that name.
            PoolStartError: the pool is configured here but could not start.
        """
        pool = self.pools.get(name)
        if pool is not None:
            return pool
        failure = self.failures.get(name)
        if failure is not None:
            # A fresh error each time: re-raising the stored one would grow its traceback.
            raise PoolStartError(*failure.args) from failure
        hosted = ", ".join(sorted(self.specs)) or "none"
        raise UnknownPool(
            f"pool {name!r} is not hosted by this worker process (hosted: {hosted})", name)

    def statuses(self) -> dict[str, PoolStatus]:
        """Each pool's status, this process's identity filled in."""
        found: dict[str, PoolStatus] = {}
        for name, spec in self.specs.items():
            pool = self.pools.get(name)
            if pool is not None:
                status = pool.status()
            else:
                failure = self.failures.get(name)
                status = PoolStatus(
                    pool=name, state="full", size=spec.size, max_overflow=spec.max_overflow,
                    available=0, overflow=0, checked_out=0, waiting=0,
                    replacing=spec.size, counters=PoolCounters(),
                    last_error=str(failure) if failure else "starting")
            counters = status.counters.model_copy(
                update={"dead_lettered": self.dead_lettered[name]})
            found[name] = status.model_copy(update={
                "node": self.node, "pid": self.pid, "process_index": self.process_index,
                "counters": counters})
        return found

    def snapshot(self) -> dict[str, Any]:
        """This process's pools as JSON-compatible data, for the status board."""
        return {
            "node": self.node, "process_index": self.process_index, "started": self.started,
            "errors": {name: str(error) for name, error in self.failures.items()},
            "pools": {name: status.model_dump(mode="json")
                      for name, status in self.statuses().items()},
        }

    def close(self) -> None:
        """Close every pool (each agent torn down once). Safe to call twice."""
        self._stop.set()
        for pool in list(self.pools.values()):
            pool.close()
