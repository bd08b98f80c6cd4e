"""Dead letters: casts that cannot succeed, kept in a real broker queue per pool.

A cast has no caller waiting for it, so a cast that fails for good is not dropped: its
signal, the error and where it happened go to the pool's dead-letter queue
(``warmpool.<pool>.dead`` unless the spec's ``dead_letter_queue`` says otherwise). That
happens when the signal is invalid or unknown, the action fails, the cast waited past its
``timeout``, it overran its ``call_timeout``, or its process died more often than the
redelivery limit allows. Nothing consumes the queue; ``celery -A proj warmpool
dead-letters POOL`` lists it, ``--replay`` casts every letter again, ``--purge`` drops
them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

from kombu import Connection, Exchange, Queue
from pydantic import BaseModel, ConfigDict

from ..core.spec import PoolSpec
from .scoped import scoped

__all__ = ["DEAD_LETTER_EXCHANGE", "DeadLetter", "DeadLetters"]

logger = logging.getLogger(__name__)

#: How many letters :meth:`DeadLetters.read` returns unless told otherwise.
READ_LIMIT = 100
#: The exchange dead letters are published to, routed by queue name.
DEAD_LETTER_EXCHANGE = Exchange("warmpool.dead", type="direct", durable=True)


class DeadLetter(BaseModel):
    """One cast that could not succeed, as kept in the dead-letter queue."""

    model_config = ConfigDict(frozen=True)

    pool: str
    signal: dict[str, Any]
    error_type: str
    error: str
    node: str | None = None
    pid: int | None = None
    task_id: str | None = None
    #: How many times it was delivered to a worker process.
    attempts: int = 1
    #: Whether the work may have run before it failed (its process died, or it overran).
    may_have_run: bool = False
    #: The model the cast was for, in a pool with ``max_models`` (a replay names it too).
    model: str | None = None
    dead_at: float

    @classmethod
    def of(cls, pool: str, signal: dict[str, Any], error: BaseException, **where: Any,
           ) -> DeadLetter:
        """A letter for ``signal`` of ``pool`` that failed with ``error``."""
        return cls(pool=pool, signal=signal, error_type=type(error).__name__,
                   error=str(error), dead_at=time.time(), **where)


class DeadLetters:
    """The dead-letter queues of an app's pools: send, list, replay, purge."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def queue(spec: PoolSpec) -> Queue:
        """The dead-letter queue of ``spec``'s pool (durable, declared on first use)."""
        return Queue(spec.dead_letter_queue, DEAD_LETTER_EXCHANGE,
                     routing_key=spec.dead_letter_queue, durable=True)

    def send(self, spec: PoolSpec, letter: DeadLetter) -> None:
        """Publish ``letter`` to the pool's dead-letter queue, once, with one of the
        package's own producers (publisher confirms on RabbitMQ).

        Kombu's own retry is off: whoever sends it decides how long to wait out a broker
        that is away (a worker: as an errand, see :mod:`celery_warmpool.worker.errands`).

        Raises:
            The broker's connection errors, if it cannot be reached.
        """
        queue = self.queue(spec)
        with scoped(self.app).producers.acquire() as producer:
            producer.publish(letter.model_dump(mode="json"), exchange=DEAD_LETTER_EXCHANGE,
                             routing_key=queue.routing_key, declare=[queue],
                             serializer="json", delivery_mode=2, retry=False)
        logger.warning("pool %r: cast %s went to the dead-letter queue %r: %s: %s",
                       letter.pool, letter.task_id, spec.dead_letter_queue,
                       letter.error_type, letter.error)

    def depth(self, spec: PoolSpec, connection: Connection | None = None) -> int:
        """How many letters wait in the pool's dead-letter queue now."""
        with self._connection(connection) as conn:
            declared: Any = self.queue(spec)(conn.default_channel).queue_declare()
            return int(declared.message_count)

    def read(self, spec: PoolSpec, limit: int | None = READ_LIMIT) -> list[DeadLetter]:
        """The oldest ``limit`` letters in the queue (``None``: all), leaving them there."""
        return list(itertools.islice(self.letters(spec), limit))

    def letters(self, spec: PoolSpec) -> Iterator[DeadLetter]:
        """Every letter in the queue, oldest first, one at a time, leaving them there.

        Letters are fetched as they are asked for, so memory holds one at a time however
        long the queue; they stay on the broker, unacknowledged, until the iteration ends
        (or is closed), which puts them all back.
        """
        with self._connection(None) as conn:
            channel = conn.channel()
            try:
                bound = self.queue(spec)(channel)
                bound.declare()
                while (message := bound.get(no_ack=False)) is not None:
                    yield DeadLetter.model_validate(message.decode())
            finally:
                # Never acknowledged: closing the channel puts every letter back.
                channel.close()

    def take(self, spec: PoolSpec, handle: Any) -> int:
        """Give each letter to ``handle(letter)``; remove those it took without raising.

        Only the letters in the queue when this starts are taken: one that fails again
        while they are replayed comes back as a new letter, for a later look. A letter
        whose handling raises stays in the queue, and so do the ones after it. Returns how
        many were taken.
        """
        taken = 0
        with self._connection(None) as conn:
            channel = conn.channel()
            try:
                bound = self.queue(spec)(channel)
                declared: Any = bound.queue_declare()
                for _ in range(int(declared.message_count)):
                    message = bound.get(no_ack=False)
                    if message is None:
                        break
                    handle(DeadLetter.model_validate(message.decode()))
                    message.ack()
                    taken += 1
            finally:
                channel.close()
        return taken

    def purge(self, spec: PoolSpec) -> int:
        """Drop every letter of the pool; return how many there were."""
        with self._connection(None) as conn:
            bound = self.queue(spec)(conn.default_channel)
            bound.declare()
            return int(bound.purge() or 0)

    def _connection(self, connection: Connection | None) -> Any:
        if connection is not None:
            return _Borrowed(connection)
        return self.app.connection_for_write()


class _Borrowed:
    """A connection lent for a ``with`` block and left open after it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def __enter__(self) -> Connection:
        return self.connection

    def __exit__(self, *exc_info: object) -> None:
        return None
