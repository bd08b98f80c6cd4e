"""Answering a caller at its deadline while its call still waits inside a worker.

A worker reserves a few messages ahead (its prefetch). Under prefork, a reserved call
waits in the main process until a child is free; the child drops it if its deadline has
passed, but only once it takes it, so the caller would hear of it late. The worker's main
process therefore looks over its reserved, not yet started calls a few times a second,
and answers each one whose deadline passed with :class:`CheckoutTimeout` at once. The
call itself is still dropped unrun when a child takes it. A call whose caller published it
again is left alone once another copy of it was taken (see :mod:`.claims`): that copy
answers, and a ``CheckoutTimeout`` stored now would overwrite its reply.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from celery.worker import state as worker_state

from ..core.errors import CheckoutTimeout
from ..wire.message import CALL_TASK, CallMessage
from ..wire.outages import Outages
from .claims import is_taken
from .errands import Errands

__all__ = ["LateCalls"]

logger = logging.getLogger(__name__)

#: How often the worker's main process looks for calls past their deadline, in seconds.
INTERVAL = 0.1
#: Seconds a caller waits beyond ``timeout + call_timeout`` for its reply (the caller's
#: ``REPLY_GRACE``): answering later is of no use.
REPLY_GRACE = 2.0
#: Seconds past a deadline before a waiting call is answered: a child that took the call
#: just in time has told the main process so well within this.
GRACE = 0.25


class LateCalls:
    """Answers callers whose reserved call outwaited its deadline (see the module).

    The worker's timer only looks (in memory, :meth:`due`); the result store is read and
    written as an errand (see :mod:`.errands`), so that a store that is away holds up
    nothing else.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._answered: set[str] = set()

    def start(self, timer: Any) -> None:
        """Look every ``INTERVAL`` seconds, on the worker's own timer."""
        timer.call_repeatedly(INTERVAL, self.check)

    def check(self) -> None:
        """Hand every waiting call past its deadline to the errand thread, to answer."""
        errands = Errands.of_this_process()
        for task_id, call in self.due():
            # Its caller waits for a reply until about then: no use answering later.
            within = max(1.0, (call.deadline or 0.0) + (call.call_timeout or 0.0)
                         + REPLY_GRACE - time.time())
            errands.run(f"the late call {task_id}'s answer",
                        functools.partial(self.answer, task_id, call),
                        outages=Outages.of(self.app), within=within)

    def answer_late_calls(self) -> int:
        """Answer every waiting call past its deadline, in this thread; return how many
        were answered."""
        return sum(self.answer(task_id, call) for task_id, call in self.due())

    def due(self) -> list[tuple[str, CallMessage]]:
        """The calls waiting here past their deadline not handed over yet (in memory)."""
        now = time.time()
        waiting = set(worker_state.reserved_requests) - set(worker_state.active_requests)
        due = []
        for request in waiting:
            if request.name != CALL_TASK or request.id in self._answered:
                continue
            call = CallMessage.from_args(request.args, "call")
            if call.deadline is None or now <= call.deadline + GRACE:
                continue
            self._answered.add(request.id)
            due.append((request.id, call))
        if len(self._answered) > 10_000:
            self._answered.intersection_update(request.id for request in waiting)
        return due

    def answer(self, task_id: str, call: CallMessage) -> bool:
        """Tell the caller of ``call`` it will not run, unless a copy of it was taken (that
        copy answers); say whether it was told.

        Raises:
            The result store's connection errors (the errand tries again).
        """
        if is_taken(self.app.backend, task_id):
            return False
        late = time.time() - (call.deadline or 0.0)
        error = CheckoutTimeout(
            f"pool {call.pool!r}: no agent came free within the call's timeout; the call "
            "waited in a busy worker and will not run", call.pool, late)
        self.app.backend.mark_as_failure(task_id, error)
        return True
