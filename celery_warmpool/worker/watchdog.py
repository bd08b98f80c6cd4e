"""Watchdog: runs a callback when work outlives its deadline, without waiting for it.

Used where the work runs inline on the caller's thread (a Celery task) and the party
waiting for it is elsewhere (the task's caller): the watchdog can tell that party at the
deadline, while the work itself finishes in its own time.

Watching must cost next to nothing, since every call with a ``call_timeout`` is watched:
``watch`` pushes the deadline on a heap and ``done`` is one dictionary operation (the
heap is rid of finished work now and then, at once, rather than one entry at a time).
One thread sleeps until the earliest deadline, woken early only when a nearer one than
it sleeps for is pushed; it never ticks, and work that ends in time never wakes it.
Whoever removes a token first wins: ``done`` (the work ended in time) or the watchdog
(it did not). The watchdog thread only decides; the callbacks of overdue work run on a
thread of their own, so that one that waits (storing an error while the result store
restarts) delays no other decision.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["IDLE_EXIT", "Watchdog"]

logger = logging.getLogger(__name__)

#: Seconds with nothing watched before the watchdog thread ends (the next watch starts it).
IDLE_EXIT = 5.0
#: Entries the heap may hold before finished work is cleared from it (and only when
#: finished work is most of it).
COMPACT_AT = 64


class Watchdog:
    """Calls ``on_expire`` for watched work that is not done by its deadline."""

    _this_process: tuple[int, Watchdog] | None = None
    _creating = threading.Lock()

    @classmethod
    def of_this_process(cls) -> Watchdog:
        """The process's watchdog: a prefork child must not share its parent's thread."""
        found = cls._this_process
        pid = os.getpid()
        if found is None or found[0] != pid:
            with cls._creating:
                found = cls._this_process
                if found is None or found[0] != pid:
                    found = cls._this_process = (pid, cls())
        return found[1]

    def __init__(self, name: str = "warmpool-watchdog",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        #: Work still watched, by token: its callback.
        self._pending: dict[int, Callable[[], None]] = {}
        #: (deadline, token) of every watch; a token no longer pending is skipped.
        self._heap: list[tuple[float, int]] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        #: When the thread wakes next, on its own (monotonic).
        self._until = float("inf")
        self._callbacks: ThreadPoolExecutor | None = None  # made by the watchdog thread

    def watch(self, seconds: float, on_expire: Callable[[], None]) -> int:
        """Start watching work that must end within ``seconds``; return its token."""
        deadline = self._clock() + seconds
        with self._lock:
            token = next(self._counter)
            self._pending[token] = on_expire
            heapq.heappush(self._heap, (deadline, token))
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name=self.name, daemon=True).start()
            elif deadline < self._until:
                self._wake.notify()  # sleeping until later than this: look again
        return token

    def expired(self, token: int) -> bool:
        """Whether the deadline of the work ``token`` passed (``on_expire`` ran or runs)."""
        return token not in self._pending

    def done(self, token: int) -> bool:
        """Stop watching; ``False`` if the deadline already passed (``on_expire`` ran)."""
        in_time = self._pending.pop(token, None) is not None
        heap = self._heap
        if len(heap) > COMPACT_AT and len(heap) > 2 * len(self._pending):
            with self._lock:
                self._compact()
        return in_time

    def _loop(self) -> None:
        with self._lock:
            while True:
                self._drop_finished()
                if not self._heap:
                    # Nothing watched: wait a while for new work, then end.
                    self._until = self._clock() + IDLE_EXIT
                    if not self._wake.wait(IDLE_EXIT) and not self._heap:
                        self._running = False
                        return
                    continue
                deadline, token = self._heap[0]
                left = deadline - self._clock()
                if left > 0:
                    self._until = deadline
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._heap)
                on_expire = self._pending.pop(token, None)
                if on_expire is not None:
                    self._run_later(on_expire)

    def _compact(self) -> None:
        """Clear finished work out of the heap, all at once (under the lock)."""
        pending = self._pending
        self._heap = [entry for entry in self._heap if entry[1] in pending]
        heapq.heapify(self._heap)

    def _drop_finished(self) -> None:
        """Pop the watches whose work ended in time off the heap's top."""
        heap, pending = self._heap, self._pending
        while heap and heap[0][1] not in pending:
            heapq.heappop(heap)

    def _run_later(self, on_expire: Callable[[], None]) -> None:
        if self._callbacks is None:
            self._callbacks = ThreadPoolExecutor(1, f"{self.name}-callbacks")
        self._callbacks.submit(_expire, on_expire)


def _expire(on_expire: Callable[[], None]) -> None:
    try:
        on_expire()
    except Exception:
        logger.exception("watchdog: handling an overrun failed")
