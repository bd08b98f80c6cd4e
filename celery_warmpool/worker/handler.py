"""What a call does inside the worker: the tasks that run signals on a pool's agents.

``warm.call``, ``warm.transaction`` and ``warm.stream`` send
:data:`~celery_warmpool.wire.message.CALL_TASK`, ``warm.cast`` sends
:data:`~celery_warmpool.wire.message.CAST_TASK`, to the pool's queue, each carrying a
:class:`~celery_warmpool.wire.message.CallMessage`. In the process that takes it, either:

1. drops the call unrun if its deadline (the caller's ``timeout``) has passed;
2. checks an agent out (in a pool with ``max_models``, one holding the message's model,
   loaded now if need be), waiting at most until that deadline, and drops the call unrun if
   its caller left it meanwhile (a cancel mark, see :mod:`..wire.marks`; a caller
   that left before any worker took the call marked it taken, see :mod:`.claims`);
3. runs the signals on it inline (a transaction: all or nothing);
4. with a ``call_timeout``, has the process's watchdog answer the caller with
   :class:`CallTimeout` at that deadline and replace the agent, while the overrunning
   work finishes in its own time and its late outcome is dropped;
5. checks the agent back in and returns the replies as JSON data.

Whatever else the package's own code raises on the way (a bug, a result store's refusal)
reaches the caller as :class:`WorkerFailed` naming the original error, never as the
foreign exception itself; an action's own error is :class:`ActionFailed`, as always.

A cast that fails (invalid or unknown signal, failed action, past its deadline, overran)
also goes to its pool's dead-letter queue; one whose process dies is delivered again (see
:mod:`.requests`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry

from ..core.agent import Agent
from ..core.arguments import MAX_SECONDS
from ..core.cancellation import Cancellation
from ..core.errors import (
    ActionFailed,
    CheckoutTimeout,
    HandedBack,
    StreamCancelled,
    WarmPoolError,
    WorkerFailed,
)
from ..core.pool import AgentPool
from ..core.reply import AgentReply
from ..core.signal import Signal
from ..wire.marks import is_cancelled
from ..wire.message import CALL_TASK, CAST_TASK, CallMessage
from ..wire.scoped import StoresOwnResults
from .claims import WAITED, CallClaims
from .requests import REQUEST
from .runtime import WorkerRuntime
from .streams import StreamSink
from .watchdog import Watchdog

__all__ = ["CallHandler", "register_tasks"]

#: Characters of a call's replies the worker's log shows (Celery's default is 1,024; the
#: repr is made for every task, at a cost that grows with its length).
RESULT_REPR_MOST = 200

logger = logging.getLogger(__name__)

#: Seconds a stream's chunks are kept when its call has no ``call_timeout``, beyond
#: ``stream_idle_timeout``.
STREAM_KEEP = 3600.0


class CallHandler:
    """Runs the signals of one call on an agent of this process (see the module)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.claims = CallClaims(runtime)

    def handle(self, task: Task, message: CallMessage) -> list[dict[str, Any]]:  # type: ignore[type-arg]
        """Run ``message``'s signals on one agent of its pool; return the replies as JSON
        data.

        With ``message.stream``, the one signal's chunks go to its caller as they come
        (see :mod:`.streams`).
        """
        pool, deadline, call_timeout = message.pool, message.deadline, message.call_timeout
        transaction, stream, model = message.transaction, message.stream, message.model
        agent_pool = self.runtime.local_pool(pool)
        events = [Signal.parse(signal) for signal in message.signals]
        asked = time.monotonic()
        try:
            agent = agent_pool.checkout(timeout=_time_left(agent_pool, deadline), model=model)
        except HandedBack:
            # The node is draining or stopping: back to the broker, for another node.
            raise Reject(requeue=True) from None
        try:
            admitted = self.claims.admit(task, message,
                                         waited=time.monotonic() - asked > WAITED)
        except BaseException:
            agent_pool.checkin(agent)
            raise
        if not admitted:
            # Another copy took it (that copy answers), or its caller left: nobody waits
            # for this one, so nothing is stored.
            agent_pool.checkin(agent)
            raise Ignore()

        def work(stopped: Callable[[], bool]) -> list[AgentReply]:
            if stream:
                return [self._stream(task, agent_pool, agent, events[0], call_timeout,
                                     stopped, cancellation, model)]
            return agent_pool.work.run_signals(agent, events, transaction=transaction,
                                               cancellation=cancellation, model=model)

        cancellation = _cancellation(task)
        label = ",".join(event.type for event in events)
        if call_timeout is None:
            with agent_pool.lent(agent):
                replies = work(lambda: False)
        else:
            replies = self._watched(task, agent_pool, agent, label, call_timeout, work)
        return [reply.to_wire() for reply in replies]

    def _watched(self, task: Task, agent_pool: AgentPool[Agent[Any]],  # type: ignore[type-arg]
                 agent: Agent[Any], label: str, call_timeout: float,
                 work: Callable[[Callable[[], bool]], list[AgentReply]]) -> list[AgentReply]:
        # The work runs here, inline; if it overruns, the watchdog answers the caller at
        # the deadline and replaces the agent, and this task's own late outcome is
        # dropped (Ignore) so it cannot overwrite that answer.
        watchdog = Watchdog.of_this_process()
        token = watchdog.watch(call_timeout, functools.partial(
            self._overran, task, task.request, agent_pool, agent, label, call_timeout))
        lease = None
        try:
            with agent_pool.lent(agent) as lease:
                try:
                    return work(functools.partial(watchdog.expired, token))
                finally:
                    lease.abandoned = not watchdog.done(token)
        finally:
            if lease is not None and lease.abandoned:
                # Whatever the late work ended with, even an error, the caller has had
                # its answer.
                agent_pool.finish_abandoned(agent)
                raise Ignore()

    def _stream(self, task: Task, agent_pool: AgentPool[Agent[Any]],  # type: ignore[type-arg]
                agent: Agent[Any], event: Signal, call_timeout: float | None,
                stopped: Callable[[], bool], cancellation: Cancellation,
                model: str | None) -> AgentReply:
        """Stream ``event`` on ``agent`` to its caller; its final reply."""
        spec = self.runtime.configuration.spec(agent_pool.name)
        client = task.backend.client  # type: ignore[attr-defined]
        sink = StreamSink(
            client, str(task.request.id), buffer=spec.stream_buffer,
            idle_timeout=spec.stream_idle_timeout, stopped=stopped,
            expires=(call_timeout or STREAM_KEEP) + spec.stream_idle_timeout)
        try:
            return agent_pool.work.run_stream(agent, event, sink.emit, cancellation, model)
        except StreamCancelled:
            # Its reader is gone (closed, or silent too long): nobody waits for a reply.
            # The agent goes back healthy, its state unchanged.
            raise Ignore() from None

    def _overran(self, task: Task, request: Any,  # type: ignore[type-arg]
                 agent_pool: AgentPool[Agent[Any]], agent: Agent[Any], label: str,
                 call_timeout: float) -> None:
        """At the deadline of overrunning work: replace its agent, tell the caller."""
        error = agent_pool.work.overran(agent, label, call_timeout)
        if request.id is None:  # the task was called directly, not sent
            return
        # The request goes along: result backends that reply to the caller (rpc://) need
        # its reply_to, and this runs on the watchdog's thread, not the task's.
        task.backend.mark_as_failure(request.id, error, request=request)
        if getattr(task, "warmpool_kind", None) == "cast":
            self.dead_letter(request, error, may_have_run=True)

    def dead_letter(self, request: Any, error: BaseException, *,
                    may_have_run: bool = False) -> None:
        """Send the cast of ``request`` to its pool's dead-letter queue."""
        try:
            cast = CallMessage.from_args(request.args, "cast")
        except ValueError:
            logger.error("cast %s cannot be dead-lettered: its message cannot be read: %r",
                         request.id, request.args)
            return
        self.runtime.dead_letter(cast.pool, dict(cast.signals[0]), error, task_id=request.id,
                                 pid=os.getpid(), attempts=(request.retries or 0) + 1,
                                 may_have_run=may_have_run, model=cast.model)


