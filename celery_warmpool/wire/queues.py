"""The pool queues: declared by the package itself, whatever the app's queue settings say.

Each pool's calls go to its own queue (``PoolSpec.queue``, ``warmpool.<pool>`` by
default). The package declares it and routes its own messages to it without asking the
app: Celery's ``task_create_missing_queues = False`` would refuse a queue missing from
``task_queues``, and ``task_routes`` could send the package's messages elsewhere. Nor is
the queue added to the app's queues (``app.amqp.queues``): the app holds what its user
configured, and Celery's own consumer never sees a pool queue.

A queue the app defines itself in ``task_queues`` under the pool queue's name is used as
defined (its exchange, its arguments: a quorum queue, say). Otherwise the queue is made as
Celery makes a missing queue (``Queues.new_missing``: its type and exchange type from
``task_create_missing_queue_type`` and ``task_create_missing_queue_exchange_type``), so a
queue declared before by either way is declared the same again.

A pool with ``max_queued`` on RabbitMQ has its queue declared with the bound as queue
arguments, ``x-max-length`` and ``x-overflow: reject-publish``: the broker itself then
refuses (nacks) a publish past the bound, and the publisher learns it through its
confirm. The caller and the worker declare the queue with the same arguments
(:func:`pool_queue`), or RabbitMQ would refuse the second declaration. Queue arguments
cannot change once a queue exists: a bound set, changed or removed on a queue that
exists means deleting the queue first (``rabbitmqctl delete_queue warmpool.NAME``, once
it is drained), which :func:`inequivalent` says when RabbitMQ refuses. On Redis nothing
is declared: the bound is checked as each call is pushed (see
:mod:`celery_warmpool.client.admission`).

:func:`queue_length` counts the calls waiting in the broker: on Redis every list of the
queue (a priority queue is several), on RabbitMQ its ready messages (those a node took,
reserved or running, are counted by the nodes: see :mod:`.backlog`).
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from kombu import Queue

__all__ = ["OVERFLOW", "bound_arguments", "inequivalent", "is_amqp", "is_redis", "pool_queue",
           "queue_length", "route"]

#: What RabbitMQ does with a publish past ``x-max-length``: refuse it (a nack).
OVERFLOW: Final = "reject-publish"


def pool_queue(app: Any, name: str, max_queued: int | None = None) -> Queue:
    """The declaration of the pool queue ``name`` for ``app`` (``app``'s queues untouched),
    with the bound's arguments on RabbitMQ when the pool has ``max_queued``.

    Both sides call this, so that they declare the queue alike.
    """
    queues = app.amqp.queues
    defined = dict.get(queues, name)  # dict's own get: Queues would create a missing one
    queue: Queue = defined if defined is not None else _as_missing(queues, name)
    wanted = bound_arguments(max_queued) if is_amqp(app) else {}
    given = dict(queue.queue_arguments or {})
    if all(given.get(key) == value for key, value in wanted.items()):
        return queue
    return Queue(**{**queue.as_dict(), "queue_arguments": {**given, **wanted}})


def _as_missing(queues: Any, name: str) -> Queue:
    """The queue ``name`` as Celery makes a missing one (``Queues.new_missing``), with what
    ``Queues.__setitem__`` applies to every queue it holds."""
    queue: Queue = queues.new_missing(name)
    if queues.default_exchange and not queue.exchange:
        queue.exchange = queues.default_exchange
    if queues.max_priority is not None:
        queue.queue_arguments = {"x-max-priority": queues.max_priority,
                                 **(queue.queue_arguments or {})}
    return queue


def route(queue: Queue) -> dict[str, Any]:
    """The publishing options that send a task message to ``queue``, whatever the app's
    ``task_routes`` say (an exchange or routing key given here wins over theirs)."""
    if queue.exchange is None or queue.exchange.type == "direct":
        # The default exchange delivers by queue name, as Celery sends to a direct queue.
        return {"queue": queue, "exchange": "", "routing_key": queue.name}
    return {"queue": queue, "exchange": queue.exchange.name,
            "routing_key": queue.routing_key or queue.name}


def is_amqp(app: Any) -> bool:
    """Whether ``app``'s broker is RabbitMQ (an AMQP transport), read without connecting."""
    return _driver_type(app) == "amqp"


def is_redis(app: Any) -> bool:
    """Whether ``app``'s broker is Redis, read without connecting."""
    return _driver_type(app) == "redis"


def _driver_type(app: Any) -> str:
    """The kind of ``app``'s broker transport (read once per app; nothing connects)."""
    found = _driver_types.get(app)
    if found is None:
        connection = app.connection_for_write()
        try:
            found = _driver_types[app] = str(connection.transport.driver_type)
        finally:
            connection.release()
    return found


_driver_types: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def bound_arguments(max_queued: int | None) -> dict[str, Any]:
    """The RabbitMQ queue arguments of a pool bounded at ``max_queued`` (none without)."""
    if max_queued is None:
        return {}
    return {"x-max-length": max_queued, "x-overflow": OVERFLOW}


def queue_length(connection: Any, name: str) -> int:
    """The calls waiting in the broker in queue ``name``, read on a channel of its own of
    ``connection`` (a kombu connection)."""
    channel = connection.channel()
    try:
        if connection.transport.driver_type != "amqp":
            # kombu's virtual transports count every list of a priority queue.
            return int(channel._size(name))
        from amqp.exceptions import NotFound

        try:
            return int(channel.queue_declare(queue=name, passive=True).message_count)
        except NotFound:  # not declared yet: nothing waits (and the channel is closed)
            return 0
    finally:
        channel.close()


def inequivalent(name: str, max_queued: int | None) -> str:
    """What to tell when RabbitMQ refuses queue ``name``'s arguments (it exists with others)."""
    wanted = "with x-max-length" if max_queued is not None else "without a bound"
    return (f"the queue {name!r} exists on RabbitMQ with other arguments than this "
            f"pool's (max_queued={max_queued}: {wanted}). Queue arguments cannot change: "
            f"drain the queue and delete it (rabbitmqctl delete_queue {name}), then start "
            "the workers again")
