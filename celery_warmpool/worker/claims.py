"""Marking calls and casts taken before they start, so that a copy sent again never runs
beside the one it stands in for.

See :mod:`celery_warmpool.wire.marks` for the mark, why it exists and what a caller reads
in it. The process that is about to run a call or a cast sets the mark only if it is
absent; a process that finds it set by another copy drops its own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import Ignore, Reject

from ..core.errors import CheckoutTimeout
from ..wire.marks import (
    CAST_MARGIN,
    TAKEN_MARGIN,
    TakenMark,
    taken_key,
    taken_ttl,
    taken_value,
)
from ..wire.outages import Outages, retry

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["CallClaims", "is_taken"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Seconds work without a deadline (a cast sent without ``timeout``) waits for an
#: unreachable result store before it runs unmarked: at least once, rather than never.
UNMARKED_AFTER = 10.0


class CallClaims:
    """Marks the calls one worker node takes (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def run_once(self, task: Any, pool: str, deadline: float | None,
                 run: Callable[[], T], copy: int | None = None) -> T:
        """``run()`` the work ``task`` carries if this process takes it.

        A call (``copy`` ``None``) runs only if no copy of it was taken already; a cast
        (``copy``: which copy of it this message is) runs unless another copy was (see
        :mod:`celery_warmpool.wire.marks`). A copy that is not run is dropped unanswered
        (:class:`~celery.exceptions.Ignore`: the copy that runs answers). Work handed
        back to the broker (:class:`~celery.exceptions.Reject`) loses its mark, so that
        another node may take it.
        """
        task_id = task.request.id
        if task_id is None:  # called directly, not sent: nothing to mark
            return run()
        if not self.claim(task.backend, pool, str(task_id), deadline, copy):
            what = "call" if copy is None else f"cast (copy {copy})"
            logger.info("pool %r: %s %s was taken already; this copy is dropped", pool,
                        what, task_id)
            raise Ignore()
        try:
            return run()
        except Reject:
            self.release(task.backend, str(task_id))
            raise

    def claim(self, backend: Any, pool: str, task_id: str, deadline: float | None,
              copy: int | None = None) -> bool:
        """Mark ``task_id`` taken by this process; false if another copy took it.

        ``copy`` is ``None`` for a call, and which copy a cast's message is for a cast
        (a cast's copy runs again where the mark holds its own number). A result store
        that cannot hold a mark (not Redis) claims everything. One that is away is tried
        again until the deadline (work without one: :data:`UNMARKED_AFTER` seconds, then
        it runs unmarked).

        Raises:
            CheckoutTimeout: the result store could not be reached before the deadline;
                the work is not run.
        """
        client = _redis_client(backend)
        if client is None:
            return True
        now = time.time()
        key = taken_key(task_id)
        mine, ttl_ms = self._mark(now, deadline, copy)

        def mark() -> bool:
            if client.set(key, mine, nx=True, px=ttl_ms):
                return True
            # The set may have reached the server and its answer been lost to a
            # reconnection (redis-py then sends it again): the mark is ours if it holds
            # our own value (a cast's: our copy number).
            return _holds(client.get(key), mine, copy)

        # Until the deadline (on the monotonic clock), or UNMARKED_AFTER without one.
        left = UNMARKED_AFTER if deadline is None else deadline - now
        try:
            return retry(mark, Outages.of(backend.app), time.monotonic() + left,
                         on_outage=lambda exc: logger.debug(
                             "could not mark %s taken (%r); retrying", task_id, exc))
        except Exception as exc:
            if not Outages.of(backend.app).is_outage(exc):
                raise
            if deadline is None:
                logger.warning("could not mark %s taken for %.0fs (%r): it runs unmarked",
                               task_id, UNMARKED_AFTER, exc)
                return True
            raise CheckoutTimeout(
                f"pool {pool!r}: the result store was unreachable until the checkout "
                f"deadline of {task_id} ({type(exc).__name__}: {exc}); it was not run",
                pool, time.time() - deadline) from exc

    def claim_all(self, backend: Any,
                  work: list[tuple[str, float | None, int | None]]) -> list[bool]:
        """:meth:`claim` for a batch in one round trip: which of ``work`` (task id,
        deadline, copy) this process may run.

        Batches run batch actions, which change no state and are safe to run twice: a
        message the batch delivers again after its process died runs again, a call's as
        a cast's (its mark holds its own copy number), and a result store that cannot be
        reached lets every item run, unmarked.
        """
        client = _redis_client(backend)
        if client is None or not work:
            return [True] * len(work)
        now = time.time()
        marks = [self._mark(now, deadline, copy) for _, deadline, copy in work]
        values = [value for value, _ in marks]
        pipe = client.pipeline(transaction=False)
        for (task_id, _, _), (value, ttl_ms) in zip(work, marks, strict=True):
            pipe.set(taken_key(task_id), value, nx=True, px=ttl_ms)
            pipe.get(taken_key(task_id))  # the set's or the other copy's mark
        try:
            answers = pipe.execute()
        except Outages.of(backend.app).errors as exc:
            logger.warning("could not mark a batch of %d taken (%r): it runs unmarked",
                           len(work), exc)
            return [True] * len(work)
        return [_holds(stored, value, copy or 0) for stored, value, (_, _, copy)
                in zip(answers[1::2], values, work, strict=True)]

    def _mark(self, now: float, deadline: float | None, copy: int | None) -> tuple[str, int]:
        """This process's mark for work taken ``now`` (a call: ``copy`` ``None``), and
        how many milliseconds it lives."""
        value = taken_value(self.runtime.node or "", os.getpid(), now, copy or 0)
        margin = TAKEN_MARGIN if copy is None else CAST_MARGIN
        return value, max(1, int(taken_ttl(deadline, now, margin) * 1000))

    def release(self, backend: Any, task_id: str) -> None:
        """Remove this process's mark of ``task_id`` (it goes back to the broker)."""
        self.release_all(backend, [task_id])

    def release_all(self, backend: Any, task_ids: list[str]) -> None:
        """Remove this process's marks of ``task_ids`` (they go back to the broker)."""
        client = _redis_client(backend)
        if client is None or not task_ids:
            return
        try:
            client.delete(*[taken_key(task_id) for task_id in task_ids])
        except Outages.of(backend.app).errors:
            # The work then waits for its mark to expire: a call is answered at its
            # deadline, a cast's copy sent again by its caller runs then.
            logger.warning("could not remove the taken marks of %s", ", ".join(task_ids),
                           exc_info=True)


def is_taken(backend: Any, task_id: str) -> bool:
    """Whether a copy of the call ``task_id`` was marked taken (never, where no marks are
    kept).

    Raises:
        The result store's connection errors.
    """
    client = _redis_client(backend)
    return client is not None and bool(client.exists(taken_key(task_id)))


def _redis_client(backend: Any) -> Any:
    """The Redis client of ``backend`` if it is Celery's Redis result store, else None."""
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # no redis client installed: no Redis result store either
        return None
    return backend.client if isinstance(backend, RedisBackend) else None


def _holds(stored: Any, mine: str, copy: int | None) -> bool:
    """Whether the mark ``stored`` lets this message run (see :meth:`CallClaims.claim`)."""
    if stored is None:  # expired between the set and the get: nobody holds it
        return False
    text = stored.decode() if isinstance(stored, bytes) else str(stored)
    if copy is None:
        return text == mine
    try:
        return TakenMark.parse(text).copy == copy
    except ValueError:  # not a worker's mark (a cancelled call's): not this cast's
        return False
