"""Workarounds for kombu and Celery bugs that bite a worker when its broker restarts.

Each was found by restarting a real broker under load, and each says when it can go.
The per-pool consumers (:mod:`.consumers`) apply them on every (re)connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterable
from types import GeneratorType
from typing import Any

__all__ = ["keep_partial_result_reads", "keep_unrecorded_messages",
           "pin_redis_connection_params", "reconnect_sooner", "requeue_unrecorded",
           "restore_orphans", "restore_prefetch_on_loop"]

logger = logging.getLogger(__name__)


def pin_redis_connection_params(channels: Iterable[Any]) -> None:
    """Let kombu's Redis channels close cleanly after their connection was torn down.

    When a Redis broker goes away, Celery's consumer collects the connection, which
    detaches its transport (``transport.client = None``), then closes the connection,
    which closes the default channel a second time: that close puts unacknowledged
    messages back and needs the connection's parameters, and dies with
    ``AttributeError: 'NoneType' object has no attribute 'hostname'``, which Celery
    takes as an unrecoverable error and the worker exits (kombu 5.7.0: ``Channel.close``
    -> ``restore_unacked`` -> ``_connparams``). Measured: 14 exits in 40 restarts of a
    threads worker without this, 0 in 30 with it. It keeps each channel's parameters,
    read while the connection was alive, for that late close. Drop it once kombu closes
    a detached channel without them.
    """
    try:
        from kombu.transport.redis import Channel as RedisChannel
    except ImportError:  # no redis client installed: no Redis channels either
        return
    for channel in channels:
        if isinstance(channel, RedisChannel) and "_connparams" not in vars(channel):
            _pin(channel)


def _pin(channel: Any) -> None:
    original = channel._connparams
    saved = {asynchronous: original(asynchronous=asynchronous) for asynchronous in (False, True)}

    def connection_params(asynchronous: bool = False) -> Any:
        transport = channel.connection
        if transport is None or transport.client is None:
            return dict(saved[bool(asynchronous)])
        return original(asynchronous=asynchronous)

    close = channel.close

    def close_once_detached() -> Any:
        detached = channel.connection is None or channel.connection.client is None
        try:
            return close()
        finally:
            if detached:
                # A pool built from the saved parameters during that late close must
                # not outlive the dead channel.
                with contextlib.suppress(Exception):
                    channel._disconnect_pools()

    channel._connparams = connection_params
    channel.close = close_once_detached


def keep_unrecorded_messages(channel: Any) -> None:
    """Keep the messages a Redis channel took but could not record as unacknowledged.

    kombu's Redis transport pops a message (``BRPOP``), then records it in the
    ``unacked`` hash. When the server is shutting down, the pop can succeed and the record
    fail: the message then exists only in this process, and kombu drops it (seen in the
    broker's append-only file: pushed, popped, never recorded; about one message in
    every few restarts under load). This keeps such a message so that
    :func:`requeue_unrecorded` puts it back once the broker is back.
    """
    qos = getattr(channel, "qos", None)
    if qos is None or not hasattr(qos, "unacked_key") or "append" in vars(qos):
        return
    append = qos.append
    unrecorded: list[Any] = []
    errors = getattr(channel, "connection_errors", ())

    def append_or_keep(message: Any, delivery_tag: Any) -> Any:
        try:
            return append(message, delivery_tag)
        except errors:
            unrecorded.append(message)
            raise

    qos.append = append_or_keep
    channel._warmpool_unrecorded = unrecorded


def requeue_unrecorded(old_channel: Any, new_channel: Any) -> int:
    """Put the messages :func:`keep_unrecorded_messages` kept back at the head of their
    queue, through ``new_channel``; return how many."""
    unrecorded: list[Any] = getattr(old_channel, "_warmpool_unrecorded", [])
    requeued = 0
    while unrecorded:
        message = unrecorded.pop(0)
        delivery = message.delivery_info
        new_channel._do_restore_message(message._raw, delivery["exchange"],
                                        delivery["routing_key"], new_channel.client)
        requeued += 1
    return requeued


def restore_orphans(old_channel: Any, new_channel: Any, keep: set[tuple[int, Any]]) -> int:
    """Put back the messages a lost Redis channel still holds and nobody will run.

    When the Redis broker is down, closing the lost channel cannot put its unacknowledged
    messages back, so they sit in Redis's ``unacked`` hash until the visibility timeout
    (an hour by default) while their callers time out. After the reconnection, every
    message of ``old_channel`` that is not in ``keep`` (``(id(channel), delivery tag)`` of
    work still running or queued here) goes back to the head of its queue through
    ``new_channel``. A message acknowledged meanwhile is left alone (kombu's restore
    watches the hash). Returns how many were put back.
    """
    old_qos = getattr(old_channel, "qos", None)
    new_qos: Any = getattr(new_channel, "qos", None)
    if old_qos is None or not hasattr(new_qos, "restore_by_tag"):
        return 0
    restored = 0
    delivered = old_qos._delivered
    for tag in [tag for tag in list(delivered) if tag not in old_qos._dirty]:
        if (id(old_channel), tag) in keep:
            continue
        new_qos.restore_by_tag(tag)
        delivered.pop(tag, None)  # or the old channel's finalizer restores it again
        restored += 1
    return restored


def restore_prefetch_on_loop(consumer: Any) -> None:
    """Keep Celery from sending ``basic.qos`` from a threads pool's worker thread.

    After a reconnection Celery 5.7 restores its prefetch count from whichever thread
    completes a task, and under ``-P threads`` on RabbitMQ that synchronous ``basic.qos``
    races the event loop's reads on the same socket: the worker stalled for 20 to 40 s
    after 4 of 5 reconnections. This runs the restore on the event loop instead. Drop it
    once Celery does so itself.
    """
    restore = getattr(consumer, "_restore_prefetch_count_after_connection_restart", None)
    if restore is None or consumer.hub is None or getattr(consumer, "_warmpool_marshalled",
                                                          False):
        return
    main = threading.main_thread()

    def on_loop(*args: Any) -> Any:
        if threading.current_thread() is main:
            return restore(*args)
        consumer.hub.call_soon(restore, *args)
        return None

    consumer._restore_prefetch_count_after_connection_restart = on_loop
    consumer._warmpool_marshalled = True


#: Seconds between a worker's tries to reach its broker again: first, step, longest.
RECONNECT_FIRST, RECONNECT_STEP, RECONNECT_MOST = 0.5, 0.5, 2.0


def reconnect_sooner(consumer: Any) -> None:
    """Have the worker try its lost broker every 0.5 s (at most 2 s apart), not 2, 6, 12...

    Celery reconnects with kombu's default back-off (2 s, then 2 s more each try, up to
    30 s) and has no setting for it, so a broker down for 3 s cost a worker 6 s, and one
    down for 7 s, 12 s, while calls waited. Drop it once Celery lets the back-off be set.
    """
    ensure_connected = consumer.ensure_connected

    def with_short_back_off(connection: Any) -> Any:
        connection.ensure_connection = functools.partial(
            connection.ensure_connection, interval_start=RECONNECT_FIRST,
            interval_step=RECONNECT_STEP, interval_max=RECONNECT_MOST)
        return ensure_connected(connection)

    consumer.ensure_connected = with_short_back_off


def keep_partial_result_reads(hub: Any, pool: Any) -> None:
    """Keep a prefork pool's half-read results across the event loop's reset.

    A child's result reaches the main process through a pipe, read by a generator that
    waits in the event loop for the rest of a message it has begun (a large one, such as
    a failure with its traceback, arrives in parts). On a broker connection error Celery
    5.7 resets the loop (``asynloop`` -> ``hub.reset()``), which drops every reader, and
    on reconnecting the pool registers fresh readers, which read the rest of that
    message as a new one: ``UnpicklingError: invalid load key``, which Celery takes as
    unrecoverable, and the worker stops (2 of 4 runs of ``bench/restarts.py``, 30 outages
    each). This keeps such readers through the reset and puts them back after the pool's
    own. ``pool`` is Celery's ``AsynPool``. Drop it once Celery keeps them itself.
    """
    if getattr(pool, "_warmpool_keeps_reads", False) or not hasattr(pool, "_fileno_to_outq"):
        return
    kept: dict[int, Any] = {}
    reset = hub.reset
    register = pool.register_with_event_loop

    def reset_keeping_reads() -> Any:
        for fd, (reader, _) in list(hub.readers.items()):
            if isinstance(reader, GeneratorType) and fd in pool._fileno_to_outq:
                kept[fd] = reader
        return reset()

    def register_and_resume(loop: Any) -> Any:
        registered = register(loop)
        while kept:
            fd, reader = kept.popitem()
            if fd in pool._fileno_to_outq:  # its child is still there
                loop.add_reader(fd, reader)
        return registered

    hub.reset = reset_keeping_reads
    pool.register_with_event_loop = register_and_resume
    pool._warmpool_keeps_reads = True
