"""Calling pools over the broker: call, transaction and cast, blocking or awaited.

Each kind of call is written once, as steps (:mod:`.protocol`); ``call`` carries them out
in the calling thread and ``acall`` on the caller's event loop (:mod:`.shells`). Replies
come through the process's one :class:`~.listener.ReplyListener` when the result store
is Redis; with another result backend a call waits as Celery's own ``get()`` does (and
``acall`` waits for it on a thread): see :meth:`PoolClient.listener`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task, states
from celery.result import AsyncResult

from ..core.arguments import call_timeouts, cast_timeouts, pool_model, pool_name, signal_list
from ..core.errors import (
    BrokerUnavailable,
    ConfigurationError,
    WorkerFailed,
)
from ..core.ids import new_id
from ..core.reply import AgentReply
from ..core.signal import Signal
from ..core.stream import Stream
from ..wire.marks import loses_popped_messages, mark_cancelled
from ..wire.message import CALL_TASK, CAST_TASK, CallMessage
from .delivery import Delivery
from .fallback import CeleryCalls, no_reply
from .listener import RECONNECTED, ReplyListener, Subscription
from .protocol import Receive, Steps, Taken, ask_taken, publish_steps
from .publisher import Message, Publisher
from .resends import SentCasts
from .shells import AsyncStream, blocking_chunks, run_async, run_blocking
from .streaming import stream_steps

if TYPE_CHECKING:
    from ..configuration import PoolConfiguration
    from ..core.spec import PoolSpec

__all__ = ["PoolClient", "SignalLike"]

logger = logging.getLogger(__name__)

#: Seconds a caller waits beyond ``timeout + call_timeout`` for the reply to travel back.
REPLY_GRACE = 2.0
#: Seconds a cast without a ``timeout`` keeps trying to reach an unreachable broker.
PUBLISH_TIMEOUT = 10.0

SignalLike = Signal | Mapping[str, Any] | str
R = TypeVar("R")


def _as_data(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply left as the JSON data the worker stored."""
    return reply


def as_reply(reply: dict[str, Any]) -> AgentReply:
    """A reply as an :class:`AgentReply`, from the JSON data the worker stored."""
    return AgentReply.model_validate(reply)


