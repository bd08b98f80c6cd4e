"""Marking calls and casts taken before they start, so that a copy sent again never runs
beside the one it stands in for, and dropping calls whose callers left.

See :mod:`celery_warmpool.wire.marks` for the mark, why it exists and what a caller reads
in it. The process that is about to run a call or a cast (it holds an agent for it)
sets the mark only if it is absent, and reads the call's cancel mark in the same step; a
process that finds the mark set by another copy, or the call cancelled, drops its own.
Only a broker that can lose a popped message (Redis) needs the mark.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from ..core.errors import CheckoutTimeout
from ..wire.marks import (
    CAST_MARGIN,
    CLAIM,
    HELD,
    MINE,
    TAKEN_MARGIN,
    TakenMark,
    cancel_key,
    loses_popped_messages,
    taken_key,
    taken_ttl,
    taken_value,
)
from ..wire.message import CALL_TASK, CallMessage
from ..wire.outages import Outages, retry

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["CallClaims", "is_taken"]

logger = logging.getLogger(__name__)

#: Seconds since a call was sent (or of waiting for an agent) after which its cancel mark is
#: read before it starts, where nothing else reads it (a call taken at once has its
#: caller there).
WAITED = 0.01
#: Seconds work without a deadline (a cast sent without ``timeout``) waits for an
#: unreachable result store before it runs unmarked: at least once, rather than never.
UNMARKED_AFTER = 10.0


class CallClaims:
    """Marks the calls one worker node takes (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def admit(self, task: Any, message: CallMessage, *, waited: bool) -> bool:
        """Whether this process may run the work ``task`` carries (``message``), now that
        it holds an agent for it; one round trip to the result store at most.

        With a broker that can lose a popped message (Redis) the work is marked taken,
        its cancel mark read in the same step (:meth:`claim`): a call runs only if no copy
        of it was taken already and its caller has not left; a cast (its ``copy``) unless
        another copy was. With another broker nothing is marked; a call's cancel mark is
        read only if it may have waited (``waited`` for an agent here, or sent over
        :data:`WAITED` seconds ago): one taken at once has its caller there.
        """
        task_id = task.request.id
        backend = task.backend
        client = _redis_client(backend)
        if task_id is None or client is None:  # called directly; or no store for marks
            return True
        call = message.copy == 0 and task.name == CALL_TASK
        if loses_popped_messages(backend.app):
            taken = self.claim(backend, message.pool, str(task_id), message.deadline,
                               None if call else message.copy)
        elif call and (waited or _sent_before(message, time.time() - WAITED)):
            taken = not _cancelled(client, str(task_id))
        else:
            return True
        if not taken:
            what = "call" if call else f"cast (copy {message.copy})"
            logger.info("pool %r: %s %s was taken already, or its caller left; this copy "
                        "is dropped", message.pool, what, task_id)
        return taken

    def claim(self, backend: Any, pool: str, task_id: str, deadline: float | None,
              copy: int | None = None) -> bool:
        """Mark ``task_id`` taken by this process; false if another copy took it, or its
        caller cancelled it (both read in the one step, :data:`~..wire.marks.CLAIM`).

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
        keys = (taken_key(task_id), cancel_key(task_id))
        mine, ttl_ms = self._mark(now, deadline, copy)

        def mark() -> bool:
            answer = _claim(client, keys, mine, ttl_ms)
            if answer[0] == HELD:
                # The set may have reached the server and its answer been lost to a
                # reconnection (the script then runs again): the mark is ours if it holds
                # our own value (a cast's: our copy number).
                return _holds(answer[1], mine, copy)
            return bool(answer[0] == MINE)

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
        if client is None or not work or not loses_popped_messages(backend.app):
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


#: The SHA1 Redis knows :data:`CLAIM` by, once it was sent.
_CLAIM_SHA = hashlib.sha1(CLAIM.encode()).hexdigest()


def _claim(client: Any, keys: tuple[str, str], mine: str, ttl_ms: int) -> list[Any]:
    """Run :data:`CLAIM` (by its SHA1; sent in full the first time a server sees it)."""
    try:
        answer: list[Any] = client.evalsha(_CLAIM_SHA, 2, *keys, mine, ttl_ms)
    except NoScriptError:
        answer = client.eval(CLAIM, 2, *keys, mine, ttl_ms)
    return answer


def _sent_before(message: CallMessage, when: float) -> bool:
    """Whether ``message`` was sent before ``when`` (Unix time; unknown: yes)."""
    return message.sent is None or message.sent < when


def _cancelled(client: Any, task_id: str) -> bool:
    """Whether the caller of ``task_id`` left it; an unreachable store says no."""
    try:
        return bool(client.exists(cancel_key(task_id)))
    except Exception as exc:  # an unreachable result store must not stop the call
        logger.debug("could not read the cancel mark of %s: %r", task_id, exc)
        return False


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
