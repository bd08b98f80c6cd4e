"""Admission: a call to a pool with ``max_queued`` is refused before it is queued.

The calls *waiting* for a pool are those queued in the broker (every list of a priority
queue) plus those a node took and has not started (reserved), all nodes together. A
call or cast that finds ``max_queued`` of them is refused with :class:`PoolBusy`; it was
never queued, so it never runs.

- **Redis**: the check and the push are one step. kombu writes the call's message as
  for any publish (its format, body encoding, delivery tag); instead of kombu's
  ``LPUSH``, :data:`ADMIT` (a Lua script, one ``EVALSHA``, so no extra round trip) adds
  the lengths of the queue's lists to the reserved calls the nodes report on the
  backlog board (:mod:`celery_warmpool.wire.backlog`, in the same Redis database) and
  pushes the message only under the bound. A node reports a call it takes as soon as
  it takes it (:mod:`celery_warmpool.worker.backlog`), so for about a millisecond a
  call that moved from the list to a node is counted by neither: the bound can be
  passed by the calls admitted in that moment, never by more than the nodes' reserve
  room (each node's capacity).
- **RabbitMQ**: the broker checks. The pool's queue is declared with ``x-max-length``
  and ``x-overflow: reject-publish`` (:mod:`celery_warmpool.wire.queues`); a publish
  past the bound is nacked, and with publisher confirms (on by default, see
  :class:`~celery_warmpool.wire.scoped.Producers`) py-amqp raises ``MessageNacked``, told here as
  :class:`PoolBusy`. RabbitMQ counts only ready messages, so the nodes keep no reserve of
  such a pool (their window is its capacity, see
  :mod:`celery_warmpool.worker.consumers`): a call is reserved only between its
  delivery to a free agent's node and its start.

A copy of an admitted call sent again after a broker outage (:attr:`Bound.checked`
false) is not checked again: it was admitted once.

``retry_after`` is the calls found waiting divided by the nodes' drain rate (the calls
they started per second, recently, while calls waited), from the same board: on Redis
the script returns it, on RabbitMQ it is read on a pool's first refusal and kept fresh
from then (see :class:`Refusals`). Without a rate (no node reported one yet) it is
:data:`UNKNOWN_RETRY_AFTER`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Final, NamedTuple

from amqp.exceptions import MessageNacked, PreconditionFailed
from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.utils.json import dumps

from ..core.errors import ConfigurationError, PoolBusy
from ..core.status import PoolLoad
from ..wire.backlog import BacklogBoard, board_key, totals
from ..wire.queues import inequivalent

__all__ = ["ADMIT", "Admission", "AdmittingProducer", "Bound", "Refusals", "armed", "busy",
           "retry_after"]

logger = logging.getLogger(__name__)

#: Seconds to tell a refused caller when no drain rate is known.
UNKNOWN_RETRY_AFTER: Final = 1.0
#: The shortest and longest ``retry_after``.
SHORTEST_RETRY: Final = 0.01
LONGEST_RETRY: Final = 3600.0
#: Seconds a board reading serves RabbitMQ refusals of one pool.
BOARD_KEPT: Final = 0.5

#: Counts the calls waiting and pushes the message only under the bound.
#: KEYS: the list to push to, the pool's board hash, every list of the queue.
#: ARGV: the message, the bound.
#: Returns: admitted (1 or 0), the calls waiting (with this one if admitted), the
#: nodes' capacity, their drain rate (as text: Lua numbers come back as integers).
ADMIT: Final = """
pcall(redis.replicate_commands)
local waiting = 0
for i = 3, #KEYS do
    waiting = waiting + redis.call('LLEN', KEYS[i])
end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local capacity, rate = 0, 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 2, #fields, 2 do
    local reserved, running, agents, speed, expires =
        string.match(fields[i], '^(%d+) (%d+) (%d+) ([%d.]+) (%d+)$')
    if expires and tonumber(expires) > ms then
        waiting = waiting + tonumber(reserved)
        capacity = capacity + tonumber(agents)
        rate = rate + tonumber(speed)
    end
end
if waiting >= tonumber(ARGV[2]) then
    return {0, waiting, capacity, tostring(rate)}
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return {1, waiting + 1, capacity, tostring(rate)}
"""


class Bound(NamedTuple):
    """The bound a pool call's publish is held to."""

    pool: str
    queue: str
    #: The pool's ``max_queued`` (``None``: no bound).
    max_queued: int | None
    #: Whether to check it (``False`` for a copy of an admitted call sent again).
    checked: bool = True

    @property
    def enforced(self) -> bool:
        """Whether this publish is checked against a bound."""
        return self.max_queued is not None and self.checked


