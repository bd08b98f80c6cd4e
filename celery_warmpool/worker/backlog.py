"""What this node holds of each hosted pool's work, kept on the backlog board.

Per pool (a :class:`~celery_warmpool.core.status.PoolLoad`): the messages of its queue
the node took and has not started (``reserved``), those running on an agent
(``running``), the calls it runs at once (``capacity``, counted only once the node's
agents are warm: the board hears of a node only after it is ready), and its drain rate.

- **Measured on the event loop** (:meth:`NodeBacklog.measure`), which owns Celery's
  requests: with the per-pool windows (every half second), at once when the node takes a
  message of a pool held to ``max_queued`` on Redis (whose admission script reads the
  board), and when the ``warmpool_status`` command is answered. A request is running
  once a prefork child accepted it, or (threads and the rest) while the pool lends as
  many agents.
- **Written by a thread of its own** (:class:`BacklogReporter`), never the loop: a
  board that is away delays nothing else. A pool's report is written as soon as it
  changes, and at least every :data:`~celery_warmpool.wire.backlog.REFRESH` seconds,
  each valid for :data:`~celery_warmpool.wire.backlog.TTL` seconds. The same thread
  samples the pools' counters every :data:`SAMPLE` seconds for the drain rate.

How stale the board may be: a message a node takes leaves the broker's list at once and
reaches the board a moment later (the loop measures it as it is handed over, the thread
writes it: about a millisecond on one machine). A call admitted in that moment may pass
the bound, by at most the node's reserve room (its capacity). Counts that fall (a call
started or ended) may reach the board half a second late: the admission errs then on the
side of refusing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Final, Protocol

from celery.worker import state as worker_state

from ..core.spec import PoolSpec
from ..core.status import PoolLoad, PoolStatus
from ..wire.backlog import REFRESH, BacklogBoard


class PoolQueue(Protocol):
    """What the backlog reads of a pool's queue on this node (``consumers.PoolQueue``)."""

    spec: PoolSpec
    batches: Any
    draining: bool
    capacity: int


class WorkerRuntime(Protocol):
    """What the backlog reads of the node (``runtime.WorkerRuntime``): named here, not
    imported, as the runtime makes the backlog."""

    app: Any
    node: str | None
    consumers: Any
    execution: Any
    pools: Any
    process_specs: dict[str, PoolSpec]

    def process_statuses(self) -> list[PoolStatus]:
        """Every process's pool statuses on this node."""

__all__ = ["SAMPLE", "BacklogReporter", "DrainMeter", "NodeBacklog"]

logger = logging.getLogger(__name__)

#: Seconds between two samples of the pools' counters (for the drain rate).
SAMPLE: Final = 0.5
#: Seconds of samples the drain rate is measured over.
RATE_WINDOW: Final = 10.0


def started_calls(status: PoolStatus) -> int:
    """Messages of a pool that started, from its counters: one per checkout, and one per
    signal of a batch (one checkout runs a whole batch)."""
    counters = status.counters
    return counters.checkouts + counters.batched - counters.batches


