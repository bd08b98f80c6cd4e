"""Outages: what says "the broker or the result store is away", and how long to wait it out.

Every path of the package that talks to a broker or a result store (publishing a call,
waiting for its reply, marking it taken, writing a stream's chunks, the reply listener,
dead letters) waits out an outage the same way: it tries again after a pause that
doubles from :data:`FIRST` to :data:`MOST` seconds, until the deadline of the work it
serves, and then gives up with the last error. And every path asks one question to tell
an outage from any other failure: :meth:`Outages.is_outage`, whose answer for an app is
made once (:meth:`Outages.of`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, TypeVar

from kombu.exceptions import OperationalError
from redis import exceptions as redis_errors

from ..core.errors import WarmPoolError

__all__ = ["FIRST", "MOST", "REDIS_OUTAGES", "Backoff", "Outages", "retry"]

T = TypeVar("T")

#: Seconds before the first try again, and the longest pause between two tries.
FIRST: Final = 0.05
MOST: Final = 0.5

#: What says a Redis server (a result store, a broker) cannot be reached.
REDIS_OUTAGES: Final[tuple[type[BaseException], ...]] = (
    redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class Backoff:
    """Pauses between tries: ``first``, then doubling, never over ``most`` seconds."""

    __slots__ = ("first", "most")

    def __init__(self, first: float = FIRST, most: float = MOST) -> None:
        self.first = first
        self.most = most

    def pauses(self, deadline: float | None = None,
               clock: Callable[[], float] = time.monotonic) -> Iterator[float]:
        """The pause before each next try; it ends once ``deadline`` (on ``clock``) has
        passed, and never runs past it. ``None``: it never ends."""
        pause = self.first
        while True:
            if deadline is None:
                yield pause
            else:
                left = deadline - clock()
                if left <= 0:
                    return
                yield min(pause, left)
            pause = min(pause * 2, self.most)


#: The pauses every path uses.
BACKOFF: Final = Backoff()


class Outages:
    """What says "the broker or the result store of an app cannot be reached".

    ``errors`` are the broker transport's connection and channel errors, the result
    store's connection errors, kombu's :class:`OperationalError`, Redis' connection
    errors and :class:`OSError`, read once. A :class:`WarmPoolError` is never an outage
    (a :class:`CheckoutTimeout` is a :class:`TimeoutError`, which transports count among
    their connection errors), and a :class:`RuntimeError` is one only when a lost
    connection caused it (Celery's result consumer gives up reconnecting with one).
    """

    _of_app: ClassVar[weakref.WeakKeyDictionary[Any, Outages]] = weakref.WeakKeyDictionary()

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        self.errors = errors

    @classmethod
    def of(cls, app: Any) -> Outages:
        """The app's outages, worked out on first use (it opens no connection)."""
        found = cls._of_app.get(app)
        if found is None:
            found = cls._of_app[app] = cls(_errors_of(app))
        return found

    def is_outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the broker or the result store is away."""
        if isinstance(exc, WarmPoolError) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, RuntimeError) and not isinstance(exc, self.errors):
            return exc.__cause__ is not None and self.is_outage(exc.__cause__)
        return isinstance(exc, self.errors)


def retry(action: Callable[[], T], outages: Outages, deadline: float | None, *,
          backoff: Backoff = BACKOFF, sleep: Callable[[float], Any] = time.sleep,
          on_outage: Callable[[BaseException], None] | None = None) -> T:
    """``action()``, tried again while it fails for an outage, until ``deadline``
    (monotonic; ``None``: until it works).

    ``on_outage`` hears of each failure first (it may raise to stop the tries).

    Raises:
        The last outage, once the deadline has passed; any other error at once.
    """
    pauses = backoff.pauses(deadline)
    while True:
        try:
            return action()
        except Exception as exc:
            if not outages.is_outage(exc):
                raise
            if on_outage is not None:
                on_outage(exc)
            pause = next(pauses, None)
            if pause is None:
                raise
            sleep(pause)


def _errors_of(app: Any) -> tuple[type[BaseException], ...]:
    connection = app.connection_for_write()
    try:
        # Connection errors, and the channel errors kombu calls recoverable (a confirm
        # refused, a channel closed under the publisher): not every channel error, which
        # on Redis would take a command the server refuses for an outage.
        transport = (*connection.connection_errors, *connection.recoverable_channel_errors)
    except Exception:  # a transport whose client library is missing: its own error later
        transport = ()
    finally:
        connection.release()
    store = tuple(getattr(app.backend, "connection_errors", ()))
    found = (OperationalError, ConnectionError, *REDIS_OUTAGES, *transport, *store)
    # kombu's Redis transport counts a KeyError among its connection errors; here it would
    # make a fault look like an outage, and be waited out before it is told.
    return tuple(dict.fromkeys(error for error in found if error not in NEVER_OUTAGES))


#: Errors some transports list among their connection errors that are faults here.
NEVER_OUTAGES: Final = (KeyError,)
