"""Batching: concurrent calls to one :class:`BatchAction` run as one batch.

A batch opens with its first signal and closes when it holds ``max_batch_size`` signals,
or when ``batch_wait_timeout`` seconds have passed and an agent is free to run it: while
every agent is busy, it keeps filling. The caller whose signal opened it leads it: it
gets an agent, runs the batch on it and hands every other caller its own outcome; the
signals that arrive after it closed open the next batch.

Each caller waits within its own ``timeout`` and no longer, whoever else is in the batch:

- a follower whose ``timeout`` passes before its batch has an agent leaves it at that
  moment with :class:`CheckoutTimeout`; its signal never runs;
- a leader waits for the batch to fill and for an agent within its own ``timeout`` only;
  past it, it fails with :class:`CheckoutTimeout` and hands the lead to the oldest
  follower still in time (which goes on waiting within its own), or, if there is none,
  answers those left with :class:`CheckoutTimeout` too;
- a leader interrupted (``KeyboardInterrupt``, a time limit, any ``BaseException``)
  before the batch runs hands it on the same way; interrupted while the batch runs, it
  answers every follower with :class:`ActionFailed` (the batch may have run in part).
  No follower is ever left waiting for a leader that is gone.

In a pool with ``max_models`` a batch holds the signals of one model only: each model
has its own batch filling, run on an agent holding that model.

This is the in-process side (threads or greenlets calling ``AgentPool.call``); in a
Celery worker the messages of a pool are grouped before they reach a process (see
``celery_warmpool.worker.batches``), with :class:`BatchWindow` deciding when.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .action import BatchAction
from .agent import Agent
from .errors import ActionFailed, CallTimeout, CheckoutTimeout, PoolExhausted, WarmPoolError
from .lease import Lender
from .reply import AgentReply
from .signal import Signal

__all__ = ["BatchWindow", "Batcher"]

AgentT = TypeVar("AgentT", bound=Agent[Any])
#: Runs a batch's signals on a lent agent within a call_timeout, for a model (AgentWork's).
RunBatch = Callable[[AgentT, list[Signal], str, float | None, str | None],
                    list[AgentReply | WarmPoolError]]


class BatchWindow:
    """When a batch of one action closes: full, or its first item has waited long enough."""

    def __init__(self, action: BatchAction, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = action.max_batch_size
        self.wait = float(action.batch_wait_timeout)
        self._clock = clock
        self.opened_at: float | None = None
        self.count = 0

    def add(self) -> bool:
        """Count one more item; say whether the batch is now full."""
        if self.count == 0:
            self.opened_at = self._clock()
        self.count += 1
        return self.count >= self.size

    def remaining(self) -> float:
        """Seconds until the batch closes by time (0 once due)."""
        if self.opened_at is None:
            return self.wait
        return max(0.0, self.opened_at + self.wait - self._clock())

    def reset(self) -> None:
        """Start the next batch."""
        self.opened_at, self.count = None, 0


class _Item:
    """One caller's signal in a batch, and what became of it."""

    __slots__ = ("arrived", "call_timeout", "deadline", "event", "outcome", "promoted", "woken")

    def __init__(self, event: Signal, deadline: float | None,
                 call_timeout: float | None) -> None:
        self.arrived = time.monotonic()
        self.event = event
        self.deadline = deadline
        self.call_timeout = call_timeout
        #: Set once it has its outcome, or was handed the lead of its batch.
        self.woken = threading.Event()
        self.outcome: AgentReply | BaseException | None = None
        self.promoted = False

    def remaining(self) -> float | None:
        """Seconds left to its deadline (0 once past), or ``None`` without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def in_time(self, now: float) -> bool:
        """Whether its deadline has not passed at ``now``."""
        return self.deadline is None or self.deadline >= now

    def finish(self, outcome: AgentReply | BaseException) -> None:
        """Give it its outcome and let its caller go."""
        self.outcome = outcome
        self.woken.set()

    def promote(self) -> None:
        """Hand it the lead of its batch."""
        self.promoted = True
        self.woken.set()

    def result(self) -> AgentReply:
        """Its reply, or raise its error."""
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome


class _Batch:
    """The callers of one batch still waiting for it to run (its leader first)."""

    __slots__ = ("items", "model", "running", "window")

    def __init__(self, action: BatchAction, model: str | None) -> None:
        self.model = model
        self.items: list[_Item] = []
        self.window = BatchWindow(action)
        #: Whether it has an agent: from then on no caller leaves it.
        self.running = False


class Batcher(Generic[AgentT]):
    """Groups one pool's concurrent calls to one batch action (see the module).

    Arguments:
        lender: lends the agents batches run on.
        action: the batch action.
        run: runs a batch's signals on a lent agent within a call_timeout.
    """

    def __init__(self, lender: Lender[AgentT], action: BatchAction,
                 run: RunBatch[AgentT]) -> None:
        self.lender = lender
        self.action = action
        self._run_batch = run
        #: Guards which batch is filling and every batch's items; notified when the
        #: filling batch is full.
        self._ready = threading.Condition(threading.Lock())
        #: The batch callers join now, by model (``None`` outside a multiplexed pool); a
        #: full one is closed at once, so that the next caller opens (and leads) the next.
        self._filling: dict[str | None, _Batch] = {}

    def call(self, event: Signal, timeout: float | None,
             call_timeout: float | None = None, model: str | None = None) -> AgentReply:
        """Handle ``event`` in a batch (of ``model``'s signals only); return its reply or
        raise its error.

        ``timeout`` bounds this caller's wait for its batch to get an agent, whatever
        the others' are; ``call_timeout`` bounds the batch it runs in (the shortest of
        its callers').

        Raises:
            CheckoutTimeout: no agent was free for its batch within ``timeout``; its
                signal did not run.
            CallTimeout: its batch overran; the agent is replaced.
            ActionFailed, InvalidSignal: for this signal alone (or the batch's leader
                was interrupted while it ran).
        """
        item = _Item(event, None if timeout is None else time.monotonic() + timeout,
                     call_timeout)
        with self._ready:
            batch = self._filling.get(model)
            leads = batch is None
            if batch is None:
                batch = self._filling[model] = _Batch(self.action, model)
            batch.items.append(item)
            if batch.window.add():
                del self._filling[model]
                self._ready.notify_all()
        if leads or self._follow(batch, item):
            self._lead(batch, item)
        return item.result()

    def pending(self) -> int:
        """Callers waiting for their batch to run (leaders included), every model's."""
        with self._ready:
            return sum(len(batch.items) for batch in self._filling.values())

    # -- following ---------------------------------------------------------------------

    def _follow(self, batch: _Batch, item: _Item) -> bool:
        """Wait for the outcome, or the lead (say so), or leave at the deadline."""
        if not item.woken.wait(item.remaining()):
            with self._ready:
                if not (item.woken.is_set() or batch.running):
                    # Not run, and now never: out of the batch before anyone runs it.
                    batch.items.remove(item)
                    item.finish(self._timed_out(item))
                    return False
            item.woken.wait()  # handed something meanwhile, or its batch runs already
        return item.outcome is None

    # -- leading -----------------------------------------------------------------------

    def _lead(self, batch: _Batch, item: _Item) -> None:
        """Get an agent for ``batch`` within this caller's deadline, run it, answer all."""
        try:
            self._wait_until_due(batch, item)
            agent = self._agent_within(item, batch.model)
        except BaseException as exc:
            self._hand_on(batch, item)
            if not isinstance(exc, CheckoutTimeout):
                raise
            item.finish(self._timed_out(item))
            return
        live = self._close(batch, item)
        try:
            outcomes = self._run_batch(
                agent, [each.event for each in live],
                f"a batch of {len(live)} {self.action.name!r} signals",
                min((each.call_timeout for each in live if each.call_timeout is not None),
                    default=None), batch.model)
        except CallTimeout as exc:  # the agent was abandoned: it is not checked in
            _finish_all(live, exc)
            return
        except BaseException as exc:
            self.lender.checkin(agent)
            _finish_all(live, exc if isinstance(exc, Exception) else self._interrupted(exc))
            raise
        self.lender.checkin(agent)
        for each, outcome in zip(live, outcomes, strict=True):
            each.finish(outcome)

    def _wait_until_due(self, batch: _Batch, item: _Item) -> None:
        """Wait until ``batch`` is full or its wait is over, or the leader's deadline."""
        with self._ready:
            while self._filling.get(batch.model) is batch:
                due, own = batch.window.remaining(), item.remaining()
                wait = due if own is None else min(due, own)
                if wait <= 0:
                    return
                self._ready.wait(wait)

    def _agent_within(self, item: _Item, model: str | None) -> AgentT:
        """An agent (holding ``model``) at once if one is free; else wait for one until
        ``item``'s deadline (the batch keeps filling meanwhile).

        Raises:
            CheckoutTimeout: none came free in time.
            ModelLoadFailed: ``model`` failed to load.
        """
        try:
            return self.lender.checkout(block=False, model=model)
        except PoolExhausted:
            pass
        return self.lender.checkout(timeout=item.remaining(), model=model)

    def _close(self, batch: _Batch, leader: _Item) -> list[_Item]:
        """Close ``batch`` (its leader has an agent); the items to run, in the order they
        came (those past their deadline are answered instead)."""
        now = time.monotonic()
        with self._ready:
            batch.running = True
            if self._filling.get(batch.model) is batch:
                del self._filling[batch.model]
            live = []
            for each in batch.items:
                if each is leader or each.in_time(now):  # the leader got its agent in time
                    live.append(each)
                else:  # past its deadline and not yet gone: it is answered here
                    each.finish(self._timed_out(each))
            return live

    def _hand_on(self, batch: _Batch, leader: _Item) -> None:
        """The leader leaves before the batch ran: the oldest follower in time leads it,
        or, with none in time, every follower left is answered with CheckoutTimeout."""
        now = time.monotonic()
        with self._ready:
            batch.items.remove(leader)
            successor = next((each for each in batch.items if each.in_time(now)), None)
            if successor is not None:
                successor.promote()
                return
            if self._filling.get(batch.model) is batch:
                del self._filling[batch.model]  # nobody leads it: the next caller opens another
            late, batch.items = batch.items, []
        for each in late:
            each.finish(self._timed_out(each))

    def _timed_out(self, item: _Item) -> CheckoutTimeout:
        waited = time.monotonic() - item.arrived
        return CheckoutTimeout(
            f"pool {self.lender.name!r}: no agent free for the batch after waiting "
            f"{waited:.3f}s; the signal was not run", self.lender.name, waited,
            self.lender.size, self.lender.max_overflow)

    def _interrupted(self, exc: BaseException) -> ActionFailed:
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return ActionFailed(
            f"pool {self.lender.name!r}: the batch of {self.action.name!r} this signal was "
            f"in was interrupted while it ran ({cause}); the signal may have run",
            None, self.action.name, cause)


def _finish_all(items: list[_Item], outcome: BaseException) -> None:
    for item in items:
        item.finish(outcome)
