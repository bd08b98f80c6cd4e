"""Answering a caller at its deadline while its call still waits inside a worker.

A worker reserves a few messages ahead (its prefetch). Under prefork, a reserved call
waits in the main process until a child is free; the child drops it if its deadline has
passed, but only once it takes it, so the caller would hear of it late. The worker's main
process therefore looks over its reserved, not yet started calls a few times a second
while any call is reserved, and answers each one whose deadline passed with
:class:`CheckoutTimeout` at once. The call itself is still dropped unrun when a child
takes it. A call whose caller published it again is left alone once another copy of it
was taken (see :mod:`.claims`): that copy answers, and a ``CheckoutTimeout`` stored now
would overwrite its reply.

The looks start when a call arrives (:meth:`LateCalls.watch`) and stop once no call
waits: a node with no pool calls in flight keeps its event loop as quiet as Celery's own
(ten wake-ups a second there let the loop take a message a moment sooner than it would
have, which Celery's own tests of ``task_received`` noticed). A look is in memory only;
the result store is read and written as an errand (see :mod:`.errands`), so that a store
that is away holds up nothing on the event loop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from celery.app.task import Context
from celery.worker import state as worker_state

from ..core.errors import CheckoutTimeout
from ..wire.message import CALL_TASK, CallMessage
from ..wire.outages import Outages
from ..wire.scoped import scoped
from .claims import is_taken
from .errands import Errands

__all__ = ["LateCalls"]

logger = logging.getLogger(__name__)

#: How often the worker's main process looks for calls past their deadline, in seconds.
INTERVAL = 0.1
#: Seconds past a deadline before a waiting call is answered: a child that took the call
#: just in time has told the main process so well within this.
GRACE = 0.25
#: Seconds without a look after which the looks are taken as stopped (the worker's timer
#: dropped its entries, as a broker reconnection can), and the next call starts them again.
LOST_AFTER = 1.0
#: Seconds a caller waits beyond ``timeout + call_timeout`` for its reply (the caller's
#: ``REPLY_GRACE``): answering later is of no use.
REPLY_GRACE = 2.0


class LateCalls:
    """Answers callers whose reserved call outwaited its deadline (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._answered: set[str] = set()
        self._timer: Any = None
        self._lock = threading.Lock()
        self._looking = False
        self._arrived = False
        self._last_look = 0.0

    def start(self, timer: Any) -> None:
        """Look on the worker's own timer, every ``INTERVAL`` seconds while calls wait."""
        self._timer = timer

    def watch(self) -> None:
        """A call has arrived: look every ``INTERVAL`` seconds until no call waits."""
        with self._lock:
            self._arrived = True
            now = time.monotonic()
            if self._timer is None or (self._looking and now - self._last_look < LOST_AFTER):
                return
            self._looking, self._last_look = True, now
        self._timer.call_after(INTERVAL, self._look)

    def _look(self) -> None:
        with self._lock:
            self._arrived = False
            self._last_look = time.monotonic()
        try:
            self.check()
        except Exception:
            logger.exception("could not look for late calls")
        with self._lock:
            # A call that arrived while this look ran keeps the looks going.
            keep_looking = self._arrived or self._calls_waiting()
            self._looking = keep_looking
        if keep_looking:
            self._timer.call_after(INTERVAL, self._look)

    def _calls_waiting(self) -> bool:
        """Whether a reserved call has not started yet and was not answered."""
        waiting = set(worker_state.reserved_requests) - set(worker_state.active_requests)
        return any(request.name == CALL_TASK and request.id not in self._answered
                   for request in waiting)

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
        backend = scoped(self.app).results.backend
        if is_taken(backend, task_id):
            return False
        late = time.time() - (call.deadline or 0.0)
        error = CheckoutTimeout(
            f"pool {call.pool!r}: no agent came free within the call's timeout; the call "
            "waited in a busy worker and will not run", call.pool, late)
        # The call's own message goes along: its reply channel says where its caller waits.
        backend.mark_as_failure(task_id, error, request=Context(id=task_id, args=call.to_args()))
        return True
