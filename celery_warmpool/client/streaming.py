"""What a streaming call is, on the caller's side: its chunks in order, then its reply.

A stream's chunks come as the worker produces them (see
:mod:`celery_warmpool.worker.streams`): published on the stream's channel, which the
process's reply listener subscribes to beside the call's result channel, into one
mailbox, so chunks and the final reply arrive in the order Redis saw them. Chunks missed
before the subscription was confirmed (or while the result store was away) are read back
from the stream's Redis Stream, and once the final reply is in, whatever is left there is
read too: every chunk is delivered once, in order, before the reply or the error.

The reader says how far it has read, so that the worker's generator waits when it runs
``stream_buffer`` chunks ahead; a reader that leaves early writes the call's cancel mark,
which stops the generator at its next ``yield``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..configuration import PoolConfiguration
from ..core.ids import new_id
from ..core.reply import AgentReply
from ..core.signal import Signal
from ..wire.marks import mark_cancelled, read_key, stream_key
from .listener import RECONNECTED, ReplyListener, Subscription
from .mailbox import Mailbox
from .protocol import Deliver, Receive, Steps, Taken
from .publisher import Message


class Caller(Protocol):
    """What a streaming call needs of the caller's client (a
    :class:`~celery_warmpool.client.calls.PoolClient`): the parts every call is made of."""

    configuration: PoolConfiguration
    reply_grace: float

    def call_message(self, task_id: str, pool: str, events: list[Signal], timeout: float,
                     call_timeout: float | None, *, stream: bool = False,
                     reply: str | None = None, model: str | None = None) -> Message:
        """The message of a call of ``events`` on ``pool``."""

    def send(self, message: Message) -> None:
        """Publish ``message`` (blocking)."""

    def result_key(self, task_id: str) -> bytes:
        """The key (and channel) of the stored result of ``task_id``."""

    def publishing(self, message: Message, deadline: float, timeout: float) -> Steps[None]:
        """The steps of publishing ``message``, retried until ``deadline``."""

    def recover(self, listener: ReplyListener, subscription: Subscription, task_id: str,
                notice: Any, send: Callable[[], None], deadline: float) -> Steps[None]:
        """The steps of a call after an outage (see ``PoolClient.recover``)."""

    def silence(self, listener: ReplyListener, pool: str, timeout: float,
                window: float) -> BaseException:
        """The error for a call that heard nothing within ``window`` seconds."""

    def read_reply(self, payload: bytes) -> list[dict[str, Any]] | None:
        """The replies a stored result carries, or ``None`` if it is not final yet."""

__all__ = ["Caller", "stream_steps"]

CHUNK, REPLY, DRAINED = "chunk", "reply", "drained"
#: Seconds between two reports of the reader's position while chunks come.
REPORT_INTERVAL = 1.0
#: Seconds the reader's position is kept.
POSITION_KEPT = 3600


class _InOrder:
    """Chunks put back in order by their index, each delivered once."""

    __slots__ = ("early", "next")

    def __init__(self) -> None:
        self.next = 1
        self.early: dict[int, Any] = {}

    def add(self, payload: bytes) -> list[Any]:
        """Take one chunk's payload; return the chunks now ready, in order."""
        entry = json.loads(payload)
        index = entry["i"]
        if index < self.next:
            return []  # delivered already (read back after it was published)
        self.early[index] = entry["c"]
        ready = []
        while self.next in self.early:
            ready.append(self.early.pop(self.next))
            self.next += 1
        return ready


