"""What the worker's main process does when the process running pool work dies.

Celery reports a task whose process died (a SIGKILLed or crashed prefork child) with its
own ``WorkerLostError``. Pool work is told in the package's terms instead, by the
:class:`PoolRequest` every pool task runs under:

- a **call** or **transaction** (``warm.call``, ``warm.transaction``) and a
  **pool-aware task** fail with :class:`AgentLost`, naming the pool, the node, the pid,
  the signal and whether the work may have run; their caller is waiting and decides;
- a **cast** has nobody waiting: it is delivered again (at least once), up to its pool's
  ``max_redeliveries``; past that it fails with :class:`AgentLost` and goes to the pool's
  dead-letter queue.

A pool-aware task whose own options ask Celery to requeue or retry a lost task
(``reject_on_worker_lost``, ``retry_on_worker_lost``) keeps Celery's behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request

from ..core.errors import AgentLost
from ..wire.message import CallMessage, WorkKind
from ..wire.queues import pool_queue, route
from ..wire.scoped import scoped

__all__ = ["REQUEST", "PoolRequest"]

logger = logging.getLogger(__name__)

#: The qualified name Celery tasks give as their ``Request`` class.
REQUEST = "celery_warmpool.worker.requests:PoolRequest"


class PoolRequest(Request):
    """A Celery request for pool work (see the module)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        """Tell a lost process in the pool's terms; otherwise as Celery does."""
        if not self._process_lost(exc_info.exception) or self._celery_decides():
            return super().on_failure(exc_info, send_failed_event, return_ok)
        if self.kind == "cast" and self._redeliver():
            return None
        lost = self.agent_lost()
        if self.kind == "cast":
            self._dead_letter(lost)
        return super().on_failure(_info(lost), send_failed_event, return_ok)

    @property
    def kind(self) -> WorkKind:
        """Whether this is a call, a cast or a pool-aware task."""
        kind: WorkKind = getattr(self.task, "warmpool_kind", "task")
        return kind

    @property
    def pool(self) -> str:
        """The pool this request's work runs on."""
        if self.kind == "task":
            task: Any = self.task
            return str(task.warmpool_pool)
        return self.call.pool

    @property
    def label(self) -> str:
        """What ran: the signal types, or the pool-aware task's name."""
        if self.kind == "task":
            return str(self.name)
        return self.call.label

    @property
    def call(self) -> CallMessage:
        """The call or cast this request carries (not for a pool-aware task)."""
        return CallMessage.from_args(self.args, self.kind)

    def agent_lost(self) -> AgentLost:
        """The error for this request's caller: its process died."""
        pid = int(self.worker_pid) if self.worker_pid else None
        started = self.time_start is not None
        where = f"pid {pid} on {self.hostname}" if pid else f"on {self.hostname}"
        return AgentLost(
            f"pool {self.pool!r}: the worker process running {self.label} ({where}) died "
            f"before it answered; {'the work may have run' if started else 'it had not started'}",
            self.pool, self.hostname, pid, self.label, started)

    def _process_lost(self, exception: Any) -> bool:
        exc = getattr(exception, "exc", exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError):
            return True
        # billiard >= 4.3 reports the child's exit before it is gone; Celery takes that
        # as a lost worker too, unless the task was revoked or cancelled on purpose.
        deliberate = (getattr(self, "_already_cancelled", False)
                      or getattr(self, "_already_revoked", False))
        return isinstance(exc, SystemExit | KeyboardInterrupt) and not deliberate

    def _celery_decides(self) -> bool:
        return self.kind == "task" and bool(self.task.reject_on_worker_lost
                                            or getattr(self.task, "retry_on_worker_lost", None))

    def _redeliver(self) -> bool:
        """Send a cast again, up to its pool's limit; say whether it was."""
        attempts = _context(self).retries + 1
        limit = _extension(self).configuration.spec(self.pool).max_redeliveries
        if attempts > limit:
            return False
        queue = pool_queue(self.task.app, _extension(self).configuration.spec(self.pool).queue)
        try:
            # On the package's own producer and to its own queue, as every publish of
            # the package (see celery_warmpool.wire.scoped and celery_warmpool.wire.queues).
            with scoped(self.task.app).producers.acquire() as producer:
                self.task.signature_from_request(
                    _context(self), retries=attempts, countdown=0, **route(queue),
                ).apply_async(producer=producer)
        except Exception:
            logger.exception("pool %r: could not deliver cast %s again after its process "
                             "died", self.pool, self.id)
            return False
        logger.warning("pool %r: the process running cast %s (%s) died; delivered again "
                       "(%d of %d)", self.pool, self.id, self.label, attempts, limit)
        self.acknowledge()
        return True

    def _dead_letter(self, lost: AgentLost) -> None:
        _extension(self).runtime.dead_letter(
            self.pool, dict(self.call.signals[0]), lost, task_id=self.id, pid=lost.pid,
            attempts=_context(self).retries + 1, may_have_run=True, model=self.call.model)


def _context(request: Any) -> Any:
    """The request's task context (retries, delivery info), as Celery's retry uses it."""
    return request._context


def _extension(request: Any) -> Any:
    """The app's :class:`~celery_warmpool.WarmPool`."""
    return request.task.app.warmpool


def _info(error: BaseException) -> ExceptionInfo:
    try:
        raise error
    except BaseException:
        return ExceptionInfo()
