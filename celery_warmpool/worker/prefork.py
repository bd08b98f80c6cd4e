"""Where agents get built in a prefork child (and in the solo pool's one process).

Celery sends ``worker_process_init`` in each new prefork child, the replacements of dead
or recycled children included, before the child tells the main process it is up, so a
child still warming up is never given a task. The solo pool sends it in the main process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from celery import signals

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["REPLACE_EVERY", "connect", "replace_dead_children"]

logger = logging.getLogger(__name__)

#: Seconds a terminated child gives its agents' teardown before it dies.
TERMINATE_TEARDOWN_SECONDS = 5.0
#: Seconds between two looks for dead children to replace.
REPLACE_EVERY = 0.2


def _process_index() -> int:
    try:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
    except ImportError:  # pragma: no cover - billiard ships with Celery
        index = None
    return int(index) if index is not None else 0


def _close_on_terminate(runtime: WorkerRuntime) -> None:
    """Tear agents down when the child is terminated (cold shutdown, revoke --terminate).

    Celery resets SIGTERM to its default in children, so a terminated child would die
    without ``worker_process_shutdown`` and without closing its agents. The teardown runs
    on its own thread, bounded, in case the signal interrupted the pool mid-operation;
    then the child dies of the signal as it would have.
    """

    def on_terminate(signum: int, frame: Any) -> None:
        closer = threading.Thread(target=runtime.stop_process, name="warmpool-terminate",
                                  daemon=True)
        closer.start()
        closer.join(TERMINATE_TEARDOWN_SECONDS)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_terminate)


def replace_dead_children(consumer: Any) -> Any:
    """Look for dead prefork children to replace every 0.2 s; return the timer entry.

    Celery replaces a child when its sentinel says it exited, but a SIGKILLed child's
    sentinel can fire a moment before the process can be waited for: the pool then sees
    no exit, stops watching that child, and replaces it only at its next 5-second check
    (measured: 2 of 10 kills took 3 to 3.5 s to get a new child, the rest 0.15 s).
    """
    pool = getattr(consumer.pool, "_pool", None)
    maintain = getattr(pool, "maintain_pool", None)
    if maintain is None:
        return None
    return consumer.timer.call_repeatedly(REPLACE_EVERY, maintain)


def connect(runtime: WorkerRuntime) -> None:
    """Build ``runtime``'s pools in each child as it starts; close them as it exits."""

    def on_process_init(sender: Any = None, **kwargs: Any) -> None:
        execution = runtime.execution
        if execution is None or not execution.one_task_per_process:
            return  # not a worker of this app, or its pools live in the main process
        if execution.in_children:
            _close_on_terminate(runtime)
        runtime.start_process(index=_process_index())

    def on_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
        if runtime.execution is not None and runtime.execution.in_children:
            runtime.stop_process()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
