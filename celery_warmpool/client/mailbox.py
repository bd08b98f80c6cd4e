"""Mailbox: where the reply listener leaves what arrived for one waiting caller.

The listener's thread puts; one caller takes, from a thread (:meth:`Mailbox.take`) or a
coroutine on any event loop (:meth:`Mailbox.atake`). Whoever waits leaves a way to wake
it, and ``put`` uses it: nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

__all__ = ["Mailbox"]


class Mailbox:
    """Items for one caller, in the order they came (see the module)."""

    __slots__ = ("_items", "_lock", "_waker")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        # A held lock (a thread waits to acquire it) or a future of a waiting coroutine.
        self._waker: threading.Lock | tuple[asyncio.AbstractEventLoop,
                                            asyncio.Future[None]] | None = None

    def put(self, item: Any) -> None:
        """Leave ``item`` and wake the caller if it waits. Called from any thread."""
        with self._lock:
            self._items.append(item)
            waker, self._waker = self._waker, None
        if waker is None:
            return
        if isinstance(waker, tuple):
            loop, future = waker
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits now
                loop.call_soon_threadsafe(_wake, future)
        else:
            waker.release()

    def take(self, timeout: float) -> Any | None:
        """The next item, waiting at most ``timeout`` seconds; ``None`` if none came."""
        with self._lock:
            if self._items:
                return self._items.popleft()
            waker = threading.Lock()
            waker.acquire()
            self._waker = waker
        woken = waker.acquire(timeout=max(timeout, 0.0))
        return self._after_wait(waker, woken)

    async def atake(self, timeout: float) -> Any | None:
        """The next item, awaiting it at most ``timeout`` seconds; ``None`` if none came."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._items:
                return self._items.popleft()
            future: asyncio.Future[None] = loop.create_future()
            self._waker = (loop, future)
        timer = loop.call_later(max(timeout, 0.0), _wake, future)
        try:
            await future
        finally:
            # Woken, timed out or cancelled: nobody may wake this future any more.
            timer.cancel()
            self._forget(future)
        with self._lock:
            return self._items.popleft() if self._items else None

    def _after_wait(self, waker: threading.Lock, woken: bool) -> Any | None:
        with self._lock:
            if not woken and self._waker is waker:
                self._waker = None
            return self._items.popleft() if self._items else None

    def _forget(self, waker: asyncio.Future[None]) -> None:
        with self._lock:
            current = self._waker
            if isinstance(current, tuple) and current[1] is waker:
                self._waker = None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
