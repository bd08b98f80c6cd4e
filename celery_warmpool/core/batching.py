"""Batching: concurrent calls to one :class:`BatchAction` run as one batch.

A batch opens with its first signal and closes when it holds ``max_batch_size`` signals,
or when ``batch_wait_timeout`` seconds have passed and an agent is free to run it: while
every agent is busy, it keeps filling. The caller whose signal opened it runs it on one
agent and hands every other caller its own outcome; the signals that arrive after it
closed open the next batch. A signal whose ``timeout`` passes
before its batch gets an agent is answered with :class:`CheckoutTimeout` and never runs.

This is the in-process side (threads or greenlets calling :meth:`AgentPool.call`); in a
Celery worker the messages of a pool are grouped before they reach a process (see
``celery_warmpool.worker.batches``), with :class:`BatchWindow` deciding when.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .action import BatchAction
from .errors import CallTimeout, CheckoutTimeout, PoolExhausted, WarmPoolError
from .reply import AgentReply
from .signal import Signal

if TYPE_CHECKING:
    from .pool import AgentPool

__all__ = ["BatchWindow", "Batcher"]


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

    __slots__ = ("arrived", "call_timeout", "deadline", "done", "event", "outcome")

    def __init__(self, event: Signal, deadline: float | None,
                 call_timeout: float | None) -> None:
        self.arrived = time.monotonic()
        self.event = event
        self.deadline = deadline
        self.call_timeout = call_timeout
        self.done = threading.Event()
        self.outcome: AgentReply | BaseException | None = None

    def finish(self, outcome: AgentReply | BaseException) -> None:
        self.outcome = outcome
        self.done.set()


class _Batch:
    """The items of one batch while it fills."""

    __slots__ = ("items", "window")

    def __init__(self, action: BatchAction) -> None:
        self.items: list[_Item] = []
        self.window = BatchWindow(action)


class Batcher:
    """Groups one pool's concurrent calls to one batch action (see the module)."""

    def __init__(self, pool: AgentPool[Any], action: BatchAction) -> None:
        self.pool = pool
        self.action = action
        self._ready = threading.Condition(threading.Lock())
        #: The batch callers join now; a full one is closed at once, so that the next
        #: caller opens (and leads) the next batch.
        self._filling: _Batch | None = None

    def call(self, event: Signal, timeout: float | None,
             call_timeout: float | None = None) -> AgentReply:
        """Handle ``event`` in a batch; return its reply or raise its error.

        ``call_timeout`` bounds the batch it runs in (the shortest of its callers').

        Raises:
            CheckoutTimeout: no agent was free for its batch within ``timeout``.
            CallTimeout: its batch overran; the agent is replaced.
            ActionFailed, InvalidSignal: for this signal alone.
        """
        item = _Item(event, None if timeout is None else time.monotonic() + timeout,
                     call_timeout)
        with self._ready:
            batch, leads = self._filling, self._filling is None
            if batch is None:
                batch = self._filling = _Batch(self.action)
            batch.items.append(item)
            if batch.window.add():
                self._filling = None
                self._ready.notify_all()
            elif leads:
                self._wait_until_due(batch)
        if leads:
            self._run(batch)
        item.done.wait()
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        assert item.outcome is not None
        return item.outcome

    def _wait_until_due(self, batch: _Batch) -> None:
        """As its leader: wait until ``batch`` is full or its wait is over."""
        while self._filling is batch:
            remaining = batch.window.remaining()
            if remaining <= 0:
                return
            self._ready.wait(remaining)

    def _close(self, batch: _Batch) -> list[_Item]:
        with self._ready:
            if self._filling is batch:
                self._filling = None
            return list(batch.items)

    def _run(self, batch: _Batch) -> None:
        """Get an agent, close ``batch``, run it; every caller gets its outcome."""
        try:
            agent = self._agent_for(batch)
        except BaseException as exc:
            _finish_all(self._close(batch), exc)
            if not isinstance(exc, Exception):
                raise
            return
        live = self._in_time(self._close(batch))
        if not live:  # every one of them came too late
            self.pool.checkin(agent)
            return
        bounds = [item.call_timeout for item in live if item.call_timeout is not None]
        label = f"a batch of {len(live)} {self.action.name!r} signals"
        try:
            outcomes: list[AgentReply | WarmPoolError] = self.pool.run_timeboxed(
                agent, lambda: self.pool.run_batch(agent, [item.event for item in live]),
                label, min(bounds) if bounds else None)
        except CallTimeout as exc:  # the agent was abandoned: it is not checked in
            _finish_all(live, exc)
            return
        except BaseException as exc:
            self.pool.checkin(agent)
            _finish_all(live, exc)
            raise
        self.pool.checkin(agent)
        for item, outcome in zip(live, outcomes, strict=True):
            item.finish(outcome)

    def _agent_for(self, batch: _Batch) -> Any:
        """An agent at once if one is free; else wait for one while the batch keeps filling."""
        try:
            return self.pool.checkout(block=False)
        except PoolExhausted:
            pass
        deadlines = [item.deadline for item in batch.items]
        timeout = (None if None in deadlines
                   else max(0.0, max(d for d in deadlines if d is not None) - time.monotonic()))
        return self.pool.checkout(timeout=timeout)

    def _in_time(self, items: list[_Item]) -> list[_Item]:
        """The items whose deadline has not passed; the others are answered."""
        now = time.monotonic()
        live = []
        for item in items:
            if item.deadline is not None and item.deadline < now:
                waited = now - item.arrived
                item.finish(CheckoutTimeout(
                    f"pool {self.pool.name!r}: no agent free for the batch after waiting "
                    f"{waited:.3f}s; the signal was not run", self.pool.name, waited,
                    self.pool.size, self.pool.max_overflow))
            else:
                live.append(item)
        return live


def _finish_all(items: list[_Item], outcome: BaseException) -> None:
    for item in items:
        item.finish(outcome)
