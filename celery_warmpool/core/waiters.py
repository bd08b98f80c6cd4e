"""The queue of checkouts waiting for an agent: first come, first served.

A :class:`Waiter` is served once, with an agent, with room to build an overflow agent,
or with an error; the :class:`WaitQueue` lists whom it served since last asked, for the
pool to wake once its lock is released. Nothing here blocks: the pool's waiter adds the
lock its caller waits on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .slot import Slot

__all__ = ["WaitQueue", "Waiter"]


class Waiter:
    """A checkout queued for an agent, and what it was given when served.

    Served first come, first served, with an agent (``slot``, already lent to it), room to
    build an overflow agent (``build``, already reserved for it), or an ``error``.
    """

    __slots__ = ("build", "error", "slot")

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.error: BaseException | None = None
        self.build = False

    @property
    def served(self) -> bool:
        """Whether it was given anything (an agent, room to build one, or an error)."""
        return self.slot is not None or self.error is not None or self.build

    def wake(self) -> None:
        """Let a blocked caller go (see the pool's waiter); a plain waiter has none."""


W = TypeVar("W", bound=Waiter)


class WaitQueue(Generic[W]):
    """Waiters in the order they came, and those served since the pool last woke them.

    Arguments:
        waiter: makes the waiter a checkout queues.
    """

    __slots__ = ("_new", "waiting", "woken")

    def __init__(self, waiter: Callable[[], W]) -> None:
        self._new = waiter
        self.waiting: deque[W] = deque()
        #: Served and not yet woken; one list for the queue's life, emptied in place by
        #: whoever wakes them (so a pool can keep it and test it in one lookup).
        self.woken: list[W] = []

    def __len__(self) -> int:
        return len(self.waiting)

    def join(self) -> W:
        """Queue a new waiter; return it."""
        waiter = self._new()
        self.waiting.append(waiter)
        return waiter

    def give(self, slot: Slot) -> None:
        """Serve the oldest waiter with ``slot`` (lent to it already)."""
        waiter = self.waiting.popleft()
        waiter.slot = slot
        self.woken.append(waiter)

    def give_room(self) -> None:
        """Serve the oldest waiter with room to build an overflow agent (reserved)."""
        waiter = self.waiting.popleft()
        waiter.build = True
        self.woken.append(waiter)

    def fail_all(self, error: BaseException) -> int:
        """Serve every waiter with ``error``; how many there were."""
        count = len(self.waiting)
        while self.waiting:
            waiter = self.waiting.popleft()
            waiter.error = error
            self.woken.append(waiter)
        return count

    def leave(self, waiter: W) -> bool:
        """Take ``waiter`` out, unless it was served; whether it left empty-handed."""
        if waiter.served:
            return False
        self.waiting.remove(waiter)
        return True