def _time_left(agent_pool: AgentPool[Agent[Any]], deadline: float | None) -> float | None:
    """Seconds left to the caller's deadline for the checkout.

    Raises:
        CheckoutTimeout: the deadline passed before the call started; it is not run.
    """
    if deadline is None:
        return None
    # At most a day, whatever the clocks of caller and worker say (they may differ).
    left = min(deadline - time.time(), MAX_SECONDS)
    if left <= 0:
        raise CheckoutTimeout(
            f"pool {agent_pool.name!r}: the call waited {-left:.3f}s past its checkout "
            "timeout before a worker took it; it was not run",
            agent_pool.name, -left, agent_pool.size, agent_pool.max_overflow)
    return left


def _cancelled(task: Task) -> bool:  # type: ignore[type-arg]
    """Whether the caller of this call left it (see :mod:`..wire.marks`)."""
    client = getattr(task.backend, "client", None)
    task_id = task.request.id
    if task_id is None or getattr(task, "warmpool_kind", None) != "call" or client is None:
        return False
    try:
        return is_cancelled(client, task_id)
    except Exception as exc:  # an unreachable result store must not stop the call
        logger.debug("could not read the cancel mark of %s: %r", task_id, exc)
        return False


def _cancellation(task: Task) -> Cancellation:  # type: ignore[type-arg]
    """What tells the running action (``context.cancelled``) that its caller left."""
    return Cancellation(probe=functools.partial(_cancelled, task))