class PoolClient:
    """Call, cast and transact with pools over the broker, from threads or coroutines.

    ``handle_task`` and ``cast_task`` are the tasks that run a call's and a cast's signals
    on a pool's agents in the worker.
    """

    def __init__(self, configuration: PoolConfiguration, handle_task: Task,  # type: ignore[type-arg]
                 cast_task: Task) -> None:  # type: ignore[type-arg]
        self.configuration = configuration
        self.handle_task = handle_task
        self.cast_task = cast_task
        self.app = handle_task.app
        self.delivery = Delivery(self.app)
        self.publisher = Publisher(self.app)
        self._celery = CeleryCalls(configuration, handle_task, self.publisher, self.delivery)
        #: Seconds a caller waits beyond ``timeout + call_timeout`` for the reply.
        self.reply_grace = REPLY_GRACE
        self._listener: ReplyListener | None = None
        self._listener_pid = 0
        self._sent_casts: SentCasts | None = None

    @functools.cached_property
    def _backend(self) -> Any:
        # Celery keeps a result backend per thread; keys and decoding are the same in all,
        # so one serves every caller of the process (nothing is sent through it).
        return self.app.backend

    # -- blocking ------------------------------------------------------------------------

    def call(self, pool: str, signal: SignalLike, timeout: float = 5.0,
             call_timeout: float | None = 5.0, *, model: str | None = None) -> AgentReply:
        """Handle ``signal`` on an agent of ``pool`` and return its reply.

        Arguments:
            timeout: seconds the call may wait to start (for a worker and a free agent);
                past it the caller gets :class:`CheckoutTimeout` and it never runs.
            call_timeout: seconds the work may take; past it the caller gets
                :class:`CallTimeout` and the agent that overran is replaced. ``None``:
                no bound.

        Both are checked before anything is sent: finite, from 0.001 to 86400 seconds
        (see :mod:`celery_warmpool.core.arguments`). ``model`` names the model the call
        is for: required by a pool with ``max_models`` (a model id), refused by another.

        A broker or result store away for less than the call's time is waited out. A
        caller interrupted while it waits (``KeyboardInterrupt``) leaves the call: if no
        worker has started it, none will.

        Raises:
            InvalidArgument, UnknownPool, InvalidSignal, UnknownSignal, ActionFailed,
            CheckoutTimeout, CallTimeout, AgentLost, BrokerUnavailable, WorkerFailed,
            ModelLoadFailed: as their names say; never a reply hiding an error, never an
            exception that is not a :class:`WarmPoolError`.
            PoolBusy: the pool has ``max_queued`` and that many calls wait; the call
                was not queued and never runs (see :mod:`.admission`).
        """
        return self.transaction(pool, [signal], timeout, call_timeout, model=model)[0]

    def transaction(self, pool: str, signals: Iterable[SignalLike], timeout: float = 5.0,
                    call_timeout: float | None = 5.0, *,
                    model: str | None = None) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing (see :meth:`call`)."""
        pool, (timeout, call_timeout) = pool_name(pool), call_timeouts(timeout, call_timeout)
        events = [Signal.parse(signal) for signal in signal_list(signals)]
        if not events:
            return []
        if self.listener() is None:
            return self._celery.call(pool, events, timeout, call_timeout, self.reply_grace, model)
        return run_blocking(self.call_steps(pool, events, timeout, call_timeout, as_reply,
                                            model))

    def cast(self, pool: str, signal: SignalLike, timeout: float | None = None,
             call_timeout: float | None = None, *,
             model: str | None = None) -> AsyncResult:  # type: ignore[type-arg]
        """Send ``signal`` without waiting; the agent is held until the work ends.

        Returns the :class:`AsyncResult`, as ``.delay()`` does. With ``timeout`` the work
        is dropped (to the dead-letter queue) if it cannot start within that many
        seconds; without (``None``) it waits for an agent as long as it takes. With
        ``call_timeout`` the work is bounded as a call's is (``None``: no bound). Both are
        checked as :meth:`call`'s are, ``model`` too. Publishing is retried while the
        broker is away, for ``timeout`` seconds or :data:`PUBLISH_TIMEOUT` without one.

        Raises:
            InvalidArgument: an argument is out of range or of the wrong type.
            BrokerUnavailable: the broker could not be reached in that time.
            PoolBusy: the pool has ``max_queued`` and that many calls wait; the cast was
                not queued and never runs.
        """
        pool, (timeout, call_timeout) = pool_name(pool), cast_timeouts(timeout, call_timeout)
        return run_blocking(self.cast_steps(pool, signal, timeout, call_timeout, model))

    # -- asyncio -------------------------------------------------------------------------

    async def acall(self, pool: str, signal: SignalLike, timeout: float = 5.0,
                    call_timeout: float | None = 5.0, *,
                    model: str | None = None) -> AgentReply:
        """:meth:`call`, awaited: the event loop never blocks, a broker outage included.

        A cancelled caller (``asyncio.CancelledError``, as when an HTTP client goes
        away) stops waiting at once; if no worker has started the call, none will.
        """
        return (await self.atransaction(pool, [signal], timeout, call_timeout,
                                        model=model))[0]

    async def atransaction(self, pool: str, signals: Iterable[SignalLike],
                           timeout: float = 5.0, call_timeout: float | None = 5.0, *,
                           model: str | None = None) -> list[AgentReply]:
        """:meth:`transaction`, awaited (see :meth:`acall`)."""
        pool, (timeout, call_timeout) = pool_name(pool), call_timeouts(timeout, call_timeout)
        events = [Signal.parse(signal) for signal in signal_list(signals)]
        if not events:
            return []
        if self.listener() is None:
            return await asyncio.to_thread(self._celery.call, pool, events, timeout,
                                           call_timeout, self.reply_grace, model)
        return await run_async(self.call_steps(pool, events, timeout, call_timeout, as_reply,
                                               model),
                               self.publisher.executor)

    async def acall_data(self, pool: str, signal: SignalLike, timeout: float = 5.0,
                         call_timeout: float | None = 5.0) -> dict[str, Any]:
        """:meth:`acall`, its reply as the JSON data the worker stored (an
        :class:`AgentReply`'s fields), for code that sends it on as JSON (the HTTP
        gateway): no model is built and dumped again."""
        pool, (timeout, call_timeout) = pool_name(pool), call_timeouts(timeout, call_timeout)
        events = [Signal.parse(signal)]
        if self.listener() is None:
            reply = await asyncio.to_thread(self._celery.call, pool, events, timeout,
                                            call_timeout, self.reply_grace)
            return reply[0].model_dump(mode="json")
        [data] = await run_async(self.call_steps(pool, events, timeout, call_timeout,
                                                 parse=_as_data), self.publisher.executor)
        return data

    async def acast(self, pool: str, signal: SignalLike, timeout: float | None = None,
                    call_timeout: float | None = None, *,
                    model: str | None = None) -> AsyncResult:  # type: ignore[type-arg]
        """:meth:`cast`, awaited: publishing runs on a thread, never on the loop."""
        pool, (timeout, call_timeout) = pool_name(pool), cast_timeouts(timeout, call_timeout)
        return await run_async(self.cast_steps(pool, signal, timeout, call_timeout, model),
                               self.publisher.executor)

    # -- streams --------------------------------------------------------------------------

    def stream(self, pool: str, signal: SignalLike, timeout: float = 5.0,
               call_timeout: float | None = 60.0, *, model: str | None = None) -> Stream:
        """Handle ``signal`` with a streaming action of ``pool``; its chunks as they come.

        Iterate the returned :class:`Stream` for the chunks, in order; ``stream.reply``
        is the final :class:`AgentReply` once it is exhausted. An error raises from the
        iteration after the chunks that came before it. Closing the stream (``close()``,
        a ``with`` block, ``break`` and garbage collection) stops the agent's generator
        at its next ``yield``. A stream is never delivered twice.

        Raises:
            InvalidArgument: an argument is out of range or of the wrong type (see
                :meth:`call`).
            ConfigurationError: the result store cannot carry streams (only Redis can).
            UnknownPool: no such pool is configured.
        """
        timeout, call_timeout = call_timeouts(timeout, call_timeout)
        listener, event = self._streamable(pool, signal, model)
        steps = stream_steps(self, listener, pool, event, timeout, call_timeout, model)
        return Stream(blocking_chunks(steps))

    def astream(self, pool: str, signal: SignalLike, timeout: float = 5.0,
                call_timeout: float | None = 60.0, *,
                model: str | None = None) -> AsyncStream:
        """:meth:`stream` as an async iterator, read on the caller's event loop."""
        timeout, call_timeout = call_timeouts(timeout, call_timeout)
        listener, event = self._streamable(pool, signal, model)
        steps = stream_steps(self, listener, pool, event, timeout, call_timeout, model)
        return AsyncStream(steps, self.publisher.executor)

    def _streamable(self, pool: str, signal: SignalLike,
                    model: str | None) -> tuple[ReplyListener, Signal]:
        event = Signal.parse(signal)
        spec = self.configuration.spec(pool_name(pool))
        pool_model(pool, spec.max_models, model)  # before anything is sent
        listener = self.listener()
        if listener is None:
            raise ConfigurationError(
                f"pool {pool!r}: streams need a Redis result store (result_backend = "
                f"'redis://...'); this app's is {type(self.app.backend).__name__}",
                pool, "result_backend")
        return listener, event

    # -- what a call is ----------------------------------------------------------------

    def call_steps(self, pool: str, events: list[Signal], timeout: float,
                   call_timeout: float | None, parse: Callable[[dict[str, Any]], R],
                   model: str | None = None) -> Steps[list[R]]:
        """The steps of a call (one event) or a transaction (several) on ``pool`` (for
        ``model``, in a pool with ``max_models``); each reply made with ``parse``
        (:func:`as_reply`: an :class:`AgentReply`).

        The message carries the caller's deadline, so a worker that takes it late drops
        it unrun. The reply is awaited for ``timeout + call_timeout + REPLY_GRACE``.
        """
        listener = self.listener()
        assert listener is not None
        started = time.monotonic()
        task_id = new_id()
        message = self.call_message(task_id, pool, events, timeout, call_timeout,
                                    reply=listener.channel.decode(), model=model)
        window = timeout + (call_timeout or 0.0) + self.reply_grace
        subscription = listener.expect(task_id, self.result_key(task_id))
        try:
            yield from self.publishing(message, started + timeout, timeout)
            while True:
                remaining = started + window - time.monotonic()
                item = yield Receive(subscription.mailbox, max(0.0, remaining))
                if item is None and remaining <= 0:
                    raise self.silence(listener, pool, timeout, window)
                if item is RECONNECTED or isinstance(item, Taken):
                    # A copy sent again was admitted once: not held to the pool's bound.
                    yield from self.recover(listener, subscription, task_id, item,
                                            functools.partial(self.publisher.send,
                                                              message.again()),
                                            started + timeout)
                elif isinstance(item, bytes):
                    replies = self.read_reply(item)
                    if replies is not None:
                        break
        except BaseException as exc:
            if not isinstance(exc, Exception):  # the caller left: cancelled, interrupted
                listener.leave(exc, functools.partial(mark_cancelled, task_id=task_id,
                                                      seconds=window))
            raise
        finally:
            listener.forget(subscription)
        return [parse(reply) for reply in replies]

    def recover(self, listener: ReplyListener, subscription: Subscription, task_id: str,
                notice: Any, send: Callable[[], None], deadline: float) -> Steps[None]:
        """The steps of a call (or stream) after an outage, until ``deadline`` (monotonic,
        the call's checkout deadline): on :data:`RECONNECTED`, ask whether a worker took
        the message (the answer, a :class:`Taken`, comes to ``subscription``); on a
        :class:`Taken` that says none did, publish it again. The message was lost with a
        broker that went away; the copy has the same id and deadline, and only one copy
        can run (see :mod:`celery_warmpool.wire.marks`)."""
        left = deadline - time.monotonic()
        if left <= 0 or not loses_popped_messages(self.app):
            return  # too late to start; or a broker that loses nothing (no marks kept)
        if notice is RECONNECTED:
            listener.submit(functools.partial(ask_taken, task_id, subscription),
                            retry_for=left)
        elif not notice.taken:
            yield from self.publish(send, deadline, left)

    def publish(self, send: Callable[[], None], deadline: float, timeout: float,
                asend: Callable[[], Awaitable[None]] | None = None) -> Steps[None]:
        """The steps of publishing with ``send`` (or, on an event loop, ``asend``), retried
        until ``deadline`` (monotonic)."""
        yield from publish_steps(send, deadline, timeout, self.delivery.outages,
                                 self.delivery.broker_url, asend)

    def publishing(self, message: Message, deadline: float, timeout: float) -> Steps[None]:
        """The steps of publishing ``message`` (see :meth:`publish`)."""
        yield from self.publish(functools.partial(self.publisher.send, message), deadline,
                                timeout, functools.partial(self.publisher.asend, message))

    def call_message(self, task_id: str, pool: str, events: list[Signal], timeout: float,
                     call_timeout: float | None, *, stream: bool = False,
                     reply: str | None = None, model: str | None = None) -> Message:
        """The message of a call (or transaction, or stream) of ``events`` on ``pool``
        (for ``model``, in a pool with ``max_models``), its reply published on the
        channel ``reply`` (see :mod:`..wire.replies`).

        Raises:
            UnknownPool: no such pool is configured.
            InvalidArgument: ``model`` is missing, refused or not a model id.
        """
        spec = self.configuration.spec(pool)
        now = time.time()
        call = CallMessage(pool, [event.to_wire() for event in events], now + timeout,
                           call_timeout, transaction=len(events) > 1, stream=stream,
                           reply=reply, sent=now,
                           model=pool_model(pool, spec.max_models, model))
        return self.publisher.message(CALL_TASK, task_id, call, spec.queue, spec.max_queued)

    def send(self, message: Message) -> None:
        """Publish ``message`` (blocking; see :class:`~.publisher.Publisher`)."""
        self.publisher.send(message)

    def read_reply(self, payload: bytes) -> list[dict[str, Any]] | None:
        """The replies a stored result carries, or ``None`` if it is not final yet.

        Raises:
            The error the call ended with: a contract error, as the worker raised it, or
            :class:`WorkerFailed` for anything else (a worker of an older version may
            still send a foreign exception back).
        """
        meta = self._backend.decode_result(payload)
        status = meta["status"]
        if status == states.SUCCESS:
            replies: list[dict[str, Any]] = meta["result"]
            return replies
        if status in states.EXCEPTION_STATES:
            error = meta["result"]
            if not isinstance(error, BaseException):  # not an exception Celery could rebuild
                error = WorkerFailed(f"the call ended in state {status}: {error!r}")
            raise WorkerFailed.wrapping(error)
        return None  # not final (a started state, say): keep waiting

    def silence(self, listener: ReplyListener, pool: str, timeout: float,
                window: float) -> BaseException:
        """The error for a call that heard nothing within ``window`` seconds."""
        outage = listener.outage()
        if outage is not None:
            return BrokerUnavailable(
                f"could not reach the result store {listener.url} for the reply within "
                f"{window:g}s: {type(outage).__name__}: {outage}", listener.url, window)
        spec = self.configuration.spec(pool)
        return no_reply(pool, timeout, window, spec.size, spec.max_overflow)

    def cast_steps(self, pool: str, signal: SignalLike, timeout: float | None,
                   call_timeout: float | None,
                   model: str | None = None) -> Steps[AsyncResult]:  # type: ignore[type-arg]
        """The steps of a cast: publishing only, retried while the broker is away.

        The cast is then kept for a while, to be sent again if a broker restart lost it
        (see :mod:`.resends`).
        """
        event = Signal.parse(signal)
        spec = self.configuration.spec(pool)
        deadline = None if timeout is None else time.time() + timeout
        bound = PUBLISH_TIMEOUT if timeout is None else timeout
        task_id = new_id()
        cast = CallMessage(pool, [event.to_wire()], deadline, call_timeout, sent=time.time(),
                           model=pool_model(pool, spec.max_models, model))
        message = functools.partial(self._cast_message, task_id, cast, spec)
        yield from self.publishing(message(0), time.monotonic() + bound, bound)
        listener = self.listener()  # this process's: its record of casts comes with it
        if self._sent_casts is not None and self._sent_casts.add(task_id, message):
            assert listener is not None
            listener.submit(self._sent_casts.sweep)
        return AsyncResult(task_id, app=self.app)

    def _cast_message(self, task_id: str, cast: CallMessage, spec: PoolSpec,
                      copy: int) -> Message:
        """Copy ``copy`` of a cast's message (``0``: as first sent, held to the pool's
        bound; a copy sent again was admitted once, and is not)."""
        message = self.publisher.message(CAST_TASK, task_id,
                                         dataclasses.replace(cast, copy=copy), spec.queue,
                                         spec.max_queued)
        return message if copy == 0 else message.again()

    def _send_again(self, messages: list[Message]) -> None:
        """Publish casts again (see :mod:`.resends`), on a publishing thread."""
        self.publisher.executor.submit(self._publish_all, messages)

    def _publish_all(self, messages: list[Message]) -> None:
        for message in messages:
            try:
                run_blocking(self.publish(functools.partial(self.publisher.send, message),
                                          time.monotonic() + PUBLISH_TIMEOUT,
                                          PUBLISH_TIMEOUT))
            except Exception:
                logger.warning("could not send cast %s again", message.task_id,
                               exc_info=True)

    def listener(self) -> ReplyListener | None:
        """This process's reply listener for the app's result store, or ``None``.

        Only a plain Redis result store has one. Others (``rpc://``, databases, files,
        Sentinel) keep Celery's own way of waiting, one waiting thread per call.
        """
        pid = os.getpid()
        if self._listener_pid != pid:  # looked up once per process: it is on every call
            listener = ReplyListener.for_backend(self.app.backend, self.app.conf.broker_url)
            self._sent_casts = None
            if listener is not None and loses_popped_messages(self.app):
                # It watches for outages: casts lost in one go again.
                self._sent_casts = SentCasts(self._send_again)
                listener.after_outage(self._sent_casts.check)
            self._listener, self._listener_pid = listener, pid
        return self._listener

    def result_key(self, task_id: str) -> bytes:
        """The key (and channel) of the stored result of ``task_id``."""
        return self._backend.get_key_for_task(task_id)  # type: ignore[no-any-return]
