"""Errands: result-store writes and publishes that must not hold up the worker.

The rule for what may block in a worker (see docs/architecture.md, "Threads and what
they may wait on"): the worker's main process runs Celery's event loop, which takes
messages, answers ``celery inspect`` and keeps the broker's heartbeats; nothing on it may
wait for a result store or a broker that is away. What the package must write from there
(the answer of a call that outwaited its deadline in a busy node, the errors of a batch
lost with its process, a cast's dead letter) is handed to this process's errand thread
instead: a store that is away then delays the errands and nothing else. Each errand
carries its own deadline, past which it is given up (and logged), as its caller stops
waiting for it then too; while the store is away it is tried again within that deadline
(see :mod:`celery_warmpool.wire.outages`).

One thread per process, made on first use (a prefork child gets its own after the fork),
running errands in the order they came.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..wire.outages import Outages, retry

__all__ = ["Errands"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Errand:
    what: str
    work: Callable[[], object]
    outages: Outages
    #: Monotonic time past which it is given up.
    deadline: float


class Errands:
    """This process's errand thread (see the module): :meth:`run` hands it work."""

    _this_process: ClassVar[tuple[int, Errands] | None] = None
    _creating: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of_this_process(cls) -> Errands:
        """The process's errands: a prefork child must not share its parent's thread."""
        found = cls._this_process
        pid = os.getpid()
        if found is None or found[0] != pid:
            with cls._creating:
                found = cls._this_process
                if found is None or found[0] != pid:
                    found = cls._this_process = (pid, cls())
        return found[1]

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Errand] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def run(self, what: str, work: Callable[[], object], *, outages: Outages,
            within: float) -> None:
        """Do ``work()`` on the errand thread, trying again while the broker or store is
        away, for ``within`` seconds from now at most; returns at once.

        ``what`` names it in the log if it is given up.
        """
        errand = _Errand(what, work, outages, time.monotonic() + within)
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="warmpool-errands",
                                                daemon=True)
                self._thread.start()
        self._queue.put(errand)

    def wait(self, timeout: float) -> bool:
        """Wait until every errand handed over so far is done, ``timeout`` seconds at most
        (a process about to exit); say whether they all are."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def pending(self) -> int:
        """Errands handed over and not done yet."""
        return self._pending

    def _loop(self) -> None:
        while True:
            errand = self._queue.get()
            try:
                retry(errand.work, errand.outages, errand.deadline)
            except Exception:
                logger.warning("gave up %s", errand.what, exc_info=True)
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()
