"""What a call is, written once for blocking and asyncio callers alike.

A call is a generator of *steps*: it yields what it needs done (:class:`Publish` a
message, :class:`Receive` from a mailbox within a time, :class:`Pause`, and for a
stream :class:`Deliver` a chunk to its reader) and gets the
outcome back, and it decides everything else: the message and its deadline, retrying a
publish while the broker is away, which reply is final, what error a reply or a silence
means, and what to clean up on every way out. It touches no socket and knows no event
loop. Two small shells (:mod:`.shells`) carry the steps out: one blocks the calling
thread, one awaits on the caller's event loop. Neither knows what a call is.

A caller that stops waiting (a cancelled coroutine, an interrupted thread, a stream
closed) leaves the call through the generator's clean-up: its subscription is dropped at
once and a cancel mark is written for the worker, which then never starts the call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.errors import BrokerUnavailable
from ..wire.marks import taken_key
from ..wire.outages import BACKOFF, Outages
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .listener import Subscription

__all__ = ["Deliver", "Pause", "Publish", "Receive", "Step", "Steps", "Taken", "ask_taken",
           "publish_steps"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

@dataclass(frozen=True, slots=True)
class Publish:
    """Run ``send`` (a blocking publish) and give back what it returns; on an event loop,
    await ``asend()`` instead where there is one (else ``send`` runs on a thread)."""

    send: Callable[[], Any]
    asend: Callable[[], Awaitable[Any]] | None = None


@dataclass(frozen=True, slots=True)
class Receive:
    """The next item of ``mailbox``, waiting at most ``timeout`` seconds (or ``None``)."""

    mailbox: Mailbox
    timeout: float


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``chunk`` to the reader of a stream (its next item)."""

    chunk: Any


Step = Publish | Receive | Pause | Deliver
Steps = Generator[Step, Any, T]


def publish_steps(send: Callable[[], T], deadline: float, timeout: float, outages: Outages,
                  broker_url: str, asend: Callable[[], Awaitable[T]] | None = None,
                  ) -> Steps[T]:
    """Publish with ``send()`` until it works or ``deadline`` (monotonic) passes.

    Raises:
        BrokerUnavailable: the broker could not be reached before the deadline.
    """
    pauses = BACKOFF.pauses(deadline)
    while True:
        try:
            sent: T = yield Publish(send, asend)
            return sent
        except Exception as exc:
            if not outages.is_outage(exc):
                raise
            pause = next(pauses, None)
            if pause is None:
                raise BrokerUnavailable(
                    f"could not reach the broker {broker_url} within {timeout:g}s: "
                    f"{type(exc).__name__}: {exc}", broker_url, timeout) from exc
            logger.debug("broker %s unreachable (%r); retrying", broker_url, exc)
            yield Pause(pause)


@dataclass(frozen=True, slots=True)
class Taken:
    """Whether a worker took a call's message, as its taken mark said when asked."""

    taken: bool


def ask_taken(task_id: str, subscription: Subscription, client: Any) -> None:
    """Put in ``subscription``'s mailbox whether the call ``task_id`` was taken (run on
    the reply listener's thread, with its Redis client)."""
    subscription.put(Taken(bool(client.exists(taken_key(task_id)))))