@contextlib.contextmanager
def _only_warmpool_errors(pool: Any) -> Iterator[None]:
    """Let a :class:`WarmPoolError` and Celery's own control flow (``Ignore``, ``Reject``,
    ``Retry``) through; turn anything else into :class:`WorkerFailed`, logged here with
    its traceback (the caller gets its type and message only)."""
    try:
        yield
    except (WarmPoolError, Ignore, Reject, Retry):
        raise
    except Exception as exc:
        logger.exception("pool %r: a call failed in the worker itself", pool)
        raise WorkerFailed.wrapping(exc, pool if isinstance(pool, str) else None) from exc


def _pool_of(args: tuple[Any, ...]) -> Any:
    """The pool a task's arguments name, as far as they can be read (for the log)."""
    first = args[0] if args else None
    return first.get("pool") if isinstance(first, dict) else first


def register_tasks(app: Celery, runtime: WorkerRuntime) -> tuple[Task, Task]:  # type: ignore[type-arg]
    """Register, on ``app``, the tasks that run calls and casts on a pool's agents."""
    handler = CallHandler(runtime)

    def handle(task: Task, *args: Any) -> list[dict[str, Any]]:  # type: ignore[type-arg]
        """Run a call's signals on one agent of its pool; return the replies as JSON data.

        Only the first copy of a call to be taken runs (see :mod:`.claims`).
        """
        with _only_warmpool_errors(_pool_of(args)):
            return handler.handle(task, CallMessage.from_args(args, "call"))

    def cast(task: Task, *args: Any) -> list[dict[str, Any]]:  # type: ignore[type-arg]
        """Run a cast's signal on one agent of its pool; dead-letter it if it fails.

        Its message says which copy of the cast it is: ``0`` as first sent, more when its
        caller sent it again after a broker restart (see :mod:`.claims`).
        """
        try:
            with _only_warmpool_errors(_pool_of(args)):
                return handler.handle(task, CallMessage.from_args(args, "cast"))
        except WarmPoolError as exc:
            handler.dead_letter(task.request, exc, may_have_run=isinstance(exc, ActionFailed))
            raise

    # Their replies go through the package's own result store (its retry settings),
    # never changing how the app's other tasks store theirs (see celery_warmpool.wire.scoped).
    base = type("WarmPoolTask", (StoresOwnResults, app.Task), {})
    options: dict[str, Any] = {"bind": True, "acks_late": True, "throws": (WarmPoolError,),
                               "shared": False, "Request": REQUEST, "base": base,
                               # What the worker's log and events show of the replies:
                               # Celery writes its repr for every task, whatever the level.
                               "resultrepr_maxsize": RESULT_REPR_MOST}
    call_task: Task = app.task(  # type: ignore[type-arg]
        **{**options, "name": CALL_TASK, "warmpool_kind": "call"})(handle)
    cast_task: Task = app.task(  # type: ignore[type-arg]
        **{**options, "name": CAST_TASK, "warmpool_kind": "cast"})(cast)
    return call_task, cast_task
