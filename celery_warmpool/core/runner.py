"""Running an agent's work with a time bound, on reusable threads.

Python cannot stop a thread, so a call that overruns its bound is abandoned: the caller
gets :class:`~celery_warmpool.errors.CallTimeout` at once, the thread finishes the work in
the background, and the pool replaces the agent (see ``AgentPool.call``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Overran", "TimeboxedRunner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Overran(Exception):
    """The work outlasted its bound; it goes on in the background (see the module)."""


class _Job:
    __slots__ = ("done", "error", "finished", "function", "result")

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        # Called once the work ends, if the caller stopped waiting for it.
        self.finished: Callable[[], None] | None = None


class _Thread:
    """One runner thread: takes a job, runs it, offers itself for the next."""

    __slots__ = ("job", "runner", "wake")

    def __init__(self, runner: TimeboxedRunner) -> None:
        self.runner = runner
        self.wake = threading.Event()
        self.job: _Job | None = None

    def loop(self) -> None:
        while True:
            if not self.wake.wait(self.runner.idle_timeout):
                with self.runner.lock:
                    if self in self.runner.idle:
                        self.runner.idle.remove(self)
                        return
                # Taken from the idle list just as the wait ran out: a job is coming.
                self.wake.wait()
            self.wake.clear()
            job = self.job
            assert job is not None
            try:
                job.result = job.function()
            except BaseException as exc:
                job.error = exc
            job.done.set()
            with self.runner.lock:
                abandoned = job.finished
                self.job = None
                self.runner.idle.append(self)
            if abandoned is not None:
                try:
                    abandoned()
                except Exception:
                    logger.exception("clean-up after an abandoned call failed")


class TimeboxedRunner:
    """Runs callables on a few reused daemon threads, waiting at most ``timeout``."""

    def __init__(self, name: str, idle_timeout: float = 60.0) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.idle: list[_Thread] = []

    def run(self, function: Callable[[], T], timeout: float,
            on_abandon: Callable[[], None] | None = None) -> T:
        """Run ``function`` and return its result, waiting at most ``timeout`` seconds.

        An exception raised by ``function`` is raised here. If it overruns, ``on_abandon``
        runs on the runner thread once the work finally ends.

        Raises:
            Overran: the work did not end within ``timeout``.
        """
        job = _Job(function)
        with self.lock:
            worker = self.idle.pop() if self.idle else None
            if worker is not None:
                worker.job = job
        if worker is None:
            worker = _Thread(self)
            worker.job = job
            threading.Thread(target=worker.loop, name=f"warmpool-{self.name}-call",
                             daemon=True).start()
        worker.wake.set()
        if not job.done.wait(timeout):
            with self.lock:
                if not job.done.is_set():
                    job.finished = on_abandon
                    raise Overran(f"work did not end within {timeout}s")
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result
