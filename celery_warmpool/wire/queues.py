"""A pool's queue as both sides declare it, and how many calls wait in it.

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

from typing import Any, Final

from kombu import Queue

__all__ = ["OVERFLOW", "bound_arguments", "inequivalent", "is_amqp", "pool_queue",
           "queue_length"]

#: What RabbitMQ does with a publish past ``x-max-length``: refuse it (a nack).
OVERFLOW: Final = "reject-publish"


def is_amqp(app: Any) -> bool:
    """Whether ``app``'s broker is RabbitMQ (an AMQP transport), read without connecting."""
    connection = app.connection_for_write()
    try:
        return bool(connection.transport.driver_type == "amqp")
    finally:
        connection.release()


def bound_arguments(max_queued: int | None) -> dict[str, Any]:
    """The RabbitMQ queue arguments of a pool bounded at ``max_queued`` (none without)."""
    if max_queued is None:
        return {}
    return {"x-max-length": max_queued, "x-overflow": OVERFLOW}


def pool_queue(app: Any, name: str, max_queued: int | None) -> Queue:
    """The queue ``name`` of a pool as ``app`` declares it, registered in its queues.

    It is Celery's own queue of that name (as ``task_create_missing_queues`` makes it,
    or as the user configured it), with the bound's arguments added on RabbitMQ. Both
    sides call this, so that they declare the queue alike.
    """
    queues = app.amqp.queues
    queue: Queue = queues[name]
    wanted = bound_arguments(max_queued) if is_amqp(app) else {}
    given = dict(queue.queue_arguments or {})
    if all(given.get(key) == value for key, value in wanted.items()):
        return queue
    bounded: Queue = Queue(**{**queue.as_dict(), "queue_arguments": {**given, **wanted}})
    queues[name] = bounded
    return bounded


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
