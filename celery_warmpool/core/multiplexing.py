"""Multiplexing: which agent of a pool a call for a model gets, and the model's load there.

In a pool with ``max_models``, each agent holds up to that many models (see
:mod:`.models`), each its own copy. A call for model ``m`` gets an agent this way, decided
under the pool's lock, the load done outside it:

1. an idle agent that holds ``m``: a hit;
2. else, if an agent that holds ``m``, or is loading it, is busy: wait for that agent
   rather than load ``m`` a second time. So ``n`` callers of a cold model wait for one
   load, not ``n``. Once ``m`` is loaded, the wait for a busy holder is bounded by the
   model's own load time, as measured on its holder, and at least :data:`HOLDER_WAIT`:
   past it, a second copy on another agent would have been no slower, so the model
   spreads, and a hot model is never stuck on one agent (the floor keeps a burst of
   first calls, each waiting its turn, from loading a copy it barely needed). While
   ``m`` is being loaded for the first time here, nothing but the caller's timeout
   bounds the wait;
3. else an idle agent where the load costs least: the one with the most room (fewer than
   ``max_models`` models: models spread over the agents), else the one whose least
   recently used model was used the longest ago, which is unloaded first; a cold model
   never pushes out a warm one while a colder one is there to go;
4. else (no agent idle) the pool's usual checkout (wait in line, or build an overflow
   agent), and ``m`` loaded on the agent it gives if that one lacks it.

Loads of different models by different agents run side by side: during a load nothing is
held but the agent itself. A load that fails fails its call with
:class:`ModelLoadFailed`, and the calls waiting for that load with it; later calls for
the model fail at once, without a load, until its back-off passes (see
:class:`~.models.LoadFailures`). The wait for an agent and the load both count against
the caller's ``timeout``: a load that ends past it gives the agent back and raises
:class:`CheckoutTimeout` (the call is not run; the model stays, for the next call).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from . import telemetry
from .agent import Agent
from .borrowing import Borrowing
from .counters import Counters
from .errors import CheckoutTimeout, ModelLoadFailed
from .lending import LendingPolicy
from .models import HeldModel, LoadFailures, ModelCache, load_failed
from .slot import Slot

__all__ = ["HOLDER_WAIT", "RECHECK", "Multiplexer"]

_now = time.monotonic
#: The least a caller waits for a busy agent holding its model, in seconds, before it has
#: the model loaded on another (more, for a model whose load takes longer).
HOLDER_WAIT = 0.25
#: The longest a caller waiting for a busy holder sleeps before it looks again: a holder
#: that leaves the pool (replaced, or given up to overrunning work) sends no word.
RECHECK = 0.5


class Multiplexer:
    """The models of one pool's agents, and the checkouts that need one (see the module).

    The pool's ``models`` attribute, in a pool with ``max_models``.

    Arguments:
        name: the pool's name (errors name it).
        capacity: how many models one agent holds (``max_models``).
        lock: the pool's lock; it guards ``policy`` and each agent's loading mark.
        policy: the idle agents and the live ones; lends the one chosen.
        borrowing: the pool's checkout when no agent is idle.
        checkin: gives an agent back to the pool.
        counters: where hits, loads, failed loads and evictions are counted.
        hooks: the pool's telemetry.
        warm: handles the warm-up signals for a model loaded ahead of its calls.
    """

    def __init__(self, name: str, capacity: int, lock: threading.Lock,
                 policy: LendingPolicy[Any], borrowing: Borrowing,
                 checkin: Callable[[Any], None], counters: Counters,
                 hooks: telemetry.PoolHooks, warm: Callable[[Any, str], None]) -> None:
        self.name = name
        self.capacity = capacity
        self._policy = policy
        self._borrowing = borrowing
        self._checkin = checkin
        self._counters = counters
        self._hooks = hooks
        self._warm = warm
        #: Notified when an agent comes back or a load ends: holders may be free.
        self._changed = threading.Condition(lock)
        self._waiting = 0  # callers waiting for a busy holder
        #: The models whose load failed lately, with their back-off.
        self.failures = LoadFailures()

    @property
    def waiting(self) -> int:
        """Callers waiting now for a busy agent that holds (or loads) their model."""
        return self._waiting

    def equip(self, agent: Agent[Any]) -> None:
        """Give a new agent of the pool its model cache (empty)."""
        agent.models = ModelCache(self.capacity, agent.load_model, agent.unload_model)

    # -- checking out for a model --------------------------------------------------------

    def checkout(self, model_id: str, block: bool = True,
                 timeout: float | None = None) -> Agent[Any]:
        """An agent that holds ``model_id``, checked out (the model loaded on it now if
        need be); give it back with the pool's ``checkin``.

        Arguments:
            model_id: the model (checked by the caller).
            block: wait for an agent when none is free (else :class:`PoolExhausted`).
            timeout: the most seconds to wait and load (``None``: as long as it takes).

        Raises:
            ModelLoadFailed: its load failed now, or failed lately and is backing off.
            CheckoutTimeout: no agent came, or the load ended, within ``timeout``.
            PoolExhausted, PoolClosed, HandedBack, PoolError: as the pool's checkout.
        """
        return self._checkout(model_id, block, timeout)[0]

    def _checkout(self, model_id: str, block: bool,
                  timeout: float | None) -> tuple[Agent[Any], bool]:
        """:meth:`checkout`, and whether the model was loaded for it."""
        started = _now()
        slot, load = self._lend(model_id, block, timeout, started)
        agent: Agent[Any] = slot.agent
        if not load:
            self._counters.add(model_hits=1)
            return agent, False
        self._load(agent, model_id)
        if timeout is not None and _now() - started > timeout:
            self._checkin(agent)
            raise self._timed_out(model_id, started, timeout, loaded=True)
        return agent, True

    def _lend(self, model_id: str, block: bool, timeout: float | None,
              started: float) -> tuple[Slot, bool]:
        """A lent agent for ``model_id``, and whether the model is to be loaded on it."""
        holder_until: float | None = None  # past it, stop waiting for a busy holder
        while True:
            with self._changed:
                self._refuse_while_failing(model_id)
                slot = self._idle_holder(model_id)
                load = slot is None
                if slot is None:
                    bound = self._busy_holder(model_id)
                    if bound is not None and block:
                        if holder_until is None and bound != math.inf:
                            holder_until = _now() + max(bound, HOLDER_WAIT)
                        if holder_until is None or _now() < holder_until:
                            self._wait(model_id, started, timeout, holder_until)
                            continue
                    slot = self._cheapest_idle()
                if slot is not None:
                    self._policy.lend_chosen(slot)
                    self._mark(slot.agent.models, model_id, load)
            if slot is None:  # none idle: the pool's own checkout (queue, overflow)
                left = None if timeout is None else max(0.0, started + timeout - _now())
                slot = self._borrowing.checkout(block, left, started)
                with self._changed:
                    load = model_id not in slot.agent.models
                    self._mark(slot.agent.models, model_id, load)
                return slot, load
            if self._policy.vetting and not self._borrowing.vet(slot):
                with self._changed:  # retired: whoever waited for it looks again
                    self._changed.notify_all()
                continue
            if self._hooks.agent_checkout:
                self._hooks.send(telemetry.agent_checkout, agent=slot.agent,
                                 overflow=slot.overflow, wait=_now() - started)
            return slot, load

    def _refuse_while_failing(self, model_id: str) -> None:
        """Raise ModelLoadFailed, with no load, while ``model_id`` backs off."""
        failing = self.failures.backing_off(model_id)
        if failing is not None:
            failures, cause, left = failing
            raise ModelLoadFailed(
                f"pool {self.name!r}: model {model_id!r} failed to load {failures} time(s) "
                f"in a row (last: {cause}); it is tried again in {left:.1f}s", model_id,
                cause, self.name, left)

    def _idle_holder(self, model_id: str) -> Slot | None:
        """An idle agent holding ``model_id``, the most recently returned first."""
        for slot in reversed(self._policy.idle):
            if model_id in slot.agent.models:
                return slot
        return None

    def _busy_holder(self, model_id: str) -> float | None:
        """How long to wait for a busy agent that holds (or loads) ``model_id``: its load
        time as measured (``inf`` while only a first load is under way), or ``None``
        when no busy agent holds it."""
        bound: float | None = None
        for slot in self._policy.slots.values():
            if not slot.out:
                continue
            cache: ModelCache = slot.agent.models
            entry = cache.entry(model_id)  # one dict read: safe while its agent works
            if entry is not None:
                bound = max(bound or 0.0, entry.load_seconds)
            elif cache.loading == model_id and bound is None:
                bound = math.inf
        return None if bound is None else bound

    def _cheapest_idle(self) -> Slot | None:
        """The idle agent where a load costs least: the one with the most room (so that
        models spread over the agents), else the one whose least recently used model was
        used the longest ago (idle agents' caches do not change meanwhile)."""
        best: Slot | None = None
        lowest = (2, 0.0)
        for slot in reversed(self._policy.idle):
            cache: ModelCache = slot.agent.models
            cost = (1, cache.coldest()) if cache.full else (0, float(len(cache)))
            if cost < lowest:
                best, lowest = slot, cost
        return best

    @staticmethod
    def _mark(cache: ModelCache, model_id: str, load: bool) -> None:
        """Mark ``model_id`` being loaded (callers of it then wait), or used (a hit)."""
        if load:
            cache.loading = model_id
        else:
            cache.touch(model_id)

    def _wait(self, model_id: str, started: float, timeout: float | None,
              holder_until: float | None) -> None:
        """Wait (the lock held) for a holder to come back or a load to end.

        Raises:
            CheckoutTimeout: the caller's timeout passed.
        """
        now = _now()
        longest = RECHECK if holder_until is None else min(RECHECK, holder_until - now)
        if timeout is not None:
            left = started + timeout - now
            if left <= 0:
                raise self._timed_out(model_id, started, timeout, loaded=False)
            longest = min(longest, left)
        self._waiting += 1
        try:
            self._changed.wait(max(0.0, longest))
        finally:
            self._waiting -= 1

    def _load(self, agent: Agent[Any], model_id: str) -> None:
        """Load ``model_id`` on the lent ``agent`` (outside the lock).

        Raises:
            ModelLoadFailed: the load failed; the agent went back to the pool.
        """
        cache: ModelCache = agent.models  # type: ignore[assignment]
        try:
            _, evicted = cache.load(model_id)
        except BaseException as exc:
            retry_in = 0.0
            with self._changed:
                cache.loading = None
                if isinstance(exc, Exception):
                    retry_in = self.failures.record(model_id, f"{type(exc).__name__}: {exc}")
                self._changed.notify_all()
            agent.note_failure(exc)  # a discard_on error: the agent is replaced
            self._checkin(agent)
            if not isinstance(exc, Exception):
                raise
            self._counters.add(model_load_failures=1)
            raise load_failed(self.name, model_id, exc, f"on {agent!r}", retry_in) from exc
        with self._changed:
            cache.loading = None
            self.failures.forget(model_id)
            self._changed.notify_all()
        self._counters.add(model_loads=1, model_evictions=len(evicted))

    def _timed_out(self, model_id: str, started: float, timeout: float,
                   loaded: bool) -> CheckoutTimeout:
        waited = _now() - started
        why = (f"loaded model {model_id!r} {waited:.3f}s after the call came, past its "
               f"timeout of {timeout}s; the call was not run (the model stays loaded)"
               if loaded else f"no agent for model {model_id!r} after waiting {waited:.3f}s "
               f"(timeout {timeout}s)")
        return CheckoutTimeout(f"pool {self.name!r}: {why}", self.name, waited,
                               self._policy.size, self._policy.max_overflow)

    def returned(self) -> None:
        """An agent came back to the pool: callers waiting for a holder look again."""
        if self._waiting:
            with self._changed:
                self._changed.notify_all()

    # -- what is held, loading and unloading by hand -------------------------------------

    def held(self) -> dict[str, list[HeldModel]]:
        """Per agent of this process (by id): the models it holds, least recently used
        first (copies of their records)."""
        with self._changed:
            agents = [slot.agent for slot in self._policy.slots.values()]
        return {agent.id: [dataclasses.replace(entry) for entry in agent.models.entries()]
                for agent in agents}

    def load(self, model_id: str, timeout: float | None = None) -> str:
        """Have an agent of this process hold ``model_id`` ahead of its calls (loaded and
        warmed up, unless an idle agent holds it already); that agent's id.

        Raises:
            What :meth:`checkout` raises; a warm-up signal's error.
        """
        agent, loaded = self._checkout(model_id, True, timeout)
        try:
            if loaded:
                self._warm(agent, model_id)
        finally:
            self._checkin(agent)
        return agent.id

    def unload(self, model_id: str, timeout: float | None = None) -> int:
        """Unload ``model_id`` from every agent of this process that holds it, waiting at
        most ``timeout`` seconds (``None``: as long as it takes) for busy holders to come
        back; how many unloaded it."""
        deadline = None if timeout is None else _now() + timeout
        unloaded = 0
        while True:
            with self._changed:
                slot = self._idle_holder(model_id)
                if slot is None:
                    left = None if deadline is None else deadline - _now()
                    if self._busy_holder(model_id) is None or (left is not None and left <= 0):
                        return unloaded
                    self._waiting += 1
                    try:
                        self._changed.wait(RECHECK if left is None else min(RECHECK, left))
                    finally:
                        self._waiting -= 1
                    continue
                self._policy.lend_chosen(slot)
            try:
                slot.agent.models.unload(model_id)
            finally:
                self._checkin(slot.agent)
            unloaded += 1