class DrainMeter:
    """A pool's drain rate on this node: calls started per second while it was busy.

    Sampled every :data:`SAMPLE` seconds over :data:`RATE_WINDOW`. Only the intervals
    that began busy (every agent working, or calls reserved) count, so that the rate is
    what the node can do, not what it was offered; with none in the window, every
    interval counts.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, bool]] = deque()
        self.rate = 0.0

    def sample(self, now: float, started: int, busy: bool) -> float:
        """Add a sample (``started``: the pool's started calls so far); the rate now."""
        samples = self._samples
        if samples and started < samples[-1][1]:
            samples.clear()  # a process's counters went with it: start again
        samples.append((now, started, busy))
        while samples and now - samples[0][0] > self.window:
            samples.popleft()
        pairs = list(zip(samples, list(samples)[1:], strict=False))
        chosen = [(a, b) for a, b in pairs if a[2]] or pairs
        seconds = sum(b[0] - a[0] for a, b in chosen)
        self.rate = sum(b[1] - a[1] for a, b in chosen) / seconds if seconds > 0 else 0.0
        return self.rate


class NodeBacklog:
    """This node's :class:`PoolLoad` of each hosted pool (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        #: The last loads measured on the loop, by pool (read by any thread).
        self.loads: dict[str, PoolLoad] = {}
        self.meters: dict[str, DrainMeter] = {}
        #: Set when a load changed: the reporter writes it.
        self.changed = threading.Event()

    def measure(self) -> dict[str, PoolLoad]:
        """Measure every hosted pool now (event-loop thread only)."""
        consumers = self.runtime.consumers
        if consumers is None:
            return self.loads
        for queue in consumers.queues.values():
            self._measure(consumers, queue)
        return self.loads

    def taken(self, queue: PoolQueue) -> None:
        """The node took a message of ``queue`` (event-loop thread only)."""
        consumers = self.runtime.consumers
        if consumers is not None:
            self._measure(consumers, queue)

    def _measure(self, consumers: Any, queue: PoolQueue) -> None:
        requests = consumers.requests_of(queue)
        batches = queue.batches
        batched = len(batches.held()) if batches is not None else 0
        running = len(batches.running()) if batches is not None else 0
        running += min(len(requests), self._running(queue.spec.name, requests))
        meter = self.meters.get(queue.spec.name)
        load = PoolLoad(reserved=max(0, len(requests) + batched - running), running=running,
                        capacity=0 if queue.draining else queue.capacity,
                        drain_rate=meter.rate if meter else 0.0)
        if self.loads.get(queue.spec.name) != load:
            self.loads = {**self.loads, queue.spec.name: load}
            self.changed.set()

    def _running(self, pool: str, requests: list[Any]) -> int:
        """How many of ``requests`` (a pool's, on this node) run on an agent now."""
        execution = self.runtime.execution
        if execution is not None and execution.in_children:
            # A prefork child runs one task at a time on its own agent: running once
            # the child accepted it.
            active = set(worker_state.active_requests)
            return sum(1 for request in requests if request in active)
        pools = self.runtime.pools
        if pools is None:
            return 0
        try:
            return int(pools.get(pool).checked_out)
        except Exception:  # the pool failed to start: nothing of it runs
            return 0

    def sample(self, now: float) -> None:
        """Sample every pool's counters for its drain rate (the reporter's thread)."""
        started: dict[str, int] = {}
        for status in self.runtime.process_statuses():
            started[status.pool] = started.get(status.pool, 0) + started_calls(status)
        for pool, count in started.items():
            load = self.loads.get(pool, PoolLoad())
            busy = load.reserved > 0 or (load.capacity > 0 and load.running >= load.capacity)
            self.meters.setdefault(pool, DrainMeter()).sample(now, count, busy)


class BacklogReporter:
    """Writes this node's loads to the backlog board from a thread of its own."""

    def __init__(self, runtime: WorkerRuntime, backlog: NodeBacklog) -> None:
        self.runtime = runtime
        self.backlog = backlog
        self.board: BacklogBoard | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[str, tuple[PoolLoad, float]] = {}

    def start(self) -> None:
        """Start reporting (once the node's agents are warm)."""
        try:
            self.board = BacklogBoard.of(self.runtime.app)
        except Exception:
            logger.warning("warm pools: no backlog board (the broker or result store is "
                           "unreachable now); reports start when it answers", exc_info=True)
        self._thread = threading.Thread(target=self._loop, name="warmpool-backlog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reporting and withdraw this node's reports."""
        self._stop.set()
        self.backlog.changed.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        board, self.board = self.board, None
        if board is None:
            return
        try:
            for queue in self._queues().values():
                board.withdraw(queue, self.runtime.node or "")
        except Exception:  # the board is away: the reports expire by themselves
            logger.warning("warm pools: could not withdraw this node's backlog reports",
                           exc_info=True)
        finally:
            board.close()

    def _queues(self) -> dict[str, str]:
        return {name: spec.queue for name, spec in self.runtime.process_specs.items()}

    def _loop(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            # Cleared before the loads are read: a change after it wakes the next wait.
            self.backlog.changed.clear()
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + SAMPLE
                try:
                    self.backlog.sample(now)
                except Exception:
                    logger.warning("warm pools: could not sample the pools' counters",
                                   exc_info=True)
            self._write(now)
            self.backlog.changed.wait(max(0.0, next_sample - time.monotonic()))

    def _write(self, now: float) -> None:
        if self.board is None:
            try:
                self.board = BacklogBoard.of(self.runtime.app)
            except Exception as exc:
                logger.debug("no backlog board yet: %r", exc)
                return
            if self.board is None:
                return
        queues, node = self._queues(), self.runtime.node or ""
        for pool, load in list(self.backlog.loads.items()):
            meter = self.backlog.meters.get(pool)
            load = load.model_copy(update={"drain_rate": meter.rate if meter else 0.0})
            written = self._written.get(pool)
            # The counts are written as they change; the drain rate, which moves with
            # every sample, with the refresh.
            if (written is not None and now - written[1] < REFRESH
                    and written[0].model_copy(update={"drain_rate": load.drain_rate}) == load):
                continue
            try:
                self.board.report(queues[pool], node, load)
            except Exception as exc:  # tried again at the next change or tick
                logger.debug("could not report the backlog of %s: %r", pool, exc)
                continue
            self._written[pool] = (load, now)
