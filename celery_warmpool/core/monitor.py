"""PoolMonitor: a warning, with the numbers, when a pool runs out of base agents.

Opt-in per pool: ``monitor_interval=60`` (seconds) in its options or spec, or
``WARMPOOL_<POOL>_MONITOR_INTERVAL=60`` in a worker's environment. A pool whose base
agents are all checked out either hands out overflow agents, or makes callers wait, or
(``block=False``) turns them away: each of those checkouts is a pressure event. The
monitor logs one warning per interval at most while they happen::

    pool 'search' is exhausted and running on overflow: size=4 checked_out=6 overflow=2
    max_overflow=2 waiting=3 (pressure events since the last warning: 17)

and sends :data:`celery_warmpool.telemetry.pool_pressure` with the pool's status, so an
application can page someone, or scale out, from the same moment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from . import telemetry
from .status import PoolStatus

__all__ = ["PoolMonitor"]

logger = logging.getLogger(__name__)


class PoolMonitor:
    """Watches one pool's checkouts; warns at most once per ``interval`` under pressure.

    The pool starts one when ``monitor_interval`` is set and stops it on close; it
    listens to that pool's own telemetry (its ``hooks``), so a pool without one pays
    nothing.

    Arguments:
        name: the pool's name, for the warning.
        status: reads the pool's status (the numbers of the warning).
        hooks: the pool's telemetry: listened to, and where ``pool_pressure`` is sent.
        interval: the fewest seconds between two warnings.
        clock: the clock ``interval`` is measured on.
    """

    def __init__(self, name: str, status: Callable[[], PoolStatus],
                 hooks: telemetry.PoolHooks, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._status = status
        self._hooks = hooks
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last_warning: float | None = None
        self._events = 0
        self._running = False

    def start(self) -> Self:
        """Listen to the pool's checkouts."""
        if not self._running:
            self._hooks.connect(telemetry.agent_checkout, self._on_checkout, weak=False)
            self._hooks.connect(telemetry.pool_exhausted, self._on_exhausted, weak=False)
            self._running = True
        return self

    def stop(self) -> None:
        """Stop listening. Safe to call twice."""
        if self._running:
            self._hooks.disconnect(telemetry.agent_checkout, self._on_checkout)
            self._hooks.disconnect(telemetry.pool_exhausted, self._on_exhausted)
            self._running = False

    def pressure(self, exhausted: bool) -> bool:
        """Count one pressure event; warn and signal if an interval has passed.

        Arguments:
            exhausted: the checkout found no agent and no overflow room (it waited or
                failed); otherwise it took an overflow agent, which is pressure only if
                no idle agent is left (a lingering overflow agent may be reused while
                base agents idle).

        Returns whether it warned.
        """
        now = self._clock()
        with self._lock:
            self._events += 1
            if self._last_warning is not None and now - self._last_warning < self.interval:
                return False
        status = self._status()
        if not exhausted and status.available > 0:
            return False
        with self._lock:
            # Another thread may have warned while this one read the status.
            if self._last_warning is not None and now - self._last_warning < self.interval:
                return False
            self._last_warning = now
            events, self._events = self._events, 0
        logger.warning(
            "pool %r is exhausted%s: size=%d checked_out=%d overflow=%d max_overflow=%d "
            "waiting=%d (pressure events since the last warning: %d)", self.name,
            " and running on overflow" if status.overflow else "", status.size,
            status.checked_out, status.overflow, status.max_overflow, status.waiting, events)
        if self._hooks.pool_pressure:
            self._hooks.send(telemetry.pool_pressure, status=status, events=events)
        return True

    def _on_checkout(self, sender: Any = None, overflow: bool = False, **kwargs: Any) -> None:
        if overflow:
            self.pressure(exhausted=False)

    def _on_exhausted(self, sender: Any = None, **kwargs: Any) -> None:
        self.pressure(exhausted=True)
