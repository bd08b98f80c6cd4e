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

import logging
import time
from typing import Any

from celery.worker import state as worker_state

from ..core.errors import CheckoutTimeout
from ..scoped import scoped
from .claims import is_taken
from .handler import HANDLE_TASK

__all__ = ["LateCalls"]

logger = logging.getLogger(__name__)

#: How often the worker's main process looks for calls past their deadline, in seconds.
INTERVAL = 0.1
#: Seconds past a deadline before a waiting call is answered: a child that took the call
#: just in time has told the main process so well within this.
GRACE = 0.25


class LateCalls:
    """Answers callers whose reserved call outwaited its deadline (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._answered: set[str] = set()

    def start(self, timer: Any) -> None:
        """Look every ``INTERVAL`` seconds, on the worker's own timer."""
        timer.call_repeatedly(INTERVAL, self.answer_late_calls)

    def answer_late_calls(self) -> int:
        """Answer every waiting call past its deadline; return how many were answered."""
        now = time.time()
        waiting = set(worker_state.reserved_requests) - set(worker_state.active_requests)
        answered = 0
        for request in waiting:
            if request.name != HANDLE_TASK or request.id in self._answered:
                continue
            args = request.args
            deadline = args[2] if len(args) > 2 else None
            if deadline is None or now <= deadline + GRACE:
                continue
            backend = scoped(self.app).results.backend
            try:
                taken = is_taken(backend, request.id)
            except getattr(backend, "connection_errors", ()):
                continue  # the result store is away: look again next time
            self._answered.add(request.id)
            if taken:
                continue
            pool = str(args[0])
            error = CheckoutTimeout(
                f"pool {pool!r}: no agent came free within the call's timeout; the call "
                "waited in a busy worker and will not run", pool, now - deadline)
            try:
                backend.mark_as_failure(request.id, error)
                answered += 1
            except Exception:
                logger.exception("could not answer late call %s", request.id)
        if len(self._answered) > 10_000:
            self._answered.intersection_update(request.id for request in waiting)
        return answered
