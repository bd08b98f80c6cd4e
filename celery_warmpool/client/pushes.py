"""Pool calls pushed to a Redis broker directly, as kombu's Redis transport writes them.

kombu's producer spends most of a publish on its own layers (about 120 us of a caller's
CPU for one ``LPUSH`` of 45 us, measured here): acquiring a producer, serializing through
its registry, preparing, routing and declaring. A pool call goes to its pool's own queue
by the default exchange, so :class:`RedisPushes` writes the message kombu would write
(the same body, headers, properties and encoding, a delivery tag of its own) and pushes
it with one command of its own: ``LPUSH`` to the queue's list (the list of the message's
priority), or, for a pool held to ``max_queued``, the admission script that checks and
pushes in one step (see :mod:`.admission`). Many messages (the publishes of an event
loop's tick) go in one pipeline.

Celery's publish signals (``before_task_publish``, ``after_task_publish``) are sent as
Celery sends them, when anything listens. An app that asks for task-sent events, or whose
messages are not JSON, publishes through kombu instead (see :class:`.publisher.Publisher`).
"""

from __future__ import annotations

import base64
import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from celery import signals
from kombu.utils.json import dumps

from ..wire.scoped import own_connection
from .admission import ADMIT, Bound, _Script, busy

__all__ = ["RedisPushes"]


class RedisPushes:
    """Pushes pool calls' messages to a Redis broker (see the module), one per process."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._pid = 0
        self._channel: Any = None
        self._client: Any = None

    def push(self, message: Any) -> None:
        """Push one message (a :class:`~.publisher.Message`).

        Raises:
            PoolBusy: its pool is at its bound; nothing was pushed.
            The broker's connection errors.
        """
        refused = self.push_many([message])[0]
        if refused is not None:
            raise refused

    def push_many(self, messages: Sequence[Any]) -> list[BaseException | None]:
        """Push ``messages`` in one pipeline; each one's outcome: ``None`` (pushed) or
        the :class:`PoolBusy` that refused it.

        Raises:
            The broker's connection errors (none of the outcomes is known then).
        """
        channel, client = self._connected()
        written = [self._written(channel, message) for message in messages]
        if len(messages) == 1 and written[0][2] is None:
            key, payload, _ = written[0]
            client.lpush(key, payload)  # the usual case: no pipeline to build
            self._published(messages)
            return [None]
        pipe = client.pipeline(transaction=False)
        for key, payload, bound in written:
            if bound is None:
                pipe.lpush(key, payload)
            else:
                # The script in full, not by its SHA1: a server that lost it (a restart)
                # would fail it inside a pipeline whose other pushes already happened.
                pipe.eval(ADMIT, *_admit_args(_Script.of(channel), bound, key, payload))
        answers: list[Any] = pipe.execute()
        outcomes = [_refusal(bound, answer) for (_, _, bound), answer
                    in zip(written, answers, strict=True)]
        self._published([message for message, outcome in zip(messages, outcomes, strict=True)
                         if outcome is None])
        return outcomes

    def _written(self, channel: Any, message: Any) -> tuple[str, str, Bound | None]:
        """The list to push ``message`` to, the payload kombu would push, and the bound
        it is held to (``None``: none)."""
        headers, properties, body, _ = message.body
        options = message.options
        queue = options["routing_key"]
        if signals.before_task_publish.receivers:
            signals.before_task_publish.send(
                sender=message.name, body=body, exchange="", routing_key=queue,
                declare=[], headers=headers, properties=properties, retry_policy={})
        encoded = dumps(body).encode()
        envelope = {
            "body": base64.b64encode(encoded).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties, "delivery_mode": options.get("delivery_mode", 2),
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": options.get("priority") or channel.default_priority,
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        }
        priority = channel._get_message_priority(envelope, reverse=False)
        key = channel.global_keyprefix + channel._q_for_pri(queue, priority)
        bound = message.bound if message.bound is not None and message.bound.enforced else None
        return key, dumps(envelope), bound

    def _published(self, messages: Sequence[Any]) -> None:
        if not signals.after_task_publish.receivers:
            return
        for message in messages:
            headers, _, body, _ = message.body
            signals.after_task_publish.send(
                sender=message.name, body=body, headers=headers, exchange="",
                routing_key=message.options["routing_key"])

    def _connected(self) -> tuple[Any, Any]:
        """This process's kombu channel on the broker, and a client on its connections
        (made anew in a forked child)."""
        with self._lock:
            if self._pid != os.getpid():
                from redis import Redis

                connection = own_connection(self.app)
                self._channel = connection.default_channel
                self._client = Redis(connection_pool=self._channel.pool)
                self._pid = os.getpid()
            return self._channel, self._client


def _admit_args(script: Any, bound: Bound, key: str, payload: str) -> list[Any]:
    """The admission script's arguments (after its SHA1) for one bounded message."""
    keys = script.keys(bound.queue, 0)
    keys = [key, *keys[1:]]
    return [len(keys), *keys, payload, bound.max_queued or 0]


def _refusal(bound: Bound | None, answer: Any) -> BaseException | None:
    """The refusal an answer of the admission script means, if any."""
    if bound is None:
        return None
    admitted, waiting, capacity, rate = answer
    if int(admitted):
        return None
    return busy(bound, int(waiting), int(capacity), float(rate))
