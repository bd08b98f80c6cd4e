"""LendingPolicy: which agent a checkout gets and what becomes of one checked in.

The policy decides and does nothing else: no I/O, no threads, no lock (its caller holds
one around every call); it reads the pool's clock (ages, idle spells) and the monotonic
one (how long an agent is held), which is all the outside it sees. Asked
to lend, it answers with what must happen (lend this agent, build an overflow agent,
wait in the queue, exhausted); asked to take an agent back, it puts it back, hands it to
the oldest waiter, or retires it (dismiss, replace, close), recording why on its
:class:`~.slot.Slot`. Waiters it serves are listed in its :class:`~.waiters.WaitQueue`
for the caller to wake. :class:`~.pool.AgentPool` calls it under its lock and carries the
answers out after releasing it (building, waking, ``teardown()``, telemetry), which is
why it can be tested exhaustively with no threads (``tests/test_pool_state_machine.py``).

Numbers are derived from the slots, never counted by hand: an agent is checked out when
its slot is in the pool and not idle; the base agents are the slots that are not
overflow, plus those being rebuilt.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, TypeVar

from .errors import HandedBack, NotCheckedOut, PoolClosed, PoolError
from .slot import CLOSED, DISMISSED, Slot
from .spec import PoolOptions
from .waiters import Waiter, WaitQueue

__all__ = ["BUILD", "CHECK_HEALTH", "EXHAUSTED", "LendingPolicy", "handed_back",
           "not_checked_out"]

#: The clock a slot's ``lent_at`` is read from (how long an agent was held).
_now = time.monotonic

#: Answers to a checkout besides an agent or a place in the queue: room was reserved for
#: the caller to build an overflow agent; nothing is free and the caller would not wait.
BUILD: Final = "build"
EXHAUSTED: Final = "exhausted"
#: Answer to :meth:`LendingPolicy.vet`: ask the agent's ``check_health()`` before lending.
CHECK_HEALTH: Final = "check health"


W = TypeVar("W", bound=Waiter)


class LendingPolicy(Generic[W]):
    """The idle agents, the waiters and the overflow room of one pool (see the module).

    Arguments:
        name: the pool's name, for the errors it raises.
        options: the pool's options (strategy, overflow, recycling, health checks).
        clock: the pool's clock (ages, idle times).
        waiter: makes the waiter a blocked checkout queues.
    """

    def __init__(self, name: str, options: PoolOptions, clock: Callable[[], float],
                 waiter: Callable[[], W]) -> None:
        self.name = name
        self.options = options
        self.size = options.size
        self.max_overflow = options.max_overflow
        self._clock = clock
        self.slots: dict[int, Slot] = {}  # every live agent, idle or out, by id()
        self.idle: deque[Slot] = deque()
        self._take = self.idle.pop if options.strategy == "lifo" else self.idle.popleft
        self.queue = WaitQueue(waiter)
        # The queue's own containers, for the common paths' quick tests.
        self.waiters: deque[W] = self.queue.waiting
        self.woken: list[W] = self.queue.woken
        self.overflow = 0  # overflow slots among the slots
        self.building_overflow = 0  # room reserved for overflow agents being built
        self.replacing = 0  # base agents being built
        self.started = False
        self.closed = False
        self.handing_back = False
        #: Whether more base agents live than the size (after a resize down).
        self.shrinking = False
        # Lending's counters, changed with what they count.
        self.checkouts = self.checkins = self.timeouts = self.exhausted = 0
        self.overflow_created = self.dismissed = self.replacements = 0
        # Precomputed so the common paths test one attribute, not several options.
        self.vetting = options.max_age is not None or options.health_check_interval is not None
        self._recycling = options.max_uses is not None or options.max_age is not None
        self._stamping = options.health_check_interval is not None or options.overflow_ttl > 0
        self.resetting = options.reset_on_checkin
        # A checkin with nothing to decide: no recycling, stamping or reset.
        self._plain_checkin = not (self._recycling or self._stamping or self.resetting)

    # -- lending -----------------------------------------------------------------------

    def lend_idle(self) -> Slot | None:
        """Lend an idle agent if there is one (the common case, kept short)."""
        if self.idle and not self.closed:
            slot = self._take()
            slot.out = True
            slot.uses += 1
            slot.lent_at = _now()
            self.checkouts += 1
            return slot
        return None

    def lend_chosen(self, slot: Slot) -> Slot:
        """Lend the idle ``slot`` its caller chose (the agent holding a model, say)."""
        self.idle.remove(slot)
        return self._lend(slot)

    def lend(self, block: bool, overflow_allowed: bool = True,
             count_exhausted: bool = True) -> Slot | W | Literal["build", "exhausted"]:
        """Decide how a checkout gets its agent: lend one, build one, queue, or refuse.

        Queueing happens here, in the same call that saw nothing free, so an agent
        checked in a moment later goes to this waiter rather than past it.

        Arguments:
            block: queue when nothing is free (else answer ``EXHAUSTED``).
            overflow_allowed: may answer ``BUILD`` (not after this caller's build failed).
            count_exhausted: count it in ``exhausted`` (once per checkout).

        Raises:
            PoolClosed, PoolError (never started), HandedBack (would wait, but the pool
            hands its waiters back).
        """
        if self.closed:
            raise PoolClosed(f"pool {self.name!r} is closed", self.name)
        if self.idle:
            return self._lend(self._take())
        if not self.started:
            # Nothing would ever come: fail now rather than wait forever.
            raise PoolError(f"pool {self.name!r} is not started: call start() first",
                            self.name)
        if overflow_allowed and self.overflow_room():
            self.building_overflow += 1
            return BUILD
        if count_exhausted:
            self.exhausted += 1
        if self.handing_back:
            raise handed_back(self.name)
        if not block:
            return EXHAUSTED
        return self.queue.join()

    def vet(self, slot: Slot) -> str | None:
        """Check a just-lent agent's age: why to retire it, ``CHECK_HEALTH``, or ``None``."""
        now = self._clock()
        if slot.health_check_due(now, self.options.health_check_interval):
            return slot.too_old(now, self.options.max_age) or CHECK_HEALTH
        return slot.too_old(now, self.options.max_age)

    def refuse(self, slot: Slot, reason: str) -> Slot:
        """Retire a just-lent agent that failed its vetting: it never reached the caller."""
        self.checkouts -= 1
        slot.out = False
        self._retire(slot, reason)
        return slot

    def overflow_built(self, slot: Slot) -> bool:
        """Lend a new overflow agent to the caller that reserved room for it; ``False``
        if the pool closed meanwhile (the agent must be torn down)."""
        self.building_overflow -= 1
        if self.closed:
            return False
        self._add(slot)
        self.overflow_created += 1
        self._lend(slot)
        return True

    def overflow_failed(self, interrupted: bool) -> None:
        """Release the room of an overflow agent whose build failed or was interrupted:
        interrupted, the room is the next waiter's; failed, its caller waits instead."""
        self.building_overflow -= 1
        if interrupted:
            self._pass_overflow_room()

    def give_up(self, waiter: W) -> bool:
        """A waiter's time is up: take it out of the queue, unless it was handed something
        between its wait ending and this call; whether it left empty-handed."""
        left = self.queue.leave(waiter)
        if left:
            self.timeouts += 1
        return left

    def withdraw(self, waiter: W) -> Slot | None:
        """Take back what a waiter interrupted mid-wait was given; the slot it held, if any."""
        slot = waiter.slot
        if slot is not None:
            slot.out = False
            self.put_back(slot)
            return slot
        if waiter.build:
            self.building_overflow -= 1
            self._pass_overflow_room()
        else:
            self.queue.leave(waiter)
        return None

    # -- taking back -------------------------------------------------------------------

    def take_back(self, agent: Any) -> Slot:
        """Take back a lent ``agent``; its slot, with ``retired`` set if it leaves.

        Raises:
            NotCheckedOut: ``agent`` is not lent by this pool; nothing changed.
        """
        # release(), inlined: a method call is a measurable share of a 1 us cycle.
        slot = self.slots.get(id(agent))
        if slot is None or slot.agent is not agent or not slot.out:
            raise not_checked_out(self.name, agent)
        slot.out = False  # a second checkin fails from here on
        if (self._plain_checkin and not self.waiters and not slot.overflow
                and agent.broken is None and not self.closed and not self.shrinking):
            # The common case, kept short: back to the idle agents.
            self.checkins += 1
            self.idle.append(slot)
            return slot
        return self.put_back(slot)

    def release(self, agent: object) -> Slot:
        """Mark a lent ``agent`` returned (a second checkin fails from here on); its slot.

        Raises:
            NotCheckedOut: ``agent`` is not lent by this pool; nothing changed.
        """
        slot = self.slots.get(id(agent))
        if slot is None or slot.agent is not agent or not slot.out:
            raise not_checked_out(self.name, agent)
        slot.out = False
        return slot

    def put_back(self, slot: Slot) -> Slot:
        """Decide what becomes of a released slot: back, to a waiter, or retired."""
        self.checkins += 1
        reason = self._retire_reason(slot)
        if reason is not None:
            self._retire(slot, reason)
            self.shrinking = self.base_count() > self.size
            return slot
        if self._stamping:
            # Also before a hand-over: an agent passed from caller to caller was never
            # idle, so health_check_interval must not count from its last idle spell.
            slot.returned = self._clock()
        if self.waiters:
            self._hand_over(slot)
        elif slot.overflow and self.options.overflow_ttl <= 0:
            # Overflow is for bursts: with nobody waiting it goes, never a base agent.
            self._remove(slot)
            self.dismissed += 1
            slot.retired = DISMISSED
        else:
            self.idle.append(slot)
        return slot

    def abandon(self, agent: object, reason: str) -> Slot | None:
        """Retire a lent agent still busy with overrunning work (it is not checked in);
        its slot, or ``None`` if it is not lent (any more)."""
        slot = self.slots.get(id(agent))
        if slot is None or not slot.out:
            return None
        self._retire(slot, reason)
        return slot

    # -- building and closing ----------------------------------------------------------

    def start(self) -> bool:
        """Mark the pool started; whether it was not yet (its base agents are then due).
        Raises PoolClosed if it was closed."""
        if self.closed:
            raise PoolClosed(f"pool {self.name!r} is closed", self.name)
        if self.started:
            return False
        self.started = True
        self.replacing = self.size
        return True

    def place(self, slot: Slot) -> bool:
        """Add a rebuilt base agent: to the oldest waiter, or to the idle agents; ``False``
        when it is not wanted (the pool closed, or shrank while it was built)."""
        self.replacing -= 1
        if self.closed or self.base_count() >= self.size:
            return False
        self._add(slot)
        if self.waiters:
            self._hand_over(slot)
        else:
            self.idle.append(slot)
        return True

    def rebuild_stopped(self) -> None:
        """A base agent will not be built after all: the pool closed while retrying."""
        self.replacing -= 1

    def close(self, error: BaseException) -> list[Slot]:
        """Close: every waiter gets ``error``; returns the idle slots (to tear down).
        Checked-out agents are retired as ``CLOSED`` when they come back."""
        self.closed = True
        idle = list(self.idle)
        self.idle.clear()
        for slot in idle:
            self._remove(slot)
            slot.retired = CLOSED
        self.queue.fail_all(error)
        return idle

    def resize(self, options: PoolOptions) -> tuple[int, list[Slot]]:
        """Adopt a new size and max_overflow; how many base agents to build, and the
        surplus idle slots (dismissed: to tear down). Raises PoolClosed if it was closed."""
        if self.closed:
            raise PoolClosed(f"pool {self.name!r} is closed", self.name)
        self.options, self.size, self.max_overflow = (
            options, options.size, options.max_overflow)
        missing = max(self.size - self.base_count(), 0)
        self.replacing += missing
        surplus = self._surplus_idle()
        self.shrinking = self.base_count() > self.size
        return missing, surplus

    def expired_overflow(self) -> list[Slot]:
        """Dismiss overflow agents idle for ``overflow_ttl`` seconds; their slots."""
        ttl = self.options.overflow_ttl
        now = self._clock()
        expired = [slot for slot in self.idle if slot.overflow and now - slot.returned >= ttl]
        for slot in expired:
            self._dismiss_idle(slot)
        return expired

    def hand_back(self) -> int:
        """Give every waiter (and every later would-be waiter) HandedBack; how many."""
        self.handing_back = True
        return self.queue.fail_all(handed_back(self.name))

    # -- numbers -----------------------------------------------------------------------

    def take_woken(self) -> list[W]:
        """The waiters served since the last call, for the caller to wake."""
        woken = self.woken[:]  # the queue's own list (one call less on every hand-over)
        self.woken.clear()
        return woken

    def overflow_room(self) -> bool:
        """Whether an overflow agent may be built now."""
        return self.overflow + self.building_overflow < self.max_overflow

    def base_count(self) -> int:
        """Base agents alive or being built."""
        return len(self.slots) - self.overflow + self.replacing

    def numbers(self) -> dict[str, Any]:
        """The lending numbers now, consistent with each other: those of a pool's status,
        with the lending counters under ``counters``."""
        available = len(self.idle)
        return {
            "state": "ready" if available else "overflow" if self.overflow_room() else "full",
            "size": self.size, "max_overflow": self.max_overflow, "available": available,
            "overflow": self.overflow, "checked_out": len(self.slots) - available,
            "waiting": len(self.waiters), "replacing": self.replacing,
            "counters": {
                "checkouts": self.checkouts, "checkins": self.checkins,
                "timeouts": self.timeouts, "exhausted": self.exhausted,
                "overflow_created": self.overflow_created, "dismissed": self.dismissed,
                "replacements": self.replacements}}

    # -- inside ------------------------------------------------------------------------

    def _lend(self, slot: Slot) -> Slot:
        slot.out = True
        slot.uses += 1
        slot.lent_at = _now()
        self.checkouts += 1
        return slot

    def _hand_over(self, slot: Slot) -> None:
        self.queue.give(self._lend(slot))

    def _pass_overflow_room(self) -> None:
        # Room for an overflow agent is free again: without this the first waiter would
        # wait for a checkin (maybe forever) while the pool could serve it. Not when a
        # resize left more overflow agents than max_overflow: that room is gone.
        if self.waiters and not self.closed and self.overflow_room():
            self.building_overflow += 1
            self.queue.give_room()

    def _retire_reason(self, slot: Slot) -> str | None:
        if self.closed:
            return CLOSED
        if self._surplus(slot):
            return DISMISSED
        reason = slot.broken_reason()
        if reason is None and self._recycling:
            reason = slot.worn_out(self._clock(), self.options.max_uses, self.options.max_age)
        return reason

    def _surplus(self, slot: Slot) -> bool:
        """Whether a returned agent is one more than the (resized) pool keeps."""
        if slot.overflow:
            return self.overflow > self.max_overflow
        return self.base_count() > self.size

    def _retire(self, slot: Slot, reason: str) -> None:
        """Take a slot out of the pool for good, recording what becomes of it."""
        self._remove(slot)
        if self.closed:
            slot.retired = CLOSED
        elif slot.overflow or reason == DISMISSED:
            self.dismissed += 1
            slot.retired = DISMISSED
        else:
            self.replacing += 1
            self.replacements += 1
            slot.retired = reason

    def _add(self, slot: Slot) -> None:
        self.slots[id(slot.agent)] = slot
        if slot.overflow:
            self.overflow += 1

    def _remove(self, slot: Slot) -> None:
        del self.slots[id(slot.agent)]
        if slot.overflow:
            self.overflow -= 1
            self._pass_overflow_room()

    def _dismiss_idle(self, slot: Slot) -> None:
        self.idle.remove(slot)
        self._remove(slot)
        self.dismissed += 1
        slot.retired = DISMISSED

    def _surplus_idle(self) -> list[Slot]:
        """Dismiss idle agents beyond the size (and overflow beyond max_overflow)."""
        surplus: list[Slot] = []
        base_extra = self.base_count() - self.size
        overflow_extra = self.overflow - self.max_overflow
        for slot in list(self.idle):
            if slot.overflow and overflow_extra > 0:
                overflow_extra -= 1
            elif not slot.overflow and base_extra > 0:
                base_extra -= 1
            else:
                continue
            self._dismiss_idle(slot)
            surplus.append(slot)
        return surplus


def handed_back(pool: str) -> HandedBack:
    """The error of a caller the pool hands back (its node takes no more work)."""
    return HandedBack(f"pool {pool!r} is handing its waiting calls back: its node takes no "
                      "more work", pool)


def not_checked_out(pool: str, agent: object) -> NotCheckedOut:
    """The error of a checkin of an agent the pool did not lend (or took back already)."""
    return NotCheckedOut(f"pool {pool!r}: {agent!r} is not checked out from this pool "
                         "(already checked in, or never handed out by it)", pool)
