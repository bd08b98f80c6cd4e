"""Publishing pool calls: task messages built by Celery, sent by the package itself.

A call's message is made by Celery's own ``app.amqp`` (so workers, monitors and Flower see
an ordinary task) but without ``apply_async``'s per-thread result machinery: the reply
comes through the process's :class:`~.listener.ReplyListener`. On a Redis broker it is
pushed directly, as kombu would write it (:mod:`.pushes`); elsewhere it goes through the
package's own few producers (:class:`~celery_warmpool.wire.scoped.Producers`: with
publisher confirms on RabbitMQ), whatever the number of calling threads, to the pool's
queue as the package declares it (:mod:`celery_warmpool.wire.queues`). Coroutines put
their messages in the process's :class:`~.outbox.Outbox`, sent together by one thread. A
call to a pool with ``max_queued`` is held to it as it is published (see
:mod:`.admission`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kombu.entity import maybe_delivery_mode
from kombu.pools import ProducerPool

from ..wire.marks import loses_popped_messages as is_redis
from ..wire.message import CallMessage
from ..wire.queues import pool_queue, route
from ..wire.scoped import PUBLISH_CONNECTIONS, scoped
from .admission import AdmittingProducer, Bound, Refusals, armed
from .outbox import Outbox
from .pushes import RedisPushes

__all__ = ["Message", "Publisher"]

#: Threads that publish for coroutines.
PUBLISH_THREADS = 2


@dataclass(frozen=True, slots=True)
class Message:
    """A task message ready to send."""

    task_id: str
    name: str
    body: Any
    options: dict[str, Any]
    #: The bound of the pool it goes to (see :mod:`.admission`).
    bound: Bound | None = None

    def again(self) -> Message:
        """This message sent again after an outage: admitted once, not checked again."""
        if self.bound is None:
            return self
        return dataclasses.replace(self, bound=self.bound._replace(checked=False),
                                   options=dict(self.options))


class Publisher:
    """Builds and sends the task messages of pool calls for ``app`` (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._routes: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._declared: set[str] = set()
        self._pid = os.getpid()
        self._pool: ProducerPool | None = None
        self._pool_pid = 0
        self.refusals = Refusals(app)
        self.outbox = Outbox(self.send_many)

    def message(self, name: str, task_id: str, call: CallMessage, queue: str,
                max_queued: int | None = None) -> Message:
        """The message that runs task ``name`` (a call's or a cast's) with ``call`` on
        ``queue``, held to ``max_queued`` (the pool's bound, if it has one)."""
        body = self.app.amqp.create_task_message(
            task_id, name, call.to_args(), {}, argsrepr=call.argsrepr(), kwargsrepr="{}",
            reply_to=self.app.oid, create_sent_event=self._sent_events)
        return Message(task_id, name, body, self._route(name, queue, max_queued),
                       Bound(call.pool, queue, max_queued))

    @functools.cached_property
    def _sent_events(self) -> bool:
        # Read once, on first use (the app is configured by then), not on every call.
        return bool(self.app.conf.task_send_sent_event)

    def send(self, message: Message) -> None:
        """Publish ``message`` (blocking): pushed on a Redis broker, else with one of the
        package's own producers.

        Raises:
            PoolBusy: its pool is at its bound (see :mod:`.admission`); it was not sent.
        """
        if self._pushes is not None:
            self._pushes.push(message)
            return
        options = message.options
        queue = options.get("queue")
        if queue is not None and queue.name in self._declared:
            # Kombu would bind copies of the queue and exchange on every publish only to
            # find them declared: once per process is enough (queues are durable).
            options["declare"] = []
        with self.producer(message.bound) as producer:
            # Kombu's own retry off: the caller's deadline decides how long to try (see
            # celery_warmpool.wire.outages).
            self.app.amqp.send_task_message(producer, message.name, message.body,
                                            retry=False, **options)
        if queue is not None:
            self._declared.add(queue.name)

    def send_many(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish ``messages``: each one's outcome, ``None`` or the error that refused or
        failed it (on Redis one pipeline; raising means none is known to be sent)."""
        if self._pushes is not None:
            return self._pushes.push_many(messages)
        outcomes: list[BaseException | None] = []
        for message in messages:
            try:
                self.send(message)
            except Exception as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    async def asend(self, message: Message) -> None:
        """:meth:`send`, awaited: with the outbox's next round (see :mod:`.outbox`)."""
        await self.outbox.send(message)

    @functools.cached_property
    def _pushes(self) -> RedisPushes | None:
        """The direct pushes to a Redis broker, where they write what kombu would: JSON
        messages with no compression and no task-sent event (else ``None``: kombu)."""
        conf = self.app.conf
        if (conf.task_serializer != "json" or conf.task_compression
                or self._sent_events or not is_redis(self.app)):
            return None
        return RedisPushes(self.app)

    @contextlib.contextmanager
    def producer(self, bound: Bound | None) -> Iterator[Any]:
        """A producer of this process's pool, its publishes held to ``bound``.

        Raises:
            PoolBusy: a publish in the ``with`` block was refused at the bound.
        """
        if bound is None:
            with self._producers().acquire(block=True) as producer:
                yield producer
            return
        with (self._producers().acquire(block=True) as producer,
              armed(producer, bound, self.refusals) as admission):
            yield producer
        # Raised once the producer is back in the pool, its connection kept.
        if admission.refused is not None:
            raise admission.refused

    def _producers(self) -> ProducerPool:
        """This process's producers for pool calls (made anew in a forked child)."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool_pid = os.getpid()
                self._pool = ProducerPool(scoped(self.app).producers.connections(),
                                          limit=PUBLISH_CONNECTIONS,
                                          Producer=AdmittingProducer)
            return self._pool

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The threads that publish for coroutines (made anew in a forked child)."""
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._executor = ThreadPoolExecutor(
                    PUBLISH_THREADS, thread_name_prefix="warmpool-publish")
            return self._executor

    def _route(self, name: str, queue: str, max_queued: int | None) -> dict[str, Any]:
        # Routing is the same for every call of a pool: worked out once. A copy per
        # message, since sending adds to it. The queue as the workers declare it (with
        # the bound's arguments on RabbitMQ).
        options = self._routes.get((name, queue))
        if options is None:
            declared = pool_queue(self.app, queue, max_queued)
            options = self._routes[(name, queue)] = {
                **route(declared), "delivery_mode": maybe_delivery_mode(
                    getattr(declared.exchange, "delivery_mode", None)
                    or self.app.conf.task_default_delivery_mode)}
        return dict(options)
