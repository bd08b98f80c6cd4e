"""AgentPool: a thread-safe, in-process pool of warm agents. It imports nothing of Celery.

The pool keeps every live agent in a slot. A checkout takes an idle one, builds an
overflow agent when there is room, or queues the caller; a checkin hands the agent to the
oldest waiter, puts it back, or retires it (broken, worn out, surplus overflow). Every
decision is made under one lock, and everything slow (``setup()``, ``reset()``,
``teardown()``, telemetry) runs outside it.

This module lends agents; what is done with a lent agent (a call, a transaction, a
batch, a stream, within a time bound) is :mod:`.work`'s, reached through the pool's
methods of those names. Counters stay here, where ``status()`` reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Generic, Literal, Self, TypeVar

from . import telemetry
from .agent import Agent
from .arguments import checkout_timeout, flag, local_timeouts, signal_list
from .cancellation import NEVER, Cancellation
from .errors import (
    CallTimeout,
    CheckoutTimeout,
    HandedBack,
    NotCheckedOut,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolStartError,
    WarmPoolError,
)
from .monitor import PoolMonitor
from .reply import AgentReply
from .signal import Signal
from .spec import PoolSpec, validate_options
from .status import PoolCounters, PoolState, PoolStatus
from .stream import Stream
from .work import AgentWork, Lease

__all__ = ["AgentPool"]

logger = logging.getLogger(__name__)
#: The clock of the hot paths, looked up once (a measurable share of a 1 us cycle).
_now = time.monotonic

AgentT = TypeVar("AgentT", bound=Agent[Any])
R = TypeVar("R")

#: How often ``start()`` retries one agent's failing ``setup()`` before giving up on it.
START_ATTEMPTS = 3
#: Back-off between setup attempts: first delay and cap, in seconds (doubling between).
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0

_COUNTERS = tuple(PoolCounters.model_fields)

#: What becomes of a slot that left the pool: torn down only ("closed"), dismissed
#: without a replacement ("dismissed"), or replaced (any other text: the reason).
CLOSED: Final = "closed"
DISMISSED: Final = "dismissed"
#: ``from_spec`` without ``shared``: run the agent class's ``preload``.
_PRELOAD: Final = object()
#: A checkout's plan, besides an agent or a place in the queue.
_BUILD: Final = "build"
_EXHAUSTED: Final = "exhausted"


class _Slot:
    """One live agent and the pool's bookkeeping about it."""

    __slots__ = ("agent", "created", "lent_at", "out", "overflow", "returned", "uses")

    def __init__(self, agent: Any, overflow: bool, now: float) -> None:
        self.agent = agent
        self.overflow = overflow
        self.created = now  # on the pool's clock: max_age
        self.returned = now  # on the pool's clock: health checks, overflow_ttl
        self.lent_at = 0.0  # time.monotonic(): how long it was held
        self.uses = 0
        self.out = False


class _Waiter:
    """A caller queued for an agent; served first come, first served.

    It is woken with an agent (``slot``), an error, or leave to build an overflow agent
    (``build``: room freed while it waited, already reserved for it).
    """

    __slots__ = ("build", "error", "ready", "slot")

    def __init__(self) -> None:
        # A bare lock, taken now and released by whoever serves the waiter: cheaper to
        # wait on and to wake than a threading.Event (a condition over a lock).
        self.ready = threading.Lock()
        self.ready.acquire()
        self.slot: _Slot | None = None
        self.error: BaseException | None = None
        self.build = False

    @property
    def served(self) -> bool:
        """Whether it was given anything (an agent, room to build one, or an error)."""
        return self.slot is not None or self.error is not None or self.build

    def wake(self) -> None:
        """Let the waiter go; called once, under the pool lock, as it leaves the queue."""
        self.ready.release()

    def wait(self, timeout: float | None) -> bool:
        """Wait to be woken, at most ``timeout`` seconds; say whether it was."""
        return self.ready.acquire(timeout=-1 if timeout is None else timeout)


_Plan = _Slot | _Waiter | Literal["build", "exhausted"]


