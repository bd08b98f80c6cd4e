"""Each pool's queue gets a consumer of its own, so a node reserves work per pool.

Celery's prefetch bounds a whole node; a warm pool needs a bound of its own. This
consumer step keeps the pool queues away from Celery's task consumer and consumes each
one on a channel of its own whose prefetch window is twice the pool's capacity on this
node, so that for every pool: at most ``capacity`` calls run, and at most ``capacity``
more wait reserved here while other nodes may be idle. (A pool whose agents take
batches reserves ``max_batch_size`` times as much; a pool held to ``max_queued`` on
RabbitMQ reserves nothing beyond what it runs, as RabbitMQ's bound counts only what it
has not delivered: see :mod:`celery_warmpool.client.admission`.) Messages go to Celery's own task
handler, so they get its acks, time limits, revokes, events and ``inspect`` entries.

The window is kept right (every half second, and at once when capacity changes):

- **capacity** is the node's number of prefork children (it follows ``--autoscale`` and
  resizes), or the pool's agents (size + overflow) in one process elsewhere;
- **after a broker reconnection** work taken on the lost channel still runs: it is
  counted against the new window until it ends, and under prefork, Redis messages that
  the lost channel could not put back are put back (see :mod:`.broker_workarounds`);
- a broker that applies a prefetch change only to new consumers (RabbitMQ 4, quorum
  queues) gets an extra consumer for added room, cancelled consumers for less.

Tasks with an ETA or countdown hold a place in their pool's window until they run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqp.exceptions import PreconditionFailed
from celery import bootsteps
from celery.worker import state as worker_state
from kombu import Consumer
from kombu.common import ignore_errors

from ..wire.queues import inequivalent, pool_queue
from .batches import PoolBatches
from .broker_workarounds import (
    keep_partial_result_reads,
    keep_unrecorded_messages,
    pin_redis_connection_params,
    reconnect_sooner,
    requeue_unrecorded,
    restore_orphans,
    restore_prefetch_on_loop,
)
from .prefork import replace_dead_children

if TYPE_CHECKING:
    from ..core.spec import PoolSpec
    from .backlog import NodeBacklog
    from .runtime import WorkerRuntime

__all__ = ["PoolConsumers", "PoolQueue"]

logger = logging.getLogger(__name__)

#: Seconds between two looks at every pool's window.
RECONCILE_INTERVAL = 0.5


class PoolQueue:
    """One hosted pool's queue on this node: its channel, its consumers, its window."""

    def __init__(self, spec: PoolSpec, batch_size: int) -> None:
        self.spec = spec
        self.name = spec.queue
        #: Calls of the pool this node runs at once (see PoolConsumers.capacity).
        self.capacity = 1
        #: How many messages one agent takes at once: 1, or the largest batch.
        self.batch_size = batch_size
        self.channel: Any = None
        self.bound: Any = None
        #: The consumers on the channel and the prefetch each was given.
        self.slots: list[tuple[Consumer, int]] = []
        self.prefetch: int | None = None
        self.paused = False
        #: Taking no new messages (a drain): running and reserved work still ends.
        self.draining = False
        self.batches: PoolBatches | None = None
        #: Whether the node reserves as much again as it runs. Not for a pool held to
        #: max_queued on RabbitMQ, which counts only the messages it has not delivered
        #: (see celery_warmpool.client.admission).
        self.reserves = True

    @property
    def window(self) -> int:
        """The most messages of this pool the node may hold: running and reserved."""
        room = 2 if self.reserves else 1
        return 0 if self.draining else room * self.capacity * self.batch_size


