"""Casts sent again when a Redis broker's restart may have lost them.

A Redis broker that shuts down can lose a message a worker popped in its very last moment
(see :mod:`celery_warmpool.wire.marks`). A call's caller is waiting: once its reply
listener is back it asks whether the call was taken, and sends it again if not. A cast's
caller has moved on, so each process keeps the casts it sent that no worker is known to
have taken yet: only those can be lost. Each time its reply listener reconnects after an
outage of the result store (in the usual set-up the same Redis server as the broker,
gone away with it), it reads their taken marks in one round trip and sends again, as its
next copy, every cast that no worker has taken. A cast that was merely still queued then
has two copies: whichever a worker takes first runs, and the other is dropped as it is
claimed. A cast found taken is forgotten.

Without an outage, casts are forgotten as workers take them: once :data:`SWEEP_AT` are
kept, the listener's thread reads the marks of those sent over :data:`SWEEP_AGE` seconds
ago (one pipeline) and forgets the taken ones, so a process that casts steadily keeps
about as many as are in flight. A cast is kept :data:`~celery_warmpool.wire.marks.CAST_KEPT`
seconds at most, and :data:`MOST_KEPT` casts at most (the oldest forgotten first, which a
long backlog of queued casts may reach: the log says so, once).

This needs a Redis result store (which holds the marks), as the reply listener does, and
only a Redis broker loses popped messages: with another broker nothing is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..wire.marks import CAST_KEPT, taken_key
from .publisher import Message

__all__ = ["MOST_KEPT", "SentCast", "SentCasts"]

logger = logging.getLogger(__name__)

#: The most casts a process keeps to send again (the oldest are forgotten first).
MOST_KEPT = 10_000
#: Casts kept before the taken ones are looked for and forgotten.
SWEEP_AT = 1_000
#: Seconds a cast is kept before it is looked for (a worker takes it about then).
SWEEP_AGE = 0.5


@dataclass(slots=True)
class SentCast:
    """A cast sent lately: its task id, how to build its ``n``-th copy, and which copy
    was sent last."""

    task_id: str
    message: Callable[[int], Message]
    sent_at: float
    copy: int = 0


class SentCasts:
    """The casts this process sent lately and no worker is known to have taken."""

    def __init__(self, send_again: Callable[[list[Message]], None],
                 kept: float = CAST_KEPT, most: int = MOST_KEPT,
                 sweep_at: int = SWEEP_AT) -> None:
        self._send_again = send_again
        self.kept = kept
        self.most = most
        self.sweep_at = sweep_at
        self._casts: OrderedDict[str, SentCast] = OrderedDict()
        self._lock = threading.Lock()
        self._sweeping = False
        self._warned = False

    def __len__(self) -> int:
        return len(self._casts)

    def add(self, task_id: str, message: Callable[[int], Message]) -> bool:
        """Keep the cast ``task_id``, sent just now (``message(n)`` builds copy ``n``).

        Returns whether a sweep is due: the caller then has :meth:`sweep` run on the
        listener's thread.
        """
        now = time.monotonic()
        with self._lock:
            self._casts[task_id] = SentCast(task_id, message, now)
            self._forget_old(now)
            due = len(self._casts) >= self.sweep_at and not self._sweeping
            if due:
                self._sweeping = True
            return due

    def sweep(self, client: Any) -> None:
        """Forget the casts kept over :data:`SWEEP_AGE` seconds that a worker took (a
        Redis client; run on the listener's thread)."""
        try:
            with self._lock:
                old = time.monotonic() - SWEEP_AGE
                casts = [cast for cast in self._casts.values() if cast.sent_at <= old]
            if not casts:
                return
            pipe = client.pipeline(transaction=False)
            for cast in casts:
                pipe.exists(taken_key(cast.task_id))
            taken = pipe.execute()
            with self._lock:
                for cast, was_taken in zip(casts, taken, strict=True):
                    if was_taken:
                        self._casts.pop(cast.task_id, None)
        finally:
            self._sweeping = False

    def check(self, client: Any) -> None:
        """Send again every cast kept whose taken mark is missing (a Redis client).

        Run by the reply listener once the result store answers again after an outage.
        """
        with self._lock:
            self._forget_old(time.monotonic())
            casts = list(self._casts.values())
        if not casts:
            return
        pipe = client.pipeline(transaction=False)
        for cast in casts:
            pipe.exists(taken_key(cast.task_id))
        taken = pipe.execute()
        lost: list[SentCast] = []
        with self._lock:
            for cast, was_taken in zip(casts, taken, strict=True):
                if was_taken:
                    self._casts.pop(cast.task_id, None)
                else:
                    cast.copy += 1
                    lost.append(cast)
        if lost:
            logger.info("%d of the %d casts sent lately were not taken by any worker when "
                        "the result store came back: sent again", len(lost), len(casts))
            self._send_again([cast.message(cast.copy) for cast in lost])

    def _forget_old(self, now: float) -> None:
        casts = self._casts
        while casts:
            oldest = next(iter(casts.values()))
            if oldest.sent_at > now - self.kept and len(casts) <= self.most:
                return
            if len(casts) > self.most and not self._warned:
                self._warned = True
                logger.warning(
                    "%d casts sent by this process are not taken by any worker yet: the "
                    "oldest are forgotten, and a Redis broker restart could lose them "
                    "(logged once)", len(casts))
            casts.popitem(last=False)
