"""Supervisor: builds a pool's agents and keeps its base warm. Its threads live here.

It builds ``size`` warm agents at start (in parallel, each retried with back-off), an
overflow agent when the lending policy answers "build one", a replacement for each
agent retired broken or worn out (in the background, retried with back-off until it
works or the pool closes), and the base agents a resize adds. It tears down what leaves
the pool, and dismisses overflow agents idle past ``overflow_ttl``. What it builds is
placed through the lending policy, under the pool's lock; ``setup()``, ``teardown()``
and telemetry run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from . import telemetry
from .agent import Agent
from .counters import Counters
from .errors import PoolClosed, PoolStartError
from .lending import LendingPolicy
from .slot import CLOSED, DISMISSED, Slot
from .spec import PoolOptions
from .waiters import Waiter

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "START_ATTEMPTS", "Supervisor", "wake"]

logger = logging.getLogger(__name__)

AgentT = TypeVar("AgentT", bound=Agent[Any])

#: How often ``start()`` retries one agent's failing ``setup()`` before giving up on it.
START_ATTEMPTS = 3
#: Back-off between setup attempts: first delay and cap, in seconds (doubling between).
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0


def wake(waiters: Iterable[Waiter]) -> None:
    """Let the callers of ``waiters`` go (after the pool's lock is released)."""
    for waiter in waiters:
        waiter.wake()


class Supervisor(Generic[AgentT]):
    """Builds, rebuilds and tears down the agents of one pool (see the module).

    Arguments:
        name: the pool's name (threads and log lines).
        factory: builds one agent, cheaply; the supervisor equips it and runs ``setup()``.
        lock: the pool's lock, which guards ``policy``.
        policy: places what is built, and says what to rebuild.
        counters: where failed warm-ups are counted.
        hooks: the pool's telemetry.
        clock: the pool's clock (a slot's age).
        equip: gives a new agent what its pool gives every agent (name, node, shared).
        warm_up: readies a new agent after its ``setup()`` (models, warm-up signals);
            returns the seconds it took, or ``None`` when there was nothing to do.
    """

    def __init__(self, name: str, factory: Callable[[], AgentT], lock: threading.Lock,
                 policy: LendingPolicy[Any], counters: Counters, hooks: telemetry.PoolHooks,
                 clock: Callable[[], float], equip: Callable[[AgentT], None],
                 warm_up: Callable[[AgentT], float | None]) -> None:
        self.name = name
        self._factory = factory
        self._lock = lock
        self._changed = threading.Condition(lock)  # a base agent was placed, or gave up
        self._policy = policy
        self._counters = counters
        self._hooks = hooks
        self._clock = clock
        self._equip = equip
        self._warm_up = warm_up
        self._seats: set[int] = set()  # the seats of the live agents (see Agent.seat)
        self._stop = threading.Event()
        # Start builders that failed START_ATTEMPTS times; start() stops waiting for them.
        self._start_gave_up = 0
        self.last_error: str | None = None
        self.last_exception: BaseException | None = None
        #: Seconds the warm-up of the last agent built took (``None``: it had none).
        self.last_warmup: float | None = None
        #: The class of the pool's agents, once one was built.
        self.agent_class: type[Agent[Any]] | None = None

    # -- start and stop ----------------------------------------------------------------

    def start(self, timeout: float) -> int:
        """Build the base agents (the policy already counts them as being rebuilt);
        return how many are warm, once every builder is warm or has given up.

        Raises:
            PoolStartError: none was warm within ``timeout`` seconds, or every builder
                gave up, or the pool closed meanwhile; the last setup error is the cause.
        """
        size = self._policy.size
        for index in range(size):
            self._spawn(self._rebuild, None, "start", name=f"warmpool-{self.name}-start-{index}")
        if self._policy.options.overflow_ttl > 0:
            self._spawn(self._dismiss_loop, name=f"warmpool-{self.name}-overflow")
        warm, why = self._wait_until_built(time.monotonic() + timeout, size)
        if warm == 0:
            raise PoolStartError(
                f"pool {self.name!r} could not start: {why}; last error: "
                f"{self.last_error or 'none'}", self.name, self.last_error,
            ) from self.last_exception
        if warm < size:
            logger.warning(
                "pool %r serving with %d of %d agents warm; rebuilding the rest in the "
                "background (last error: %s)", self.name, warm, size, self.last_error)
        return warm

    def _wait_until_built(self, deadline: float, size: int) -> tuple[int, str]:
        """Wait for the start builders; how many agents are warm, and if none, why."""
        policy = self._policy
        with self._changed:
            # Until every builder is warm or has given up, not for a number of failures:
            # one agent failing for good must not hold start() to its timeout.
            while len(policy.slots) + self._start_gave_up < size and not policy.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            warm = len(policy.slots)
            if policy.closed:
                return warm, "it was closed while starting"
            if self._start_gave_up == size:
                return warm, f"every agent failed setup {START_ATTEMPTS} times"
            return warm, f"no agent was warm within start_timeout={policy.options.start_timeout}s"

    def stop(self) -> None:
        """Stop rebuilding (the pool is closed, under its lock); wake ``start()``."""
        self._stop.set()
        self._changed.notify_all()

    def resize(self, options: PoolOptions) -> None:
        """Adopt a new ``size`` and ``max_overflow`` (``options``, validated): build the
        base agents it adds in the background, dismiss the surplus idle ones now (the
        checked-out surplus when they come back)."""
        with self._lock:
            missing, surplus = self._policy.resize(options)
        for index in range(missing):  # counted by the policy as being rebuilt already
            self._spawn(self._rebuild, None, "resize", name=f"warmpool-{self.name}-grow-{index}")
        now = self._clock()
        for slot in surplus:
            self.dismiss(slot, idle=now - slot.returned)
        logger.info("pool %r resized to size=%d max_overflow=%d", self.name, options.size,
                    options.max_overflow)

    # -- building ----------------------------------------------------------------------

    def build(self, overflow: bool, attempt: int = 1, retry_in: float | None = None) -> Slot:
        """Build and warm one agent; on failure record it, tell telemetry, and raise."""
        started = time.perf_counter()
        agent: AgentT | None = None
        try:
            agent = self._factory()
            agent.seat = self._take_seat()
            self._equip(agent)
            agent.setup()
            warmed = self._warm_up(agent)
        except BaseException as exc:
            self._failed(agent, exc, attempt, retry_in)
            raise
        self.agent_class = type(agent)
        if warmed is not None:
            with self._lock:
                self.last_warmup = warmed
        if self._hooks.agent_started:
            self._hooks.send(telemetry.agent_started, agent=agent, overflow=overflow,
                             duration=time.perf_counter() - started)
        return Slot(agent, overflow, self._clock())

    def _failed(self, agent: AgentT | None, exc: BaseException, attempt: int,
                retry_in: float | None) -> None:
        self._counters.add(failures=1)
        with self._lock:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_exception = exc
        logger.warning("pool %r: building %r failed: %r", self.name,
                       agent if agent is not None else self._factory, exc)
        if agent is not None:
            self.teardown(agent)  # setup() may have opened something before it failed
        if isinstance(exc, Exception) and self._hooks.agent_setup_failed:
            self._hooks.send(telemetry.agent_setup_failed, exception=exc, attempt=attempt,
                             retry_in=retry_in)

    def build_overflow(self) -> Slot | None:
        """Build an overflow agent for a caller the policy reserved room for, lent to it.

        Returns ``None`` if its setup failed (the room is released).

        Raises:
            PoolClosed: the pool closed while it was built (it is torn down).
        """
        try:
            slot = self.build(overflow=True)
        except BaseException as exc:
            interrupted = not isinstance(exc, Exception)
            with self._lock:
                # Interrupted, not failed: the room is the next waiter's to use.
                self._policy.overflow_failed(interrupted)
                woken = self._policy.take_woken()
            wake(woken)
            if interrupted:
                raise
            return None
        with self._lock:
            lent = self._policy.overflow_built(slot)
        if not lent:
            self.teardown(slot.agent)
            raise PoolClosed(f"pool {self.name!r} was closed", self.name)
        return slot

    def _rebuild(self, old: Agent[Any] | None, reason: str) -> None:
        """Build one base agent, retrying with back-off until it works or the pool closes."""
        if old is not None:
            self.teardown(old)
        delay, attempt = BACKOFF_FIRST, 0
        while not self._stop.is_set():
            attempt += 1
            try:
                slot = self.build(overflow=False, attempt=attempt, retry_in=delay)
            except Exception:
                with self._changed:
                    if reason == "start" and attempt == START_ATTEMPTS:
                        self._start_gave_up += 1
                    self._changed.notify_all()
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            with self._changed:
                # Not placed if the pool closed, or shrank while this agent was built.
                placed = self._policy.place(slot)
                woken = self._policy.take_woken()
                self._changed.notify_all()
            wake(woken)
            if not placed:
                self.teardown(slot.agent)
            return
        with self._lock:
            self._policy.rebuild_stopped()

    # -- what leaves the pool ------------------------------------------------------------

    def dispose(self, slot: Slot) -> None:
        """Deal with a slot that left the pool (see ``slot.retired``): tear it down, and
        rebuild a base one if it is to be replaced."""
        if slot.retired == CLOSED:
            self.teardown(slot.agent)
        elif slot.retired == DISMISSED:
            self.dismiss(slot, idle=0.0)
        else:
            logger.info("pool %r: replacing %r after %d uses (%s)", self.name, slot.agent,
                        slot.uses, slot.retired)
            self.replace(slot, teardown=True)

    def abandon(self, agent: AgentT, reason: str) -> None:
        """Give up a lent agent still busy with overrunning work; rebuild its place (its
        teardown waits for that work: see the pool's ``finish_abandoned``)."""
        with self._lock:
            slot = self._policy.abandon(agent, reason)
            woken = self._policy.take_woken()
        wake(woken)
        if slot is None or not slot.replaced:
            return
        logger.warning("pool %r: abandoning %r (%s); building a replacement", self.name,
                       agent, reason)
        self.replace(slot, teardown=False)

    def replace(self, slot: Slot, *, teardown: bool) -> None:
        """Build a replacement for ``slot`` (retired), tearing it down first if asked."""
        if self._hooks.agent_replaced:
            self._hooks.send(telemetry.agent_replaced, agent=slot.agent, reason=slot.retired)
        self._spawn(self._rebuild, slot.agent if teardown else None, slot.retired or "",
                    name=f"warmpool-{self.name}-replace")

    def dismiss(self, slot: Slot, idle: float) -> None:
        """Tear down a dismissed agent (idle ``idle`` seconds before), and say so."""
        self.teardown(slot.agent)
        if self._hooks.agent_dismissed:
            self._hooks.send(telemetry.agent_dismissed, agent=slot.agent, idle=idle)

    def dismiss_idle_overflow(self) -> int:
        """Close overflow agents idle for ``overflow_ttl`` seconds; return how many."""
        with self._lock:
            expired = self._policy.expired_overflow()
        now = self._clock()
        for slot in expired:
            self.dismiss(slot, idle=now - slot.returned)
        return len(expired)

    def teardown(self, agent: Agent[Any]) -> None:
        """Unload ``agent``'s models, then ``agent.teardown()``, a failure logged (it is
        going anyway); its seat is free again."""
        try:
            if agent.models is not None:
                agent.models.clear()
            agent.teardown()
        except Exception:
            logger.exception("pool %r: teardown() of %r failed", self.name, agent)
        with self._lock:
            self._seats.discard(agent.seat)

    def _take_seat(self) -> int:
        """The lowest seat no live agent has (a replacement gets its predecessor's, whose
        teardown came first)."""
        with self._lock:
            seat = min(set(range(len(self._seats) + 1)) - self._seats)
            self._seats.add(seat)
        return seat

    def _dismiss_loop(self) -> None:
        interval = max(0.05, min(self._policy.options.overflow_ttl / 2, 1.0))
        while not self._stop.wait(interval):
            self.dismiss_idle_overflow()

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
