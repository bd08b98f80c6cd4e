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
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

__all__ = ["pool_queue", "route"]


def pool_queue(app: Any, name: str) -> Queue:
    """The declaration of the pool queue ``name`` for ``app`` (``app``'s queues untouched)."""
    queues = app.amqp.queues
    defined = dict.get(queues, name)  # dict's own get: Queues would create a missing one
    if defined is not None:
        return defined  # type: ignore[no-any-return]
    queue: Queue = queues.new_missing(name)
    # What Queues.__setitem__ applies to every queue it holds.
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
