"""The outbox: what coroutines publish, sent together by one thread of the process.

Kombu has no asyncio producer, and a thread hop per call (an executor) costs each call a
wake-up of a thread and of the event loop. Here a coroutine puts its message in the
process's outbox and awaits a future; one thread takes everything that came since its
last round (under load, the publishes of a whole tick of every event loop) and sends it
in one go (on Redis one pipeline: :meth:`~.pushes.RedisPushes.push_many`), then settles
the futures of each event loop with one callback. A coroutine cancelled while it waits
stops waiting at once; its message may still go out (its caller's clean-up marks the
call cancelled, as for any call left after its publish).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Outbox"]

logger = logging.getLogger(__name__)

#: What sends many messages at once: each one's outcome, ``None`` or the error that
#: refused it; raising means none is known to be sent.
SendMany = Callable[[Sequence[Any]], list[BaseException | None]]
_Waiting = tuple[Any, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class Outbox:
    """Messages coroutines wait to see sent, sent together (see the module)."""

    def __init__(self, send_many: SendMany, name: str = "warmpool-outbox") -> None:
        self._send_many = send_many
        self._name = name
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._wake = threading.Event()
        self._pid = 0

    async def send(self, message: Any) -> None:
        """Send ``message`` with the next round; return once it is sent.

        Raises:
            What sending it raised, or the error that refused it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._pid != os.getpid():  # a forked child: a thread of its own
                self._pid = os.getpid()
                self._waiting = []
                self._wake = threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), name=self._name,
                                 daemon=True).start()
            self._waiting.append((message, loop, future))
            first = len(self._waiting) == 1
        if first:
            self._wake.set()
        await future

    def _run(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            wake.clear()
            with self._lock:
                batch, self._waiting = self._waiting, []
            if batch:
                self._send(batch)

    def _send(self, batch: list[_Waiting]) -> None:
        outcomes: list[BaseException | None]
        try:
            outcomes = self._send_many([message for message, _, _ in batch])
        except BaseException as exc:  # none of them is known to be sent
            outcomes = [exc] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, BaseException | None]]] = {}
        for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # its loop closed: nobody waits for these
                logger.debug("outbox: an event loop closed with %d sends", len(settled))


def _settle(settled: list[tuple[Any, BaseException | None]]) -> None:
    """Set each future's outcome (on its own event loop)."""
    for future, outcome in settled:
        if future.done():  # its coroutine was cancelled
            continue
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)