def retry_after(waiting: int, rate: float) -> float:
    """Seconds until the calls ``waiting`` have drained at ``rate`` calls a second."""
    if rate <= 0:
        return UNKNOWN_RETRY_AFTER
    return min(max(waiting / rate, SHORTEST_RETRY), LONGEST_RETRY)


def busy(bound: Bound, waiting: int, capacity: int, rate: float) -> PoolBusy:
    """The error of a call refused at ``bound`` with ``waiting`` calls found."""
    after = retry_after(waiting, rate)
    served = (f"{capacity} agents serve it, about {rate:.1f} calls a second"
              if capacity else "no live node serves it")
    most = bound.max_queued or 0
    return PoolBusy(f"pool {bound.pool!r} is busy: {waiting} calls wait for an agent "
                    f"(max_queued={most}; {served}); try again in {after:.2f}s",
                    bound.pool, waiting, most, after, capacity)


class AdmittingProducer(Producer):
    """A kombu producer that pushes a call held to a bound on Redis with :data:`ADMIT`.

    Set :attr:`bound` for one publish (see :func:`armed`); every other publish (another
    queue, an event, RabbitMQ) is kombu's own.
    """

    bound: Bound | None = None

    def _publish(self, body: Any, priority: Any, content_type: Any, content_encoding: Any,
                 headers: Any, properties: Any, routing_key: Any, mandatory: Any,
                 immediate: Any, exchange: Any, declare: Any, timeout: Any = None,
                 confirm_timeout: Any = None, retry: bool = False,
                 retry_policy: Any = None) -> Any:
        bound = self.bound
        channel: Any = self.channel  # kombu's stubs know channels only abstractly
        connection: Any = self.connection
        driver = connection.transport.driver_type
        if (bound is None or not bound.enforced or exchange or routing_key != bound.queue
                or driver != "redis"):
            if bound is not None and bound.enforced and driver not in ("redis", "amqp"):
                _unenforced(bound, driver)
            return super()._publish(body, priority, content_type, content_encoding,
                                    headers, properties, routing_key, mandatory, immediate,
                                    exchange, declare, timeout, confirm_timeout, retry,
                                    retry_policy)
        # As kombu's own publish, up to the push: the same message, byte for byte.
        message = channel.prepare_message(body, priority, content_type, content_encoding,
                                          headers, properties)
        for entity in declare or ():
            self.maybe_declare(entity, retry=retry, **(retry_policy or {}))
        channel._inplace_augment_message(message, exchange, routing_key)
        admit(channel, bound, message)
        return None


@functools.cache
def _unenforced(bound: Bound, driver: str | None) -> None:
    """Say once per pool that its bound cannot be held on this broker."""
    logger.warning("pool %r: max_queued=%s is held on Redis and RabbitMQ only; this "
                   "broker (%s) queues its calls without a bound", bound.pool,
                   bound.max_queued, driver)


def admit(channel: Any, bound: Bound, message: dict[str, Any]) -> None:
    """Push ``message`` (kombu's, for ``bound.queue``) on a Redis ``channel`` if the pool
    is under its bound.

    Raises:
        PoolBusy: the pool's waiting calls are at the bound; nothing was pushed.
    """
    script = _Script.of(channel)
    priority = channel._get_message_priority(message, reverse=False)
    admitted, waiting, capacity, rate = script.run(
        script.keys(bound.queue, priority), dumps(message), bound.max_queued or 0)
    if not int(admitted):
        raise busy(bound, int(waiting), int(capacity), float(rate))


class _Script:
    """:data:`ADMIT` on one kombu Redis channel's connections (through a plain client:
    kombu's own would add its key prefix to the first key only), with the keys of each
    queue and priority worked out once."""

    _of: weakref.WeakKeyDictionary[Any, _Script] = weakref.WeakKeyDictionary()

    def __init__(self, channel: Any) -> None:
        from redis import Redis
        from redis.exceptions import NoScriptError

        self.channel = channel
        self.client = Redis(connection_pool=channel.pool)
        self.sha = self.client.script_load(ADMIT)
        self.missing = NoScriptError
        self._keys: dict[tuple[str, int], list[str]] = {}

    @classmethod
    def of(cls, channel: Any) -> _Script:
        script = cls._of.get(channel)
        if script is None:
            script = cls._of[channel] = cls(channel)
        return script

    def keys(self, queue: str, priority: int) -> list[str]:
        """The script's keys for a message of ``priority`` to ``queue``."""
        found = self._keys.get((queue, priority))
        if found is None:
            channel, prefix = self.channel, self.channel.global_keyprefix
            lists = dict.fromkeys(prefix + channel._q_for_pri(queue, step)
                                  for step in channel.priority_steps)
            found = self._keys[(queue, priority)] = [
                prefix + channel._q_for_pri(queue, priority), prefix + board_key(queue),
                *lists]
        return found

    def run(self, keys: list[str], *args: Any) -> Any:
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except self.missing:  # the server lost its scripts (a restart): load it again
            self.sha = self.client.script_load(ADMIT)
            return self.client.evalsha(self.sha, len(keys), *keys, *args)


