"""Watchdog: runs a callback when work outlives its deadline, without waiting for it.

Used where the work runs inline on the caller's thread (a Celery task) and the party
waiting for it is elsewhere (the task's caller): the watchdog can tell that party at the
deadline, while the work itself finishes in its own time.

Watching must cost next to nothing, since every call is watched: ``watch`` and ``done``
are one dictionary operation each (atomic in CPython, so no lock), and a single thread
looks over the watched work every ``TICK`` seconds. Whoever removes a token first wins:
``done`` (the work ended in time) or the watchdog (it did not). The watchdog thread only
decides; the callbacks of overdue work run on a thread of their own, so that one that
waits (storing an error while the result store restarts) delays no other decision.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["TICK", "Watchdog"]

logger = logging.getLogger(__name__)

#: How often the watchdog looks for overdue work, in seconds: a deadline is noticed at
#: most this late.
TICK = 0.02
#: Looks with nothing watched before the watchdog thread ends (the next watch restarts it).
IDLE_TICKS = 250


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

    def __init__(self, name: str = "warmpool-watchdog") -> None:
        self.name = name
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._callbacks: ThreadPoolExecutor | None = None  # made by the watchdog thread

    def watch(self, seconds: float, on_expire: Callable[[], None]) -> int:
        """Start watching work that must end within ``seconds``; return its token."""
        token = next(self._counter)
        self._pending[token] = (time.monotonic() + seconds, on_expire)
        # Read after the insert: a thread ending now either sees this token or has
        # already cleared _thread, so one is started here.
        if self._thread is None:
            self._start()
        return token

    def expired(self, token: int) -> bool:
        """Whether the deadline of the work ``token`` passed (``on_expire`` ran or runs)."""
        return token not in self._pending

    def done(self, token: int) -> bool:
        """Stop watching; ``False`` if the deadline already passed (``on_expire`` ran)."""
        return self._pending.pop(token, None) is not None

    def _retire(self) -> bool:
        """End this thread if nothing is watched; keep going if a watch just came in."""
        with self._start_lock:
            current, self._thread = self._thread, None
            if self._pending:
                self._thread = current
                return False
            return True

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        idle = 0
        while True:
            time.sleep(TICK)
            if not self._pending:
                idle += 1
                if idle >= IDLE_TICKS and self._retire():
                    return
                continue
            idle = 0
            now = time.monotonic()
            for token, (deadline, on_expire) in list(self._pending.items()):
                if deadline > now or self._pending.pop(token, None) is None:
                    continue
                if self._callbacks is None:
                    self._callbacks = ThreadPoolExecutor(1, f"{self.name}-callbacks")
                self._callbacks.submit(_expire, on_expire)


def _expire(on_expire: Callable[[], None]) -> None:
    try:
        on_expire()
    except Exception:
        logger.exception("watchdog: handling an overrun failed")
