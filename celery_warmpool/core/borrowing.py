"""Borrowing: how a checkout that found no idle agent gets one, and how one is vetted.

The lending policy answers such a checkout with a place in the queue, room to build an
overflow agent, or "exhausted"; this module carries the answer out after the pool's lock
is released: it waits to be handed an agent (within the caller's timeout), has the
supervisor build the overflow agent, and asks a just-lent agent's ``check_health()``
when the policy says it is due. It is :class:`~.pool.AgentPool`'s slow path; the common
case (an idle agent, nothing to vet) never comes here.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal

from . import telemetry
from .errors import CheckoutTimeout, PoolExhausted
from .lending import BUILD, CHECK_HEALTH, EXHAUSTED, LendingPolicy
from .slot import Slot
from .supervisor import Supervisor, wake
from .waiters import Waiter

__all__ = ["BlockingWaiter", "Borrowing"]

logger = logging.getLogger(__name__)
_now = time.monotonic


class BlockingWaiter(Waiter):
    """A waiter its caller blocks on until the pool wakes it."""

    __slots__ = ("ready",)

    def __init__(self) -> None:
        super().__init__()
        # A bare lock, taken now and released by whoever serves the waiter: cheaper to
        # wait on and to wake than a threading.Event (a condition over a lock).
        self.ready = threading.Lock()
        self.ready.acquire()

    def wake(self) -> None:
        """Let the waiter go; called once, after it was served."""
        self.ready.release()

    def wait(self, timeout: float | None) -> bool:
        """Wait to be woken, at most ``timeout`` seconds; say whether it was."""
        return self.ready.acquire(timeout=-1 if timeout is None else timeout)


class Borrowing:
    """A pool's checkouts that wait, build or vet (see the module).

    Arguments:
        name: the pool's name (errors, log lines).
        lock: the pool's lock, which guards ``policy``.
        policy: decides; this carries its answers out.
        supervisor: builds overflow agents and disposes of refused ones.
        hooks: the pool's telemetry.
    """

    def __init__(self, name: str, lock: threading.Lock, policy: LendingPolicy[BlockingWaiter],
                 supervisor: Supervisor[Any], hooks: telemetry.PoolHooks) -> None:
        self.name = name
        self._lock = lock
        self._policy = policy
        self._supervisor = supervisor
        self._hooks = hooks

    def checkout(self, block: bool, timeout: float | None, started: float) -> Slot:
        """Lend an agent once none was idle (or the idle one failed its vetting).

        Raises:
            PoolExhausted, CheckoutTimeout, PoolClosed, PoolError, HandedBack: as
            :meth:`AgentPool.checkout <.pool.AgentPool.checkout>`.
        """
        overflow_allowed, exhausted = True, False
        while True:
            with self._lock:
                plan = self._policy.lend(block, overflow_allowed, count_exhausted=not exhausted)
            if isinstance(plan, BlockingWaiter):
                exhausted = True
                self._sent_exhausted(blocking=True)
                plan = self._wait(plan, started, timeout)
            elif plan == EXHAUSTED:
                self._sent_exhausted(blocking=False)
                policy = self._policy
                raise PoolExhausted(
                    f"pool {self.name!r} is exhausted: all {policy.size} agents and "
                    f"{policy.max_overflow} overflow agents are checked out",
                    self.name, policy.size, policy.max_overflow)
            if not isinstance(plan, Slot):  # room reserved for an overflow agent
                built = self._supervisor.build_overflow()
                if built is None:  # its setup failed: wait for an agent instead
                    overflow_allowed = False
                    continue
                plan = built
            if self._policy.vetting and not self.vet(plan):
                continue  # too old or unhealthy: retired; try again within the same deadline
            if self._hooks.agent_checkout:
                self._hooks.send(telemetry.agent_checkout, agent=plan.agent,
                                 overflow=plan.overflow, wait=_now() - started)
            return plan

    def vet(self, slot: Slot) -> bool:
        """Check a just-lent agent's age and health; retire it and say no if it fails."""
        reason = self._policy.vet(slot)
        if reason == CHECK_HEALTH:
            reason = None if self._healthy(slot.agent) else "failed health check"
        if reason is None:
            return True
        with self._lock:
            self._policy.refuse(slot, reason)
            woken = self._policy.take_woken()
        wake(woken)
        self._supervisor.dispose(slot)
        return False

    def _healthy(self, agent: Any) -> bool:
        try:
            return bool(agent.check_health())
        except Exception as exc:
            logger.warning("pool %r: check_health() of %r raised %r", self.name, agent, exc)
            return False

    def _wait(self, waiter: BlockingWaiter, started: float,
              timeout: float | None) -> Slot | Literal["build"]:
        """Wait for a hand-over: an agent, or leave to build one (room reserved for it).

        Raises:
            CheckoutTimeout: nothing came within ``timeout`` seconds of ``started``.
            PoolClosed, HandedBack: the pool was closed, or hands its waiters back.
        """
        remaining = None if timeout is None else max(0.0, started + timeout - _now())
        try:
            woken = waiter.wait(remaining)
        except BaseException:
            self._withdraw(waiter)
            raise
        if not woken:
            with self._lock:
                # An agent (or room) may have been handed over between the wait ending and
                # the lock: then the caller takes it, so no hand-over is lost.
                timed_out = self._policy.give_up(waiter)
            if timed_out:
                raise self._timed_out(started, timeout)
        if waiter.error is not None:
            raise waiter.error
        return waiter.slot if waiter.slot is not None else BUILD

    def _withdraw(self, waiter: BlockingWaiter) -> None:
        """Take back what a waiter interrupted mid-wait (a time limit, Ctrl-C) was given."""
        with self._lock:
            slot = self._policy.withdraw(waiter)
            woken = self._policy.take_woken()
        wake(woken)
        if slot is not None and slot.retired is not None:
            self._supervisor.dispose(slot)

    def _timed_out(self, started: float, timeout: float | None) -> CheckoutTimeout:
        waited = _now() - started
        if self._hooks.checkout_timeout:
            self._hooks.send(telemetry.checkout_timeout, waited=waited, timeout=timeout)
        size, max_overflow = self._policy.size, self._policy.max_overflow
        return CheckoutTimeout(
            f"pool {self.name!r}: no agent free after waiting {waited:.3f}s (timeout "
            f"{timeout}s; size {size}, max_overflow {max_overflow}, all checked out)",
            self.name, waited, size, max_overflow)

    def _sent_exhausted(self, blocking: bool) -> None:
        if self._hooks.pool_exhausted:
            self._hooks.send(telemetry.pool_exhausted, blocking=blocking,
                             waiting=len(self._policy.waiters))
