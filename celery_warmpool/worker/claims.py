"""Marking a call taken before it starts, so that one copy of it runs at most.

See :mod:`celery_warmpool.core.marks` for the mark, why it exists and what a caller reads
in it. The process that is about to run a call sets the mark only if it is absent; a
process that finds it set by another drops its copy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import Ignore, Reject

from ..core.errors import CheckoutTimeout
from ..core.marks import taken_key, taken_ttl, taken_value

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["CallClaims", "is_taken"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Seconds between two tries to mark a call while the result store is away: first, most.
RETRY_FIRST, RETRY_MOST = 0.05, 0.5


class CallClaims:
    """Marks the calls one worker node takes (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def run_once(self, task: Any, pool: str, deadline: float | None,
                 run: Callable[[], T]) -> T:
        """``run()`` the call ``task`` carries if this process takes it first.

        A copy of a call taken already elsewhere is dropped unrun and unanswered
        (:class:`~celery.exceptions.Ignore`: the copy that runs answers). A call handed
        back to the broker (:class:`~celery.exceptions.Reject`) loses its mark, so that
        another node may take it.
        """
        task_id = task.request.id
        if task_id is None:  # called directly, not sent: nothing to mark
            return run()
        if not self.claim(task.backend, pool, str(task_id), deadline):
            logger.info("pool %r: call %s was taken already; this copy is dropped", pool,
                        task_id)
            raise Ignore()
        try:
            return run()
        except Reject:
            self.release(task.backend, str(task_id))
            raise

    def claim(self, backend: Any, pool: str, task_id: str, deadline: float | None) -> bool:
        """Mark the call ``task_id`` taken by this process; false if another copy was.

        A result store that cannot hold a mark (not Redis) claims every call. One that is
        away is tried again until the call's deadline.

        Raises:
            CheckoutTimeout: the result store could not be reached before the deadline;
                the call is not run.
        """
        client = _redis_client(backend)
        if client is None:
            return True
        now = time.time()
        key = taken_key(task_id)
        mine = taken_value(self.runtime.node or "", os.getpid(), now)
        ttl_ms = max(1, int(taken_ttl(deadline, now) * 1000))
        delay = RETRY_FIRST
        while True:
            try:
                if client.set(key, mine, nx=True, px=ttl_ms):
                    return True
                # The set may have reached the server and its answer been lost to a
                # reconnection (redis-py then sends it again): the mark is ours if it
                # holds our own value.
                return _text(client.get(key)) == mine
            except backend.connection_errors as exc:
                if deadline is not None and time.time() >= deadline:
                    raise CheckoutTimeout(
                        f"pool {pool!r}: the result store was unreachable until the call's "
                        f"checkout deadline ({type(exc).__name__}: {exc}); it was not run",
                        pool, time.time() - deadline) from exc
                logger.debug("could not mark call %s taken (%r); retrying", task_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)

    def release(self, backend: Any, task_id: str) -> None:
        """Remove this process's mark of ``task_id`` (the call goes back to the broker)."""
        client = _redis_client(backend)
        if client is None:
            return
        try:
            client.delete(taken_key(task_id))
        except backend.connection_errors:
            # The call then waits for its mark to expire: it is answered at its deadline.
            logger.warning("could not remove the taken mark of call %s", task_id,
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


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