class _Position:
    """What the reader reported of its position, and when to report again."""

    __slots__ = ("at", "reported", "step")

    def __init__(self, buffer: int) -> None:
        self.step = max(1, buffer // 4)
        self.reported = 0
        self.at = time.monotonic()

    def due(self, read: int) -> bool:
        """Whether ``read`` is to be reported now (and it is taken as reported)."""
        if read - self.reported >= self.step or (
                read > self.reported and time.monotonic() - self.at >= REPORT_INTERVAL):
            self.mark(read)
            return True
        return False

    def mark(self, read: int) -> None:
        """Take ``read`` as reported, now."""
        self.reported, self.at = read, time.monotonic()


def stream_steps(client: Caller, listener: ReplyListener, pool: str, event: Signal,
                 timeout: float, call_timeout: float | None,
                 model: str | None = None) -> Steps[AgentReply]:
    """The steps of a streaming call of ``event`` on ``pool`` (see the module).

    Deliver steps carry the chunks; the steps return the final reply, or raise the
    call's error after the chunks that came before it.
    """
    spec = client.configuration.spec(pool)
    started = time.monotonic()
    task_id = new_id()
    window = timeout + (call_timeout or 0.0) + client.reply_grace
    message = client.call_message(task_id, pool, [event], timeout, call_timeout, stream=True,
                                  reply=listener.channel.decode(), model=model)
    mailbox = Mailbox()
    chunks_key = stream_key(task_id).encode()
    # The reply on the process's reply channel, the chunks on the stream's own: one
    # connection carries both, in the order Redis saw them.
    reply = listener.expect(task_id, client.result_key(task_id), mailbox=mailbox, tag=REPLY)
    chunks = listener.subscribe(chunks_key, mailbox=mailbox, tag=CHUNK,
                                catch_up=functools.partial(_read_back, chunks_key, mailbox))
    order, position = _InOrder(), _Position(spec.stream_buffer)
    finished = False
    try:
        yield from client.publishing(message, started + timeout, timeout)
        outcome: Callable[[], AgentReply] | None = None
        quiet = min(REPORT_INTERVAL, spec.stream_idle_timeout / 4)
        while True:
            remaining = started + window - time.monotonic()
            # Waiting with reads the worker has not heard of: say so once it is quiet, so
            # that a pause of the generator is not taken for a reader gone away.
            unreported = order.next - 1 > position.reported
            item = yield Receive(mailbox, max(0.0, min(remaining, quiet) if unreported
                                               else remaining))
            if item is None:
                if remaining <= 0:
                    raise client.silence(listener, pool, timeout, window)
                if unreported:
                    position.mark(order.next - 1)
                    listener.submit(functools.partial(_report, task_id, order.next - 1))
                continue
            tag, data = item
            if data is RECONNECTED or isinstance(data, Taken):
                # The result store was away: the message may be lost with the broker.
                # A copy sent again was admitted once: not held to the pool's bound.
                yield from client.recover(listener, reply, task_id, data,
                                          functools.partial(client.send, message.again()),
                                          started + timeout)
            elif tag == CHUNK:
                for chunk in order.add(data):
                    yield Deliver(chunk)
                if position.due(order.next - 1):
                    listener.submit(functools.partial(_report, task_id, order.next - 1))
            elif tag == REPLY:
                outcome = outcome or _outcome(client, data)
                if outcome is not None:  # final: read back what is left, then end (again,
                    # if the reply comes again: a read back lost to an outage)
                    listener.submit(functools.partial(_read_back, chunks_key, mailbox,
                                                      drained=True))
            elif tag == DRAINED and outcome is not None:
                finished = True
                return outcome()
    except BaseException as exc:
        if not finished and not isinstance(exc, Exception):  # the reader left
            listener.leave(exc, functools.partial(mark_cancelled, task_id=task_id,
                                                  seconds=window))
        raise
    finally:
        listener.forget(reply)
        listener.unsubscribe(chunks)
        listener.submit(functools.partial(_forget, task_id))


def _outcome(client: Caller, payload: bytes) -> Callable[[], AgentReply] | None:
    """What the call's final reply says, to be told once every chunk is out: a function
    returning the reply or raising the error; ``None`` for a state that is not final."""
    try:
        replies = client.read_reply(payload)
    except Exception as exc:
        error = exc

        def fail() -> AgentReply:
            raise error

        return fail
    if replies is None:
        return None
    reply = AgentReply.model_validate(replies[0])
    return lambda: reply


def _read_back(key: bytes, mailbox: Mailbox, redis: Any, *, drained: bool = False) -> None:
    """Put every chunk still kept in the stream ``key`` in ``mailbox`` (duplicates are
    dropped by the reader); then, if ``drained``, say so."""
    for _, fields in redis.xrange(key):
        mailbox.put((CHUNK, fields[b"d"]))
    if drained:
        mailbox.put((DRAINED, b""))


def _report(task_id: str, read: int, redis: Any) -> None:
    redis.set(read_key(task_id), read, ex=POSITION_KEPT)


def _forget(task_id: str, redis: Any) -> None:
    redis.delete(stream_key(task_id), read_key(task_id))