class Refusals:
    """What a RabbitMQ refusal tells: the calls waiting and the nodes' drain rate.

    The board is read on a pool's first refusal; after that a refusal is told from the
    last reading, and one older than :data:`BOARD_KEPT` seconds is read again on a
    thread of its own, so that no refusal but a pool's first waits for the result store.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._board: BacklogBoard | None = None
        self._board_pid = 0
        self._read: dict[str, tuple[float, PoolLoad]] = {}
        self._reading: set[str] = set()
        self._lock = threading.Lock()

    def busy(self, bound: Bound) -> PoolBusy:
        """The error of a call RabbitMQ refused at ``bound``: the queue held exactly
        ``max_queued`` ready messages (``reject-publish`` refuses at its length), plus
        what the nodes report reserved."""
        load = self._load(bound.queue)
        return busy(bound, (bound.max_queued or 0) + load.reserved, load.capacity,
                    load.drain_rate)

    def _load(self, queue: str) -> PoolLoad:
        with self._lock:
            kept = self._read.get(queue)
            stale = kept is None or time.monotonic() - kept[0] >= BOARD_KEPT
            again = kept is not None and stale and queue not in self._reading
            if again:
                self._reading.add(queue)
        if kept is None:
            return self._read_board(queue)
        if again:
            threading.Thread(target=self._read_board, args=(queue,), daemon=True,
                             name="warmpool-refusals").start()
        return kept[1]

    def _read_board(self, queue: str) -> PoolLoad:
        try:
            board = self._board_of_this_process()
            load = totals(board.read(queue)) if board is not None else PoolLoad()
        except Exception as exc:  # the result store is away: no rate, the default wait
            logger.debug("could not read the backlog board of %s: %r", queue, exc)
            load = PoolLoad()
        with self._lock:
            self._read[queue] = (time.monotonic(), load)
            self._reading.discard(queue)
        return load

    def _board_of_this_process(self) -> BacklogBoard | None:
        # Made anew in a forked child. (Two threads may each make one at first: the
        # result store's own client, nothing of its own to close.)
        if self._board_pid != os.getpid():
            self._board, self._board_pid = BacklogBoard.of(self.app), os.getpid()
        return self._board


class Admission:
    """What became of the publishes of one :func:`armed` block."""

    __slots__ = ("refused",)

    def __init__(self) -> None:
        #: The refusal, if the pool was at its bound (to be raised by the caller).
        self.refused: PoolBusy | None = None


@contextlib.contextmanager
def armed(producer: Any, bound: Bound, refusals: Refusals) -> Iterator[Admission]:
    """Hold ``producer``'s publishes to ``bound`` for the ``with`` block.

    A refusal is not raised here but kept in the :class:`Admission` (raise it once the
    producer is back in its pool: kombu replaces the connection of a pooled producer
    that an error leaves, which would cost every refused call a new connection).

    Raises:
        ConfigurationError: RabbitMQ has the pool's queue with other arguments.
    """
    admission = Admission()
    producer.bound = bound
    try:
        yield admission
    except PoolBusy as exc:  # the admission script refused it (Redis)
        admission.refused = exc
    except (MessageNacked, OperationalError) as exc:
        # Celery's own apply_async re-raises the nack as kombu's OperationalError.
        nacked = isinstance(exc, MessageNacked) or isinstance(exc.__cause__, MessageNacked)
        if not nacked or bound.max_queued is None:
            raise  # not a refusal at a bound: the broker's own trouble
        if bound.checked:
            admission.refused = refusals.busy(bound)
        else:
            # A copy of an admitted call: its original is still queued (RabbitMQ keeps
            # what it confirmed), and only one copy runs.
            logger.debug("pool %r: a copy sent again was refused; the original stands",
                         bound.pool)
    except PreconditionFailed as exc:
        why = inequivalent(bound.queue, bound.max_queued)
        raise ConfigurationError(f"pool {bound.pool!r}: {why} ({exc})", bound.pool,
                                 "max_queued") from exc
    finally:
        producer.bound = None