class PoolConsumers(bootsteps.StartStopStep):
    """The consumer step that consumes every hosted pool's queue (see the module)."""

    label = "WarmPoolConsumers"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime: WorkerRuntime = c.app.warmpool.runtime
        self.consumer = c
        self.queues = {spec.queue: PoolQueue(spec, spec.agent.largest_batch())
                       for spec in self.runtime.process_specs.values()}
        for queue in self.queues.values():
            if queue.batch_size > 1:
                queue.batches = PoolBatches(self.runtime, queue.spec,
                                            functools.partial(self.capacity, queue))
        self.generation = 0
        self.loop_ready = False
        self._handler: Callable[[Any], None] | None = None
        self._timer: Any = None
        self._replacer: Any = None
        self._old_channels: list[tuple[PoolQueue, Any]] = []
        if self.queues:
            # After -Q/-X were applied: this wins over both.
            c.app.amqp.queues.deselect(list(self.queues))
            self._refuse_add_consumer(c)
            reconnect_sooner(c)
        self.runtime.consumers = self

    # -- the step's life cycle, once per (re)connection ---------------------------------

    def start(self, c: Any) -> None:
        """Open a channel per pool queue on the new connection (consuming starts later)."""
        if not self.queues:
            return
        self.generation += 1
        self.consumer = c
        for name in self.queues:
            # Tasks.start built Celery's consumer from its queues; it consumes only
            # once the event loop runs, so removing ours here loses nothing.
            if name in getattr(c.task_consumer, "_queues", {}):
                c.task_consumer.cancel_by_queue(name)
        self._handler = self._watched(c.create_task_handler())
        self.apply_global = not c.connection.qos_semantics_matches_spec
        forced = c.app.conf.get("warmpool_qos_global")
        if forced is not None:
            self.apply_global = bool(forced)
        # A broker that applies basic.qos per consumer takes a change only for
        # consumers started afterwards: room is added and taken as consumers.
        self.per_consumer = (c.connection.transport.driver_type == "amqp"
                             and not self.apply_global)
        self.loop_ready = False
        driver = c.connection.transport.driver_type
        for queue in self.queues.values():
            queue.reserves = queue.spec.max_queued is None or driver != "amqp"
            self._open(c, queue)
        pin_redis_connection_params([c.connection.default_channel,
                                     *(queue.channel for queue in self.queues.values())])
        for queue in self.queues.values():
            keep_unrecorded_messages(queue.channel)
        if self.runtime.execution is not None and not self.runtime.execution.in_children:
            restore_prefetch_on_loop(c)
        if self.generation > 1:
            self._requeue_unrecorded()
            self._restore_orphans(c)
        self._old_channels = []
        # Timers made while the consumer starts are cancelled at every reconnection:
        # make it anew each time.
        self._timer = c.timer.call_repeatedly(RECONCILE_INTERVAL, self.reconcile_all)
        if self.runtime.execution is not None and self.runtime.execution.in_children:
            self._replacer = replace_dead_children(c)
            if c.hub is not None:
                keep_partial_result_reads(c.hub, getattr(c.pool, "_pool", None))
        if c.hub is None:
            self.register_with_event_loop(c, None)

    def register_with_event_loop(self, c: Any, hub: Any) -> None:
        """Start consuming: the execution pool is registered with the loop by now.

        (Consuming in :meth:`start` let a message reach a prefork pool that could not take
        it yet, and the worker died.)
        """
        self.loop_ready = True
        self.reconcile_all()

    def stop(self, c: Any) -> None:
        """Stop consuming (warm shutdown, and every reconnection); keep held work."""
        self.loop_ready = False
        for timer in (self._timer, self._replacer):
            if timer is not None:
                timer.cancel()
        self._timer = self._replacer = None
        self._old_channels = []
        for queue in self.queues.values():
            for slot, _ in queue.slots:
                ignore_errors(c, slot.cancel)
            queue.slots = []
            if queue.batches is not None:
                queue.batches.stop(self._discards_unaccepted(c))
            if queue.channel is not None:
                self._old_channels.append((queue, queue.channel))

    def shutdown(self, c: Any) -> None:
        """Close the channels: messages reserved but not started go back to the broker."""
        self.stop(c)
        for queue, channel in self._old_channels:
            ignore_errors(c, channel.close)
            queue.channel = None
        self._old_channels = []

    # -- capacity and the window ---------------------------------------------------------

    def capacity(self, queue: PoolQueue) -> int:
        """How many calls of ``queue``'s pool this node runs at once, now."""
        execution = self.runtime.execution
        assert execution is not None
        spec = self.runtime.process_specs.get(queue.spec.name, queue.spec)
        processes = int(getattr(self.consumer.pool, "num_processes", None) or 1)
        return execution.pool_capacity(spec, processes)

    def reconcile_all(self) -> None:
        """Bring every pool's window up to date (event-loop thread only)."""
        for queue in self.queues.values():
            try:
                queue.capacity = self.capacity(queue)
                self._reconcile(queue)
            except Exception:
                logger.exception("pool queue %s: could not update its window", queue.name)
        self.runtime.backlog.measure()

    def queue_of(self, pool: str) -> PoolQueue | None:
        """The queue of ``pool`` on this node, if it hosts it."""
        for queue in self.queues.values():
            if queue.spec.name == pool:
                return queue
        return None

    def capacities(self) -> dict[str, int]:
        """Per pool: the calls this node runs at once, now."""
        return {queue.spec.name: queue.capacity for queue in self.queues.values()}

    def reservations(self) -> dict[str, tuple[int, int]]:
        """Per pool: the messages of its queue this node holds, and its window."""
        return {queue.spec.name: (len(self.held(queue)), queue.window)
                for queue in self.queues.values()}

    def held(self, queue: PoolQueue) -> list[tuple[Any, Any]]:
        """``(channel, consumer tag)`` of every message of ``queue`` this node holds."""
        held = queue.batches.held() if queue.batches is not None else []
        for request in self.requests_of(queue):
            message = request.message
            held.append((message.channel, message.delivery_info.get("consumer_tag")))
        return held

    @staticmethod
    def requests_of(queue: PoolQueue) -> list[Any]:
        """Celery's requests of ``queue``'s messages on this node (reserved, running,
        scheduled), batches aside."""
        requests = (set(worker_state.active_requests) | set(worker_state.reserved_requests)
                    | set(getattr(worker_state, "scheduled_requests", ())))
        return [request for request in requests
                if (request.message.delivery_info or {}).get("routing_key") == queue.name]

    def _foreign(self, queue: PoolQueue, tags: set[Any] | None) -> int:
        """Held messages the current consumers' prefetch does not count."""
        return sum(1 for channel, tag in self.held(queue)
                   if channel is not queue.channel or (tags is not None and tag not in tags))

    def _reconcile(self, queue: PoolQueue) -> None:
        if queue.channel is None or not self.loop_ready:
            return
        if self.per_consumer:
            self._reconcile_slots(queue)
        else:
            self._reconcile_live(queue)

    def _reconcile_live(self, queue: PoolQueue) -> None:
        """A broker that applies a prefetch change at once (Redis, RabbitMQ 3.x global)."""
        room = queue.window - self._foreign(queue, None)
        if room <= 0:
            if not queue.paused:
                self._cancel_slots(queue)
                # Never 0: a prefetch of 0 means "no limit".
                queue.channel.basic_qos(0, 1, self.apply_global)
                queue.prefetch, queue.paused = 1, True
            return
        if queue.prefetch != room:
            queue.channel.basic_qos(0, room, self.apply_global)
            queue.prefetch = room
            queue.slots = [(slot, room) for slot, _ in queue.slots]
        if not queue.slots:
            self._add_slot(queue, room)
        queue.paused = False

    def _reconcile_slots(self, queue: PoolQueue) -> None:
        """A broker that applies a prefetch only to consumers started afterwards."""
        while queue.slots and self._committed(queue) > queue.window:
            slot, _ = queue.slots.pop()
            ignore_errors(self.consumer, slot.cancel)
        self._merge_idle_slots(queue)
        room = queue.window - self._committed(queue)
        if room > 0:
            queue.channel.basic_qos(0, room, False)  # for the next consumer only
            self._add_slot(queue, room)
        queue.paused = not queue.slots

    def _committed(self, queue: PoolQueue) -> int:
        tags = {_tag(slot, queue) for slot, _ in queue.slots}
        return sum(prefetch for _, prefetch in queue.slots) + self._foreign(queue, tags)

    def _merge_idle_slots(self, queue: PoolQueue) -> None:
        # Slots that hold nothing any more are cancelled, so that one consumer with the
        # whole room replaces several small ones.
        if len(queue.slots) < 2:
            return
        busy = {tag for _, tag in self.held(queue)}
        idle = [(slot, prefetch) for slot, prefetch in queue.slots
                if _tag(slot, queue) not in busy]
        if len(idle) > 1:
            for slot, prefetch in idle:
                ignore_errors(self.consumer, slot.cancel)
                queue.slots.remove((slot, prefetch))

    def _add_slot(self, queue: PoolQueue, prefetch: int) -> None:
        on_message = (queue.batches.on_message if queue.batches is not None
                      else self._handler)
        if on_message is not None and queue.spec.max_queued is not None and queue.reserves:
            # Redis: the admission script reads the reserved calls off the board, so
            # a message taken is told at once (see .backlog).
            on_message = functools.partial(_taken, on_message, queue, self.runtime.backlog)
        slot = Consumer(queue.channel, queues=[queue.bound], auto_declare=False,
                        accept=self.consumer.app.conf.accept_content, on_message=on_message,
                        on_decode_error=self.consumer.on_decode_error,
                        tag_prefix=f"warmpool-{os.getpid()}-")
        slot.consume()
        queue.slots.append((slot, prefetch))

    def _cancel_slots(self, queue: PoolQueue) -> None:
        for slot, _ in queue.slots:
            ignore_errors(self.consumer, slot.cancel)
        queue.slots = []

    # -- channels ------------------------------------------------------------------------

    def _open(self, c: Any, queue: PoolQueue) -> None:
        queue.channel = c.connection.channel()
        # Declared by the package, whatever the app's queue settings (and not added to
        # them): see celery_warmpool.wire.queues.
        declared = pool_queue(c.app, queue.name, queue.spec.max_queued)
        queue.bound = declared(queue.channel)
        try:
            queue.bound.declare()
        except PreconditionFailed as exc:
            # The queue exists with other arguments (a bound set or changed since): serve
            # it as it is, and say how to make it the pool's.
            logger.error("warm pools: pool %r: %s (%s); serving the queue as it is",
                         queue.spec.name, inequivalent(queue.name, queue.spec.max_queued),
                         exc)
            queue.channel = c.connection.channel()
            queue.bound = declared(queue.channel)
            queue.bound.queue_declare(passive=True)
        queue.slots, queue.prefetch, queue.paused = [], None, False
        if queue.batches is not None:
            queue.batches.start(c, queue.channel, self._handler)

    def _watched(self, handler: Callable[[Any], None]) -> Callable[[Any], None]:
        """``handler``, and then the node looks for calls that outwait their deadline
        while any waits (see :mod:`.late_calls`)."""
        late_calls = self.runtime.late_calls
        if late_calls is None:
            return handler

        def on_message(message: Any) -> None:
            handler(message)
            late_calls.watch()

        return on_message

    def _discards_unaccepted(self, c: Any) -> bool:
        # A prefork pool drops work not yet given to a child when the connection is lost.
        return bool(self.runtime.execution and self.runtime.execution.in_children)

    def _requeue_unrecorded(self) -> None:
        requeued = sum(requeue_unrecorded(old, queue.channel)
                       for queue, old in self._old_channels)
        if requeued:
            logger.warning("warm pools: put back %d messages taken just as the broker went "
                           "away", requeued)

    def _restore_orphans(self, c: Any) -> None:
        if c.connection.transport.driver_type != "redis" or not self._discards_unaccepted(c):
            # Elsewhere queued work still runs after a reconnection and acks through its
            # old channel: putting it back would run it twice.
            return
        keep = {(id(request.message.channel), request.message.delivery_tag)
                for request in list(worker_state.active_requests)}
        for queue in self.queues.values():
            if queue.batches is not None:
                keep |= queue.batches.running()
        restored = sum(restore_orphans(old, queue.channel, keep)
                       for queue, old in self._old_channels)
        if restored:
            logger.warning("warm pools: put back %d messages the lost broker connection "
                           "held and no process will run", restored)

    def _refuse_add_consumer(self, c: Any) -> None:
        # The add_consumer command would make Celery's own consumer take a pool queue
        # too, outside its window.
        names = set(self.queues)
        original = c.add_task_queue

        def add_task_queue(queue: str, *args: Any, **kwargs: Any) -> Any:
            if queue in names:
                logger.warning("warm pools: not adding a consumer for %r: it is a pool "
                               "queue, consumed with its own bound", queue)
                return None
            return original(queue, *args, **kwargs)

        c.add_task_queue = add_task_queue


def _taken(handler: Callable[[Any], None], queue: PoolQueue, backlog: NodeBacklog,
           message: Any) -> None:
    handler(message)
    backlog.taken(queue)


def _tag(slot: Consumer, queue: PoolQueue) -> Any:
    """The consumer tag ``slot`` consumes ``queue`` with (kombu keeps it per queue)."""
    tags: dict[str, Any] = getattr(slot, "_active_tags", {})
    return tags.get(queue.name)
