"""Casts sent again when a Redis broker's restart may have lost them.

A Redis broker that shuts down can lose a message a worker popped in its very last moment
(see :mod:`celery_warmpool.core.marks`). A call's caller is waiting: once its reply
listener is back it asks whether the call was taken, and sends it again if not. A cast's
caller has moved on, so each process keeps the casts it sent in the last
:data:`~celery_warmpool.core.marks.CAST_KEPT` seconds (at most :data:`MOST_KEPT` of
them). Each time its reply listener reconnects after an outage of the result store (in
the usual set-up the same Redis server as the broker, gone away with it), it reads their
taken marks in one round trip and sends again, as its next copy, every cast that no
worker has taken. A cast that was merely still queued then has two copies: whichever a
worker takes first runs, and the other is dropped as it is claimed. A cast found taken
is forgotten.

This needs a Redis result store (which holds the marks), as the reply listener does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.marks import CAST_KEPT, taken_key
from .publisher import Message

__all__ = ["MOST_KEPT", "SentCast", "SentCasts"]

logger = logging.getLogger(__name__)

#: The most casts a process keeps to send again (the oldest are forgotten first).
MOST_KEPT = 10_000


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
                 kept: float = CAST_KEPT, most: int = MOST_KEPT) -> None:
        self._send_again = send_again
        self.kept = kept
        self.most = most
        self._casts: OrderedDict[str, SentCast] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._casts)

    def add(self, task_id: str, message: Callable[[int], Message]) -> None:
        """Keep the cast ``task_id``, sent just now (``message(n)`` builds copy ``n``)."""
        now = time.monotonic()
        with self._lock:
            self._casts[task_id] = SentCast(task_id, message, now)
            self._forget_old(now)

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
            casts.popitem(last=False)
