"""Watchdog: runs a callback when work outlives its deadline, without waiting for it.

Used where the work runs inline on the caller's thread (a Celery task) and the party
waiting for it is elsewhere (the task's caller): the watchdog can tell that party at the
deadline, while the work itself finishes in its own time.

Watching costs a heap push under a lock; the watchdog thread is woken only when a new
deadline is earlier than the one it sleeps towards.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog"]

logger = logging.getLogger(__name__)


class Watchdog:
    """Calls ``on_expire`` for watched work that is not done by its deadline."""

    def __init__(self, name: str = "warmpool-watchdog") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int]] = []
        self._pending: dict[int, Callable[[], None]] = {}
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._sleeping_until = float("inf")

    def watch(self, seconds: float, on_expire: Callable[[], None]) -> int:
        """Start watching work that must end within ``seconds``; return its token."""
        deadline = time.monotonic() + seconds
        with self._lock:
            token = next(self._counter)
            self._pending[token] = on_expire
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            elif deadline < self._sleeping_until:
                self._wake.notify()
        return token

    def done(self, token: int) -> bool:
        """Stop watching; ``False`` if the deadline already passed (``on_expire`` ran)."""
        with self._lock:
            return self._pending.pop(token, None) is not None

    def _loop(self) -> None:
        while True:
            expired: list[Callable[[], None]] = []
            with self._lock:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now
                                      or self._heap[0][1] not in self._pending):
                    _, token = heapq.heappop(self._heap)
                    callback = self._pending.pop(token, None)
                    if callback is not None:
                        expired.append(callback)
                if not expired:
                    self._sleeping_until = self._heap[0][0] if self._heap else float("inf")
                    timeout = None if not self._heap else self._sleeping_until - now
                    self._wake.wait(timeout)
                    self._sleeping_until = float("inf")
                    continue
            for callback in expired:
                try:
                    callback()
                except Exception:
                    logger.exception("watchdog: handling an overrun failed")
