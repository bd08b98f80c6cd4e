"""AgentPool: a thread-safe, in-process pool of warm agents. It imports nothing of Celery.

The pool is a facade over its parts, each one concept:

- :class:`~.slot.Slot`, the record of one agent (uses, age, lent since, overflow, why it
  was retired);
- :class:`~.lending.LendingPolicy`, which decides, with no I/O and no threads, which
  agent a checkout gets and what becomes of one checked in;
- :class:`~.supervisor.Supervisor`, which builds, rebuilds and tears down agents (its
  threads);
- :class:`~.borrowing.Borrowing`, the slow path of a checkout: waiting in the queue,
  building an overflow agent, vetting an agent's age and health;
- :class:`~.counters.Counters`, the work done, counted off the lending lock;
- :class:`~.telemetry.PoolHooks`, who listens to this pool;
- :class:`~.work.AgentWork` (``pool.work``), what is done with a lent agent (calls,
  transactions, batches, streams), which knows the pool only as a
  :class:`~.lease.Lender`;
- :class:`~.multiplexing.Multiplexer` (``pool.models``, with ``max_models``), which agent
  a call for a model gets, and the model's load there.

Every decision is taken by the policy under one lock; everything it answers is carried
out here after the lock is released: waiting, waking a waiter, ``setup()``,
``check_health()``, ``reset()``, ``teardown()``, telemetry.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Generic, Self, TypeVar

from . import telemetry
from .agent import Agent
from .arguments import checkout_timeout, flag, local_timeouts, pool_model, signal_list
from .borrowing import BlockingWaiter, Borrowing
from .counters import Counters
from .errors import CheckoutTimeout, NotCheckedOut, PoolClosed, PoolExhausted, PoolStartError
from .lease import Lease
from .lending import LendingPolicy
from .monitor import PoolMonitor
from .multiplexing import Multiplexer
from .reply import AgentReply
from .signal import Signal
from .slot import Slot
from .spec import PoolOptions, PoolSpec, validate_options
from .status import PoolStatus, local_status
from .stream import Stream
from .supervisor import BACKOFF_CAP, BACKOFF_FIRST, START_ATTEMPTS, Supervisor, wake
from .warmup import warm_model, warm_up
from .work import AgentWork

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "START_ATTEMPTS", "AgentPool"]

logger = logging.getLogger(__name__)
#: The clock of the hot paths, looked up once (a measurable share of a 1 us cycle).
_now = time.monotonic

AgentT = TypeVar("AgentT", bound=Agent[Any])

#: ``from_spec`` without ``shared``: run the agent class's ``preload``.
_PRELOAD: Final = object()


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

    ``pool.hooks`` holds who listens to this pool (see :mod:`.telemetry`); ``pool.work``
    runs work on agents checked out by hand (see :class:`~.work.AgentWork`);
    ``pool.counters`` counts that work.
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
        validated = validate_options(name, options)
        self.name = name
        self.node = node
        self.shared = shared
        self.process_index = process_index
        self._clock = clock
        self._lock = threading.Lock()
        self._policy: LendingPolicy[BlockingWaiter] = LendingPolicy(
            name, validated, clock, BlockingWaiter)
        self.counters = Counters()
        self.hooks = telemetry.PoolHooks(self)
        self._supervisor = Supervisor(name, factory, self._lock, self._policy, self.counters,
                                      self.hooks, clock, functools.partial(_equip, self),
                                      functools.partial(_warm_up, self))
        self._borrowing = Borrowing(name, self._lock, self._policy, self._supervisor,
                                    self.hooks)
        self._monitor: PoolMonitor | None = None
        self.work: AgentWork[AgentT] = AgentWork(self, clock, validated.max_models)
        #: The pool's models, with ``max_models`` (else ``None``): see .multiplexing.
        self.models = _multiplexer(self, self._borrowing)
        # The hot paths' steps, looked up once. The policy's list of woken waiters is
        # always the same object (emptied in place), so testing it is one lookup.
        self._lend_idle = self._policy.lend_idle
        self._take_back = self._policy.take_back
        self._woken = self._policy.woken
        self._vetting = self._policy.vetting
        self._resetting = self._policy.resetting

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
        factory = functools.partial(agent_class, initial, options=worker_opts)
        return AgentPool(factory, name=spec.name, node=node, clock=clock, shared=shared,
                         process_index=process_index, **spec.options.model_dump())

    def __repr__(self) -> str:
        return (f"<AgentPool {self.name!r} size={self.size} max_overflow={self.max_overflow} "
                f"out={self.checked_out} idle={len(self._policy.idle)}>")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def options(self) -> PoolOptions:
        """The pool's options (changed by :meth:`resize`)."""
        return self._policy.options

    @property
    def size(self) -> int:
        """Base agents the pool keeps warm."""
        return self._policy.size

    @property
    def max_overflow(self) -> int:
        """Extra agents it may build when every base agent is out."""
        return self._policy.max_overflow

    @property
    def checked_out(self) -> int:
        """Agents handed out and not yet back (derived from the slots)."""
        return len(self._policy.slots) - len(self._policy.idle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._policy.closed

    @property
    def agent_class(self) -> type[Agent[Any]] | None:
        """The class of the pool's agents, once one was built."""
        return self._supervisor.agent_class

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
            if not self._policy.start():
                return self
        try:
            self._supervisor.start(self.options.start_timeout)
        except PoolStartError:
            self.close()
            raise
        if self.options.monitor_interval is not None:
            self._monitor = PoolMonitor(self.name, self.status, self.hooks,
                                        self.options.monitor_interval, self._clock).start()
        return self

    def close(self) -> None:
        """Tear every agent down (each ``teardown()`` runs once). Safe to call twice.

        Idle agents are closed now; checked-out ones when they are checked in. Waiting
        callers get :class:`PoolClosed`.
        """
        with self._lock:
            if self._policy.closed:
                return
            idle = self._policy.close(PoolClosed(f"pool {self.name!r} was closed", self.name))
            woken = self._policy.take_woken()
            self._supervisor.stop()
        wake(woken)
        if self._monitor is not None:
            self._monitor.stop()
        for slot in idle:
            self._supervisor.teardown(slot.agent)

    # -- checkout and checkin ----------------------------------------------------------

    def checkout(self, block: bool = True, timeout: float | None = None,
                 model: str | None = None) -> AgentT:
        """Take an agent out of the pool; give it back with :meth:`checkin`.

        Arguments:
            block: wait for an agent when none is free and no overflow room is left.
            timeout: the most seconds to wait (``None``: as long as it takes; ``0``: not
                at all), at most a day; with ``model``, its load included.
            model: in a pool with ``max_models``, an agent holding this model (loaded on
                it now if need be; see :mod:`.multiplexing`).

        Raises:
            InvalidArgument: ``block`` is not a bool, ``timeout`` not such a number, or
                ``model`` not a model id of a multiplexed pool.
            PoolExhausted: ``block`` is false and no agent is free.
            CheckoutTimeout: no agent came free (and loaded ``model``) within ``timeout``.
            ModelLoadFailed, PoolClosed: ``model`` failed to load; the pool was closed.
            PoolError: the pool was never started.
        """
        # pool_model() returns the id, or raises: the id is missing, refused or invalid.
        if model is not None and pool_model(self.name, self.options.max_models, model):
            return self.models.checkout(  # type: ignore[union-attr, return-value]
                model, flag("block", block), checkout_timeout(timeout))
        # Checked only when they are not the defaults: the common case is a cycle of about
        # a microsecond (bench/local_pool.py), and a check costs a good part of one.
        if timeout is not None or block is not True:
            block, timeout = flag("block", block), checkout_timeout(timeout)
        with self._lock:
            slot = self._lend_idle()
        if slot is None or (self._vetting and not self._borrowing.vet(slot)):
            slot = self._borrowing.checkout(block, timeout,
                                            _now() if slot is None else slot.lent_at)
        elif self.hooks.agent_checkout:
            self.hooks.send(telemetry.agent_checkout, agent=slot.agent, overflow=slot.overflow,
                            wait=_now() - slot.lent_at)
        agent: AgentT = slot.agent
        return agent

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
        if self._resetting:
            slot = self._reset_and_take_back(agent)
            woken = None
        else:
            with self._lock:
                slot = self._take_back(agent)
                woken = self._policy.take_woken() if self._woken else None
        if woken:
            for waiter in woken:  # wake(), inlined: every hand-over under load passes here
                waiter.wake()
        if self.models is not None:
            self.models.returned()
        if self.hooks.agent_checkin:
            self.hooks.send(telemetry.agent_checkin, agent=agent, held=_now() - slot.lent_at)
        if slot.retired is not None:
            self._supervisor.dispose(slot)

    def _reset_and_take_back(self, agent: AgentT) -> Slot:
        """``reset()`` a returned agent outside the lock, then take it back."""
        with self._lock:
            slot = self._policy.release(agent)  # a second checkin fails from here on
        try:
            agent.reset()
        except Exception as exc:
            logger.exception("pool %r: reset() of %r failed; replacing it", self.name, agent)
            agent.broken = exc
        with self._lock:
            self._policy.put_back(slot)
            woken = self._policy.take_woken()
        wake(woken)
        return slot

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

    def abandon(self, agent: AgentT, reason: str) -> None:
        """Drop a checked-out agent still busy with overrunning work; rebuild its place.

        The agent is not checked in; :meth:`finish_abandoned` tears it down once its work
        ends.
        """
        self._supervisor.abandon(agent, reason)

    def finish_abandoned(self, agent: AgentT) -> None:
        """Tear down an agent given up by :meth:`abandon`, once its overrunning work ended."""
        self._supervisor.teardown(agent)

    # -- running work (see the work module) --------------------------------------------

    def call(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
             call_timeout: float | None = None, model: str | None = None) -> AgentReply:
        """Handle one signal on a checked-out agent (see :meth:`Agent.handle`).

        Arguments:
            timeout: the most seconds to wait for an agent (and load ``model``).
            call_timeout: the most seconds the work may take; an agent that overruns is
                abandoned to finish in the background, then closed, and replaced.
            model: the model the call is for: required in a pool with ``max_models``,
                refused in another (see :mod:`.multiplexing`).

        Raises:
            InvalidArgument: a timeout is not a number of seconds up to a day, or
                ``model`` is missing, refused or not a model id (see :mod:`.arguments`).
            CheckoutTimeout: no agent was free within ``timeout`` seconds.
            ModelLoadFailed: ``model`` failed to load.
            CallTimeout: the work overran ``call_timeout``.
            SignalError, ActionFailed: what :meth:`Agent.handle` raises.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self.work.call(signal, timeout=timeout, call_timeout=call_timeout,
                              model=model)

    def transaction(self, signals: Iterable[Signal | Mapping[str, Any]], *,
                    timeout: float | None = None, call_timeout: float | None = None,
                    model: str | None = None) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing.

        Every signal is validated before any runs. If one fails, the agent's state is put
        back as it was before the first and the error is raised. ``call_timeout`` bounds
        the whole transaction. The arguments are checked as :meth:`call`'s are.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self.work.transaction(signal_list(signals), timeout=timeout,
                                     call_timeout=call_timeout, model=model)

    def stream(self, signal: Signal | Mapping[str, Any], *, timeout: float | None = None,
               call_timeout: float | None = None, model: str | None = None) -> Stream:
        """Check an agent out and stream ``signal`` on it, in the caller's thread.

        Iterating the :class:`Stream` runs the action; the agent is checked in once the
        stream ends, fails or is closed (``close()``, the ``with`` block's end, or the
        stream garbage collected after a ``break``).

        Arguments:
            timeout: the most seconds to wait for an agent (``model``: see :meth:`call`).
            call_timeout: the most seconds the whole stream may take (on the pool's
                clock), checked as each chunk comes: past it the action's generator is
                closed, the iteration raises :class:`CallTimeout` and the agent is
                replaced.

        Raises:
            InvalidArgument, CheckoutTimeout: here; the rest (InvalidSignal, ActionFailed,
                CallTimeout) from the iteration.
        """
        timeout, call_timeout = local_timeouts(timeout, call_timeout)
        return self.work.stream(signal, timeout=timeout, call_timeout=call_timeout,
                                model=model)

    # -- changing size, handing back -----------------------------------------------------

    def resize(self, size: int | None = None, max_overflow: int | None = None) -> None:
        """Change ``size`` and ``max_overflow`` while the pool serves.

        New base agents are built (warm) in the background and count once warm; surplus
        idle agents close now, checked-out surplus ones when they come back.

        Raises:
            ConfigurationError: the new values are invalid; nothing changed.
        """
        self._supervisor.resize(validate_options(self.name, {
            **self.options.model_dump(),
            **({} if size is None else {"size": size}),
            **({} if max_overflow is None else {"max_overflow": max_overflow})}))

    def hand_back(self) -> int:
        """Give every queued caller :class:`HandedBack`, and every later one that would
        wait; agents in use finish their work. Returns how many callers were queued."""
        with self._lock:
            count = self._policy.hand_back()
            woken = self._policy.take_woken()
        wake(woken)
        return count

    def resume(self) -> None:
        """Queue callers again after :meth:`hand_back`."""
        with self._lock:
            self._policy.handing_back = False

    def dismiss_idle_overflow(self) -> int:
        """Close overflow agents idle for ``overflow_ttl`` seconds; return how many.

        A background thread calls this while the pool runs; tests may call it directly.
        """
        return self._supervisor.dismiss_idle_overflow()

    # -- status ------------------------------------------------------------------------

    def status(self) -> PoolStatus:
        """The pool's numbers now, consistent with each other.

        Read under the lock as plain numbers; the status itself is built after.
        """
        with self._lock:
            lending = self._policy.numbers()
            last_error, warmup = self._supervisor.last_error, self._supervisor.last_warmup
        return local_status(self.name, self.node, lending, self.counters.snapshot(),
                            last_error, warmup)


def _equip(pool: AgentPool[Any], agent: Agent[Any]) -> None:
    """Give a new agent what ``pool`` gives each of its agents."""
    agent.pool_name = pool.name
    agent.node = pool.node
    agent.discard_on = pool.options.discard_on
    agent.reply_state = pool.options.reply_state
    agent.shared = pool.shared
    agent.process_index = pool.process_index
    agent.devices = pool.options.devices
    if pool.models is not None:
        pool.models.equip(agent)


def _warm_up(pool: AgentPool[Any], agent: Agent[Any]) -> float | None:
    """Ready a new agent of ``pool`` after its ``setup()`` (see :mod:`.warmup`)."""
    options = pool.options
    return warm_up(agent, options.models, options.warmup, pool.counters)


def _multiplexer(pool: AgentPool[Any], borrowing: Borrowing) -> Multiplexer | None:
    """``pool``'s models, if it has ``max_models`` (see :mod:`.multiplexing`)."""
    options = pool.options
    if options.max_models is None:
        return None
    return Multiplexer(pool.name, options.max_models, pool._lock, pool._policy, borrowing,
                       pool.checkin, pool.counters, pool.hooks,
                       lambda agent, model: warm_model(agent, model, options.warmup))