class AgentPool(Generic[AgentT]):
    """A pool of warm agents, safe to share between threads (and greenlets).

    ``factory`` builds one agent (cheaply); the pool calls its ``setup()`` before the
    agent serves and ``teardown()`` when it is closed. Options are those of
    :class:`~celery_warmpool.core.spec.PoolOptions`::

        pool = AgentPool(SearchAgent, name="search", size=4, max_overflow=2)
        pool.start()
        with pool.agent(timeout=1.0) as agent:
            agent.handle(Signal.new("search.run", {"query": "pools"}))

    Errors are attributes of the class too, so callers catch what they meant:
    ``AgentPool.Exhausted``, ``AgentPool.Timeout``, ``AgentPool.Closed``.
    """

    Exhausted = PoolExhausted
    Timeout = CheckoutTimeout
    Closed = PoolClosed
    StartError = PoolStartError
    NotCheckedOut = NotCheckedOut

    def __init__(self, factory: Callable[[], AgentT], *, name: str = "pool",
                 node: str | None = None, clock: Callable[[], float] = time.monotonic,
                 shared: Any = None, process_index: int = 0, **options: Any) -> None:
        """Configure the pool; nothing is built until :meth:`start`.

        ``shared`` is given to every agent as ``agent.shared`` (what its class's
        ``preload`` returned), ``process_index`` as ``agent.process_index``.

        Raises:
            ConfigurationError: an option is unknown or invalid (names pool and field).
        """
        self.options = validate_options(name, options)
        self.name = name
        self.node = node
        self.shared = shared
        self.process_index = process_index
        self.size = self.options.size
        self.max_overflow = self.options.max_overflow
        self._factory = factory
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._slots: dict[int, _Slot] = {}  # every live agent, idle or out, by id()
        self._idle: deque[_Slot] = deque()
        self._take = self._idle.pop if self.options.strategy == "lifo" else self._idle.popleft
        self._waiters: deque[_Waiter] = deque()
        self._overflow = 0  # overflow slots among _slots: changed where slots come and go
        self._building_overflow = 0
        self._replacing = 0  # base agents being built in the background
        # Start builders that failed START_ATTEMPTS times; start() stops waiting for them.
        self._start_gave_up = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_error: str | None = None
        self._last_exception: BaseException | None = None
        self._agent_class: type[Agent[Any]] | None = None  # known once one is built
        self._started = False
        self._closed = False
        self._handing_back = False
        self._monitor: PoolMonitor | None = None
        # Precomputed so the common paths test one attribute, not several options.
        self._vetting = (self.options.max_age is not None
                         or self.options.health_check_interval is not None)
        self._recycling = self.options.max_uses is not None or self.options.max_age is not None
        self._stamping = (self.options.health_check_interval is not None
                          or self.options.overflow_ttl > 0)
        # A checkin with nothing to decide: no recycling, stamping or reset.
        self._resetting = self.options.reset_on_checkin
        self._plain_checkin = not (self._recycling or self._stamping or self._resetting)
        # Whether the pool may hold more base agents than its size (after a resize).
        self._shrinking = False
        self._work = AgentWork(self, clock)

    @classmethod
    def from_spec(cls, spec: PoolSpec, *, node: str | None = None,
                  clock: Callable[[], float] = time.monotonic, shared: Any = _PRELOAD,
                  process_index: int = 0) -> AgentPool[Agent[Any]]:
        """A pool built from a :class:`PoolSpec` (its agent class, state and options).

        Without ``shared``, the agent class's ``preload`` runs here, for this pool.
        """
        agent_class, initial, worker_opts = spec.agent, spec.initial_state, spec.worker_opts
        if shared is _PRELOAD:
            shared = agent_class.preload(dict(worker_opts or {}))

        def factory() -> Agent[Any]:
            return agent_class(initial, options=worker_opts)

        return AgentPool(factory, name=spec.name, node=node, clock=clock, shared=shared,
                         process_index=process_index, **spec.options.model_dump())

    def __repr__(self) -> str:
        return (f"<AgentPool {self.name!r} size={self.size} max_overflow={self.max_overflow} "
                f"out={self.checked_out} idle={len(self._idle)}>")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def checked_out(self) -> int:
        """Agents handed out and not yet back (derived from the slots)."""
        return len(self._slots) - len(self._idle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> Self:
        """Build ``size`` warm agents; return once all are warm.

        Agents are built in parallel. One whose ``setup()`` fails is retried with back-off;
        if some agents are warm when the others have failed ``START_ATTEMPTS`` times, the
        pool serves and keeps rebuilding the rest in the background.

        Raises:
            PoolStartError: no agent could be built, or none was warm within
                ``start_timeout`` seconds; the cause is attached.
        """
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed", self.name)
            if self._started:
                return self
            self._started = True
            self._replacing = self.size
        for index in range(self.size):
            self._spawn(self._rebuild, None, "start", name=f"warmpool-{self.name}-start-{index}")
        if self.options.overflow_ttl > 0:
            self._spawn(self._dismiss_loop, name=f"warmpool-{self.name}-overflow")
        warm, why = self._wait_until_built(time.monotonic() + self.options.start_timeout)
        if warm == 0:
            self.close()
            raise PoolStartError(
                f"pool {self.name!r} could not start: {why}; last error: "
                f"{self._last_error or 'none'}", self.name, self._last_error,
            ) from self._last_exception
        if warm < self.size:
            logger.warning(
                "pool %r serving with %d of %d agents warm; rebuilding the rest in the "
                "background (last error: %s)", self.name, warm, self.size, self._last_error)
        if self.options.monitor_interval is not None:
            self._monitor = PoolMonitor(self, self.options.monitor_interval, self._clock).start()
        return self

    def _wait_until_built(self, deadline: float) -> tuple[int, str]:
        """Wait for the start builders; return how many agents are warm, and if none, why."""
        with self._changed:
            # Until every builder is warm or has given up, not for a number of failures:
            # one agent failing for good must not hold start() to its timeout.
            while len(self._slots) + self._start_gave_up < self.size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            warm = len(self._slots)
            if self._closed:
                return warm, "it was closed while starting"
            if self._start_gave_up == self.size:
                return warm, f"every agent failed setup {START_ATTEMPTS} times"
            return warm, f"no agent was warm within start_timeout={self.options.start_timeout}s"

    def close(self) -> None:
        """Tear every agent down (each ``teardown()`` runs once). Safe to call twice.

        Idle agents are closed now; checked-out ones when they are checked in. Waiting
        callers get :class:`PoolClosed`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            idle = list(self._idle)
            self._idle.clear()
            for slot in idle:
                self._remove_locked(slot)
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = PoolClosed(f"pool {self.name!r} was closed", self.name)
                waiter.wake()
            self._changed.notify_all()
        if self._monitor is not None:
            self._monitor.stop()
        for slot in idle:
            self._teardown(slot.agent)

    # -- checkout and checkin ----------------------------------------------------------

    def checkout(self, block: bool = True, timeout: float | None = None) -> AgentT:
        """Take an agent out of the pool; give it back with :meth:`checkin`.

        Arguments:
            block: wait for an agent when none is free and no overflow room is left.
            timeout: the most seconds to wait (``None``: as long as it takes; ``0``: not
                at all), at most a day.

        Raises:
            InvalidArgument: ``block`` is not a bool, or ``timeout`` not such a number.
            PoolExhausted: ``block`` is false and no agent is free.
            CheckoutTimeout: no agent came free within ``timeout``.
            PoolClosed: the pool was closed.
            PoolError: the pool was never started.
        """
        # The common case inlined (an idle agent, nothing to vet): with the steps below
        # as method calls a cycle cost 1.9-2.1 us against 1.0-1.1 us inlined
        # (bench/local_pool.py, one thread). Hence the arguments are checked only when they
        # are not the defaults.
        if timeout is not None or block is not True:
            block, timeout = flag("block", block), checkout_timeout(timeout)
        with self._lock:
            if self._idle and not self._closed:
                slot: _Slot | None = self._take()
                slot.out = True  # type: ignore[union-attr]
                slot.uses += 1  # type: ignore[union-attr]
                slot.lent_at = started = _now()  # type: ignore[union-attr]
                self._counts["checkouts"] += 1
            else:
                slot, started = None, time.monotonic()
        if slot is None or (self._vetting and not self._vet(slot)):
            slot = self._checkout_slowly(block, timeout, started)
        if telemetry.agent_checkout.receivers:
            telemetry.agent_checkout.send(self, agent=slot.agent, overflow=slot.overflow,
                                          wait=time.monotonic() - started)
        agent: AgentT = slot.agent
        return agent

    def _checkout_slowly(self, block: bool, timeout: float | None, started: float) -> _Slot:
        """Lend an agent once none was idle (or the idle one failed its vetting)."""
        overflow_allowed, exhausted = True, False
        while True:
            with self._lock:
                plan = self._plan_locked(block, overflow_allowed, count_exhausted=not exhausted)
            if isinstance(plan, _Waiter):
                exhausted = True
                self._send_exhausted(blocking=True)
                plan = self._wait(plan, started, timeout)
            elif plan == _EXHAUSTED:
                self._send_exhausted(blocking=False)
                raise PoolExhausted(
                    f"pool {self.name!r} is exhausted: all {self.size} agents and "
                    f"{self.max_overflow} overflow agents are checked out",
                    self.name, self.size, self.max_overflow)
            if not isinstance(plan, _Slot):  # room reserved for an overflow agent
                built = self._lend_new_overflow()
                if built is None:  # its setup failed: wait for an agent instead
                    overflow_allowed = False
                    continue
                plan = built
            if self._vetting and not self._vet(plan):
                continue  # too old or unhealthy: retired; try again within the same deadline
            return plan

    def checkin(self, agent: AgentT) -> None:
        """Give back an agent that :meth:`checkout` handed out.

        A broken agent (see ``discard_on``), or one past ``max_uses`` or ``max_age``, is
        closed and replaced in the background; an overflow agent is dismissed (at once, or
        after ``overflow_ttl`` idle seconds); otherwise the agent goes to the oldest
        waiter or back to the idle agents.

        Raises:
            NotCheckedOut: the agent is not checked out from this pool (already checked
                in, or never handed out by it); nothing is changed.
        """
        with self._lock:
            slot = self._slots.get(id(agent))
            if slot is None or slot.agent is not agent or not slot.out:
                raise NotCheckedOut(
                    f"pool {self.name!r}: {agent!r} is not checked out from this pool "
                    "(already checked in, or never handed out by it)", self.name)
            # Not out any more: a second checkin of this agent fails from here on.
            slot.out = False
            held = _now() - slot.lent_at
            if (self._plain_checkin and not self._waiters and not slot.overflow
                    and agent.broken is None and not self._closed and not self._shrinking):
                # The common case inlined (see checkout): back to the idle agents.
                self._counts["checkins"] += 1
                self._idle.append(slot)
                fate = None
            elif not self._resetting:
                fate = self._return_locked(slot)
        if self._resetting:
            fate = self._reset_and_return(slot)
        if telemetry.agent_checkin.receivers:
            telemetry.agent_checkin.send(self, agent=agent, held=held)
        if fate is not None:
            self._dispose(slot, fate)

    @contextmanager
    def agent(self, block: bool = True, timeout: float | None = None) -> Iterator[AgentT]:
        """Check an agent out for the ``with`` block; it is always checked in.

        An exception in the block that matches ``discard_on`` marks the agent broken, so
        it is replaced rather than handed out again.
        """
        agent = self.checkout(block=block, timeout=timeout)
        with self.lent(agent):
            yield agent

    @contextmanager
    def lent(self, agent: AgentT) -> Iterator[Lease]:
        """Check ``agent`` (already checked out) in when the block ends, unless abandoned.

        An exception matching ``discard_on`` marks it broken first. Set
        ``lease.abandoned`` after :meth:`abandon` to skip the checkin.
        """
        lease = Lease()
        try:
            yield lease
        except BaseException as exc:
            agent.note_failure(exc)
            raise
        finally:
            if not lease.abandoned:
                self.checkin(agent)

    # -- running work (see the work module) ----------------------------------------------

    def call(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
             call_timeout: float | None = None) -> AgentReply:
        """Handle one signal on a checked-out agent (see :meth:`Agent.handle`).

        Arguments:
            timeout: the most seconds to wait for an agent.
            call_timeout: the most seconds the work may take; an agent that overruns is
                abandoned to finish in the background, then closed, and replaced.

        Raises:
            InvalidArgument: a timeout is not a number of seconds up to a day (see
                :mod:`.arguments`).
            CheckoutTimeout: no agent was free within ``timeout`` seconds.
            CallTimeout: the work overran ``call_timeout``.
            SignalError, ActionFailed: what :meth:`Agent.handle` raises.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self._work.call(signal, timeout=timeout, call_timeout=call_timeout)

    def transaction(self, signals: Iterable[Signal | Mapping[str, Any]], *,
                    timeout: float | None = None,
                    call_timeout: float | None = None) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing.

        Every signal is validated before any runs. If one fails, the agent's state is put
        back as it was before the first and the error is raised. ``call_timeout`` bounds
        the whole transaction. The arguments are checked as :meth:`call`'s are.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self._work.transaction(signal_list(signals), timeout=timeout,
                                      call_timeout=call_timeout)

    def stream(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
               call_timeout: float | None = None) -> Stream:
        """Check an agent out and stream ``signal`` on it, in the caller's thread.

        Iterating the :class:`Stream` runs the action; the agent is checked in once the
        stream ends, fails or is closed (``close()``, the ``with`` block's end, or the
        stream garbage collected after a ``break``).

        Arguments:
            timeout: the most seconds to wait for an agent.
            call_timeout: the most seconds the whole stream may take (on the pool's
                clock), checked as each chunk comes: past it the action's generator is
                closed, the iteration raises :class:`CallTimeout` and the agent is
                replaced.

        Raises:
            InvalidArgument, CheckoutTimeout: here; the rest (InvalidSignal, ActionFailed,
                CallTimeout) from the iteration.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self._work.stream(signal, timeout=timeout, call_timeout=call_timeout)

    def run_signals(self, agent: AgentT, events: list[Signal], *, transaction: bool = False,
                    cancellation: Cancellation = NEVER) -> list[AgentReply]:
        """See :meth:`AgentWork.run_signals <.work.AgentWork.run_signals>`."""
        return self._work.run_signals(agent, events, transaction=transaction,
                                      cancellation=cancellation)

    def run_batch(self, agent: AgentT, events: list[Signal]) -> list[AgentReply | WarmPoolError]:
        """See :meth:`AgentWork.run_batch <.work.AgentWork.run_batch>`."""
        return self._work.run_batch(agent, events)

    def run_stream(self, agent: AgentT, event: Signal, emit: Callable[[Any], None],
                   cancellation: Cancellation = NEVER) -> AgentReply:
        """See :meth:`AgentWork.run_stream <.work.AgentWork.run_stream>`."""
        return self._work.run_stream(agent, event, emit, cancellation)

    def run_timeboxed(self, agent: AgentT, work: Callable[[], R], label: str,
                      call_timeout: float | None) -> R:
        """See :meth:`AgentWork.run_timeboxed <.work.AgentWork.run_timeboxed>`."""
        return self._work.run_timeboxed(agent, work, label, call_timeout)

    def overran(self, agent: AgentT, label: str, call_timeout: float) -> CallTimeout:
        """See :meth:`AgentWork.overran <.work.AgentWork.overran>`."""
        return self._work.overran(agent, label, call_timeout)

    def abandon(self, agent: AgentT, reason: str) -> None:
        """Drop a checked-out agent still busy with overrunning work; rebuild its place."""
        with self._lock:
            slot = self._slots.get(id(agent))
            if slot is None or not slot.out:
                return
            fate = self._retire_locked(slot, reason)
        if fate in (CLOSED, DISMISSED):
            return
        logger.warning("pool %r: abandoning %r (%s); building a replacement", self.name,
                       agent, reason)
        self._replace(slot, reason, teardown=False)

    def finish_abandoned(self, agent: AgentT) -> None:
        """Tear down an agent given up by :meth:`abandon`, once its overrunning work ended."""
        self._teardown(agent)

    def record(self, **amounts: int) -> None:
        """Add ``amounts`` to the pool's counters (``calls=1``): the work done on its
        agents is counted here, where :meth:`status` reads it."""
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    @property
    def agent_class(self) -> type[Agent[Any]] | None:
        """The class of the pool's agents, once one was built."""
        return self._agent_class

    # -- changing size, handing back -----------------------------------------------------

    def resize(self, size: int | None = None, max_overflow: int | None = None) -> None:
        """Change ``size`` and ``max_overflow`` while the pool serves.

        New base agents are built (warm) in the background and count once warm; surplus
        idle agents close now, checked-out surplus ones when they come back.

        Raises:
            ConfigurationError: the new values are invalid; nothing changed.
        """
        options = validate_options(self.name, {
            **self.options.model_dump(),
            **({} if size is None else {"size": size}),
            **({} if max_overflow is None else {"max_overflow": max_overflow})})
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed", self.name)
            self.options, self.size, self.max_overflow = (
                options, options.size, options.max_overflow)
            missing = self.size - self._base_count_locked()
            if missing > 0:
                self._replacing += missing
            surplus = self._surplus_idle_locked()
            self._shrinking = self._base_count_locked() > self.size
        for index in range(max(missing, 0)):
            self._spawn(self._rebuild, None, "resize",
                        name=f"warmpool-{self.name}-grow-{index}")
        for slot in surplus:
            self._dismiss(slot, idle=self._clock() - slot.returned)
        logger.info("pool %r resized to size=%d max_overflow=%d", self.name, self.size,
                    self.max_overflow)

    def hand_back(self) -> int:
        """Give every queued caller :class:`HandedBack`, and every later one that would
        wait; agents in use finish their work. Returns how many callers were queued."""
        with self._lock:
            self._handing_back = True
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.error = self._handed_back()
                waiter.wake()
        return len(waiters)

    def resume(self) -> None:
        """Queue callers again after :meth:`hand_back`."""
        with self._lock:
            self._handing_back = False

    def _handed_back(self) -> HandedBack:
        return HandedBack(f"pool {self.name!r} is handing its waiting calls back: its node "
                          "takes no more work", self.name)

    def _base_count_locked(self) -> int:
        """Base agents alive or being built."""
        return len(self._slots) - self._overflow + self._replacing

    def _surplus_idle_locked(self) -> list[_Slot]:
        """Take idle agents beyond the size (and overflow beyond max_overflow) out."""
        surplus: list[_Slot] = []
        base_extra = self._base_count_locked() - self.size
        overflow_extra = self._overflow - self.max_overflow
        for slot in list(self._idle):
            extra = overflow_extra if slot.overflow else base_extra
            if extra <= 0:
                continue
            self._idle.remove(slot)
            self._remove_locked(slot)
            self._counts["dismissed"] += 1
            surplus.append(slot)
            if slot.overflow:
                overflow_extra -= 1
            else:
                base_extra -= 1
        return surplus

    # -- status ------------------------------------------------------------------------

    def status(self) -> PoolStatus:
        """The pool's numbers now, consistent with each other."""
        with self._lock:
            available = len(self._idle)
            state: PoolState
            if available:
                state = "ready"
            elif self._overflow_room_locked():
                state = "overflow"
            else:
                state = "full"
            return PoolStatus(
                pool=self.name, state=state, size=self.size, max_overflow=self.max_overflow,
                available=available, overflow=self._overflow, checked_out=self.checked_out,
                waiting=len(self._waiters), replacing=self._replacing,
                counters=PoolCounters(**self._counts), last_error=self._last_error,
                node=self.node, updated_at=time.time())

    def dismiss_idle_overflow(self) -> int:
        """Close overflow agents idle for ``overflow_ttl`` seconds; return how many.

        A background thread calls this while the pool runs; tests may call it directly.
        """
        ttl = self.options.overflow_ttl
        with self._lock:
            now = self._clock()
            expired = [slot for slot in self._idle
                       if slot.overflow and now - slot.returned >= ttl]
            for slot in expired:
                self._idle.remove(slot)
                self._remove_locked(slot)
                self._counts["dismissed"] += 1
        for slot in expired:
            self._dismiss(slot, idle=now - slot.returned)
        return len(expired)

    # -- lending -----------------------------------------------------------------------

    def _plan_locked(self, block: bool, overflow_allowed: bool,
                     count_exhausted: bool) -> _Plan:
        """Decide how a checkout gets its agent: lend one, build one, or queue for one.

        Queueing happens here, under the lock that saw nothing free, so that an agent
        checked in a moment later is handed to this waiter rather than missed.
        """
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed", self.name)
        if self._idle:
            return self._lend_locked(self._take())
        if not self._started:
            # Nothing would ever come: fail now rather than wait forever.
            raise PoolError(f"pool {self.name!r} is not started: call start() first",
                            self.name)
        if overflow_allowed and self._overflow_room_locked():
            self._building_overflow += 1
            return _BUILD
        if count_exhausted:
            self._counts["exhausted"] += 1
        if self._handing_back:
            raise self._handed_back()
        if not block:
            return _EXHAUSTED
        waiter = _Waiter()
        self._waiters.append(waiter)
        return waiter

    def _lend_locked(self, slot: _Slot) -> _Slot:
        slot.out = True
        slot.uses += 1
        slot.lent_at = time.monotonic()
        self._counts["checkouts"] += 1
        return slot

    def _overflow_room_locked(self) -> bool:
        return self._overflow + self._building_overflow < self.max_overflow

    def _send_exhausted(self, blocking: bool) -> None:
        if telemetry.pool_exhausted.receivers:
            telemetry.pool_exhausted.send(self, blocking=blocking, waiting=len(self._waiters))

    def _wait(self, waiter: _Waiter, started: float,
              timeout: float | None) -> _Slot | Literal["build"]:
        """Wait for a hand-over: an agent, or leave to build one (room reserved for it).

        Raises:
            CheckoutTimeout: nothing came within ``timeout`` seconds of ``started``.
            PoolClosed: the pool was closed while waiting.
        """
        remaining = None if timeout is None else max(0.0, started + timeout - time.monotonic())
        try:
            woken = waiter.wait(remaining)
        except BaseException:
            self._withdraw(waiter)
            raise
        if not woken:
            with self._lock:
                # An agent (or room) may have been handed over between the wait ending and
                # the lock: then the caller takes it, so no hand-over is lost.
                timed_out = not waiter.served
                if timed_out:
                    self._waiters.remove(waiter)
                    self._counts["timeouts"] += 1
            if timed_out:
                raise self._timed_out(started, timeout)
        if waiter.error is not None:
            raise waiter.error
        return waiter.slot if waiter.slot is not None else _BUILD

    def _timed_out(self, started: float, timeout: float | None) -> CheckoutTimeout:
        waited = time.monotonic() - started
        if telemetry.checkout_timeout.receivers:
            telemetry.checkout_timeout.send(self, waited=waited, timeout=timeout)
        return CheckoutTimeout(
            f"pool {self.name!r}: no agent free after waiting {waited:.3f}s (timeout "
            f"{timeout}s; size {self.size}, max_overflow {self.max_overflow}, all checked out)",
            self.name, waited, self.size, self.max_overflow)

    def _withdraw(self, waiter: _Waiter) -> None:
        """Take back what a waiter interrupted mid-wait (a time limit, Ctrl-C) was given."""
        fate = None
        with self._lock:
            slot = waiter.slot
            if slot is not None:
                slot.out = False
                fate = self._return_locked(slot)
            elif waiter.build:
                self._building_overflow -= 1
                self._pass_overflow_room_locked()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
        if slot is not None and fate is not None:
            self._dispose(slot, fate)

    def _lend_new_overflow(self) -> _Slot | None:
        """Build an overflow agent for the caller (room reserved), or ``None`` if it failed."""
        try:
            slot = self._build(overflow=True)
        except BaseException as exc:
            with self._lock:
                self._building_overflow -= 1
                if not isinstance(exc, Exception):
                    # Interrupted, not failed: the room is the next waiter's to use.
                    self._pass_overflow_room_locked()
            if not isinstance(exc, Exception):
                raise
            return None
        with self._lock:
            self._building_overflow -= 1
            if not self._closed:
                self._add_locked(slot)
                self._counts["overflow_created"] += 1
                return self._lend_locked(slot)
        self._teardown(slot.agent)
        raise PoolClosed(f"pool {self.name!r} was closed", self.name)

    def _hand_over_locked(self, slot: _Slot) -> None:
        waiter = self._waiters.popleft()
        waiter.slot = self._lend_locked(slot)
        waiter.wake()

    def _pass_overflow_room_locked(self) -> None:
        # Room for an overflow agent is free again: without this the first waiter would
        # wait for a checkin (maybe forever) while the pool could serve it.
        if self._waiters and not self._closed:
            self._building_overflow += 1
            waiter = self._waiters.popleft()
            waiter.build = True
            waiter.wake()

    def _vet(self, slot: _Slot) -> bool:
        """Check a just-lent agent's age and health; retire it and say no if it fails."""
        reason = self._vetting_failure(slot)
        if reason is None:
            return True
        with self._lock:
            self._counts["checkouts"] -= 1  # it never reached the caller
            slot.out = False
            fate = self._retire_locked(slot, reason)
        self._dispose(slot, fate)
        return False

    def _vetting_failure(self, slot: _Slot) -> str | None:
        now = self._clock()
        max_age, interval = self.options.max_age, self.options.health_check_interval
        if max_age is not None and now - slot.created >= max_age:
            return f"max_age={max_age}s reached"
        if interval is None or now - slot.returned < interval:
            return None
        try:
            healthy = bool(slot.agent.check_health())
        except Exception as exc:
            logger.warning("pool %r: check_health() of %r raised %r", self.name, slot.agent, exc)
            healthy = False
        return None if healthy else "failed health check"

    # -- returning ---------------------------------------------------------------------

    def _return_locked(self, slot: _Slot) -> str | None:
        """Put a returned slot back; say what must be done with it outside the lock."""
        self._counts["checkins"] += 1
        reason = self._retire_reason(slot)
        if reason is not None:
            fate = self._retire_locked(slot, reason)
            self._shrinking = self._base_count_locked() > self.size
            return fate
        if self._stamping:
            # Also before a hand-over: an agent passed from caller to caller was never
            # idle, so health_check_interval must not count from its last idle spell.
            slot.returned = self._clock()
        if self._waiters:
            self._hand_over_locked(slot)
            return None
        if slot.overflow and self.options.overflow_ttl <= 0:
            # Overflow is for bursts: with nobody waiting it goes, never a base agent.
            self._remove_locked(slot)
            self._counts["dismissed"] += 1
            return DISMISSED
        self._idle.append(slot)
        return None

    def _retire_reason(self, slot: _Slot) -> str | None:
        if self._closed:
            return CLOSED
        if self._surplus_locked(slot):
            return DISMISSED
        if slot.agent.broken is not None:
            return f"broken: {type(slot.agent.broken).__name__}: {slot.agent.broken}"
        if self._recycling:
            max_uses, max_age = self.options.max_uses, self.options.max_age
            if max_uses is not None and slot.uses >= max_uses:
                return f"max_uses={max_uses} reached"
            if max_age is not None and self._clock() - slot.created >= max_age:
                return f"max_age={max_age}s reached"
        return None

    def _surplus_locked(self, slot: _Slot) -> bool:
        """Whether a returned agent is one more than the (resized) pool keeps."""
        if slot.overflow:
            return self._overflow > self.max_overflow
        return self._base_count_locked() > self.size

    def _retire_locked(self, slot: _Slot, reason: str) -> str:
        """Take a slot out of the pool for good; say what becomes of it (see CLOSED)."""
        self._remove_locked(slot)
        if self._closed:
            return CLOSED
        if slot.overflow or reason == DISMISSED:
            self._counts["dismissed"] += 1
            return DISMISSED
        self._replacing += 1
        self._counts["replacements"] += 1
        return reason

    def _reset_and_return(self, slot: _Slot) -> str | None:
        """``reset()`` a returned agent outside the lock, then put it back."""
        try:
            slot.agent.reset()
        except Exception as exc:
            logger.exception("pool %r: reset() of %r failed; replacing it", self.name,
                             slot.agent)
            slot.agent.broken = exc
        with self._lock:
            return self._return_locked(slot)

    def _dispose(self, slot: _Slot, fate: str) -> None:
        """Deal with a slot that left the pool: tear it down, and rebuild a base one."""
        if fate == CLOSED:
            self._teardown(slot.agent)
        elif fate == DISMISSED:
            self._dismiss(slot, idle=0.0)
        else:
            logger.info("pool %r: replacing %r after %d uses (%s)", self.name, slot.agent,
                        slot.uses, fate)
            self._replace(slot, fate, teardown=True)

    def _dismiss(self, slot: _Slot, idle: float) -> None:
        self._teardown(slot.agent)
        if telemetry.agent_dismissed.receivers:
            telemetry.agent_dismissed.send(self, agent=slot.agent, idle=idle)

    def _replace(self, slot: _Slot, reason: str, *, teardown: bool) -> None:
        if telemetry.agent_replaced.receivers:
            telemetry.agent_replaced.send(self, agent=slot.agent, reason=reason)
        self._spawn(self._rebuild, slot if teardown else None, reason,
                    name=f"warmpool-{self.name}-replace")

    # -- building ----------------------------------------------------------------------

    def _add_locked(self, slot: _Slot) -> None:
        self._slots[id(slot.agent)] = slot
        if slot.overflow:
            self._overflow += 1

    def _remove_locked(self, slot: _Slot) -> None:
        del self._slots[id(slot.agent)]
        if slot.overflow:
            self._overflow -= 1
            self._pass_overflow_room_locked()

    def _place_locked(self, slot: _Slot) -> None:
        """Add a freshly built base agent: to the oldest waiter, or to the idle agents."""
        self._add_locked(slot)
        if self._waiters:
            self._hand_over_locked(slot)
        else:
            self._idle.append(slot)
        self._changed.notify_all()

    def _build(self, overflow: bool, attempt: int = 1, retry_in: float | None = None) -> _Slot:
        """Build and warm one agent; on failure record it, tell telemetry, and raise."""
        started = time.perf_counter()
        agent: AgentT | None = None
        try:
            agent = self._factory()
            agent.pool_name = self.name
            agent.node = self.node
            agent.discard_on = self.options.discard_on
            agent.reply_state = self.options.reply_state
            agent.shared = self.shared
            agent.process_index = self.process_index
            agent.setup()
        except BaseException as exc:
            with self._lock:
                self._counts["failures"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._last_exception = exc
            logger.warning("pool %r: building %r failed: %r", self.name,
                           agent if agent is not None else self._factory, exc)
            if agent is not None:
                self._teardown(agent)  # setup() may have opened something before it failed
            if isinstance(exc, Exception) and telemetry.agent_setup_failed.receivers:
                telemetry.agent_setup_failed.send(self, exception=exc, attempt=attempt,
                                                  retry_in=retry_in)
            raise
        self._agent_class = type(agent)
        if telemetry.agent_started.receivers:
            telemetry.agent_started.send(self, agent=agent, overflow=overflow,
                                         duration=time.perf_counter() - started)
        return _Slot(agent, overflow, self._clock())

    def _rebuild(self, old: _Slot | None, reason: str) -> None:
        """Build one base agent, retrying with back-off until it works or the pool closes."""
        if old is not None:
            self._teardown(old.agent)
        delay, attempt = BACKOFF_FIRST, 0
        while not self._stop.is_set():
            attempt += 1
            try:
                slot = self._build(overflow=False, attempt=attempt, retry_in=delay)
            except Exception:
                with self._changed:
                    if reason == "start" and attempt == START_ATTEMPTS:
                        self._start_gave_up += 1
                    self._changed.notify_all()
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            with self._lock:
                self._replacing -= 1
                # Not placed if the pool closed, or shrank while this agent was built.
                placed = not self._closed and self._base_count_locked() < self.size
                if placed:
                    self._place_locked(slot)
            if not placed:
                self._teardown(slot.agent)
            return
        with self._lock:
            self._replacing -= 1

    # -- background --------------------------------------------------------------------

    def _dismiss_loop(self) -> None:
        interval = max(0.05, min(self.options.overflow_ttl / 2, 1.0))
        while not self._stop.wait(interval):
            self.dismiss_idle_overflow()

    def _teardown(self, agent: Agent[Any]) -> None:
        try:
            agent.teardown()
        except Exception:
            logger.exception("pool %r: teardown() of %r failed", self.name, agent)

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
