"""AgentPool and its lending policy against models: random steps keep every invariant.

The first machine drives a started pool (threads and all) with non-blocking checkouts;
the second drives the lending policy alone, with no thread, through every answer it
gives: waiters, overflow builds, replacements, resizes, closing.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from celery_warmpool import AgentPool, HandedBack, NotCheckedOut, PoolClosed, PoolExhausted
from celery_warmpool.core.lending import BUILD, CHECK_HEALTH, EXHAUSTED, LendingPolicy
from celery_warmpool.core.slot import CLOSED, DISMISSED, Slot
from celery_warmpool.core.spec import PoolOptions, validate_options
from celery_warmpool.core.waiters import Waiter

from .core_agents import FakeClock, TrackedAgent, Tracker, status_numbers, tracked_pool


class PoolMachine(RuleBasedStateMachine):
    """Drives one pool with non-blocking checkouts; the model says what must happen."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = Tracker()
        self.pool: AgentPool[TrackedAgent] | None = None
        self.size = 0
        self.max_overflow = 0
        self.held: list[TrackedAgent] = []
        self.returned: list[TrackedAgent] = []
        self.base: set[str] = set()

    @initialize(size=st.integers(1, 3), max_overflow=st.integers(0, 2),
                strategy=st.sampled_from(["lifo", "fifo"]), reset_on_checkin=st.booleans())
    def start_pool(self, size: int, max_overflow: int, strategy: str,
                   reset_on_checkin: bool) -> None:
        self.size, self.max_overflow = size, max_overflow
        self.pool = tracked_pool(self.tracker, size=size, max_overflow=max_overflow,
                                 strategy=strategy, reset_on_checkin=reset_on_checkin).start()
        self.base = {agent.id for agent in self.tracker.built}
        assert len(self.base) == size

    @property
    def live(self) -> AgentPool[TrackedAgent]:
        assert self.pool is not None
        return self.pool

    def held_overflow(self) -> int:
        return sum(agent.id not in self.base for agent in self.held)

    @rule()
    def checkout(self) -> None:
        base_idle = self.size - (len(self.held) - self.held_overflow())
        try:
            agent = self.live.checkout(block=False)
        except PoolExhausted:
            assert base_idle == 0
            assert self.held_overflow() == self.max_overflow
            return
        if base_idle > 0:
            assert agent.id in self.base  # an idle base agent before any overflow one
        else:
            assert agent.id not in self.base
        assert agent not in self.held
        self.held.append(agent)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def checkin(self, data: Any) -> None:
        agent = data.draw(st.sampled_from(self.held))
        self.live.checkin(agent)
        self.held.remove(agent)
        self.returned.append(agent)
        if agent.id not in self.base:
            assert agent.id in self.tracker.teardowns  # overflow: dismissed at once

    @precondition(lambda self: any(agent not in self.held for agent in self.returned))
    @rule(data=st.data())
    def double_checkin(self, data: Any) -> None:
        agent = data.draw(st.sampled_from(
            [agent for agent in self.returned if agent not in self.held]))
        before = status_numbers(self.live)
        try:
            self.live.checkin(agent)
        except NotCheckedOut:
            pass
        else:
            raise AssertionError(f"{agent!r} was checked in twice")
        assert status_numbers(self.live) == before

    @rule()
    def status_matches_model(self) -> None:
        status = self.live.status()
        assert status.checked_out == len(self.held)
        assert status.overflow == self.held_overflow()
        assert status.available == self.size - (len(self.held) - self.held_overflow())
        assert status.waiting == 0
        assert status.replacing == 0

    @invariant()
    def numbers_add_up(self) -> None:
        if self.pool is None:
            return
        status = self.pool.status()
        alive = len(self.tracker.built) - len(self.tracker.teardowns)
        assert status.available + status.checked_out == status.alive == alive
        assert status.checked_out <= self.size + self.max_overflow
        assert 0 <= status.overflow <= self.max_overflow
        assert status.counters.checkouts - status.counters.checkins == status.checked_out

    @invariant()
    def held_agents_are_distinct(self) -> None:
        assert len({id(agent) for agent in self.held}) == len(self.held)

    @invariant()
    def state_matches_numbers(self) -> None:
        if self.pool is None:
            return
        status = self.pool.status()
        if status.available:
            expected = "ready"
        elif status.overflow < status.max_overflow:
            expected = "overflow"
        else:
            expected = "full"
        assert status.state == expected

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.close()
            for agent in self.held:
                self.pool.checkin(agent)
            # Every agent built was torn down exactly once.
            assert sorted(self.tracker.teardowns) == sorted(
                agent.id for agent in self.tracker.built)


PoolMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_pool_state_machine = PoolMachine.TestCase


# -- the lending policy alone: no threads, no I/O --------------------------------------


class Thing:
    """What the policy lends: only ``broken`` is read."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.broken: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Thing {self.number}>"


class LendingMachine(RuleBasedStateMachine):
    """Drives a LendingPolicy through every answer it gives, playing the pool's part
    (building, waking, waiting, giving up) by hand, one step at a time.

    The model keeps what the pool would know: which slots callers hold, the order of
    the idle agents and of the waiters, the builds under way, and the counts. Each step
    checks the policy's answer against the rules (an idle agent before an overflow one;
    an overflow agent dismissed, never a base one; waiters served first come, first
    served; a returned agent never lent twice), and every invariant after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.policy: LendingPolicy[Waiter] | None = None
        self.options: PoolOptions | None = None
        self.made = 0
        self.held: list[Slot] = []  # lent and not back: by callers, or served waiters
        self.idle: list[Slot] = []  # in the order they came back
        self.queue: list[Waiter] = []  # waiting, oldest first
        self.served: list[Waiter] = []  # every waiter ever served (kept: ids get reused)
        self.building = 0  # overflow builds the policy reserved room for
        self.rebuilding = 0  # base agents being built
        self.abandoned = 0
        self.exhausted = 0
        self.retired: list[Slot] = []
        self.max_overflow_lowered = False

    @property
    def live(self) -> LendingPolicy[Waiter]:
        assert self.policy is not None
        return self.policy

    @initialize(size=st.integers(1, 3), max_overflow=st.integers(0, 2),
                strategy=st.sampled_from(["lifo", "fifo"]),
                max_uses=st.sampled_from([None, 1, 3]), max_age=st.sampled_from([None, 5.0]),
                health_check_interval=st.sampled_from([None, 3.0]),
                overflow_ttl=st.sampled_from([0.0, 2.0]), reset_on_checkin=st.booleans())
    def start(self, **options: Any) -> None:
        self.options = validate_options("machine", options)
        self.policy = LendingPolicy("machine", self.options, self.clock, Waiter)
        assert self.live.start()
        assert not self.live.start()  # a second start changes nothing
        self.rebuilding = self.options.size

    # -- the pool's part ---------------------------------------------------------------

    def new_slot(self, overflow: bool) -> Slot:
        self.made += 1
        return Slot(Thing(self.made), overflow, self.clock())

    def wake(self) -> None:
        """Take what the policy served, as the pool does after its lock."""
        woken = self.live.take_woken()
        for waiter in woken:
            assert all(waiter is not other for other in self.served), "a waiter served twice"
            self.served.append(waiter)
            # First come, first served: the oldest still waiting is served first.
            assert self.queue and self.queue[0] is waiter
            self.queue.pop(0)
            if waiter.slot is not None:
                self.lent(waiter.slot)
            elif waiter.build:  # room passed on: only if there is room
                policy = self.live
                assert policy.overflow + policy.building_overflow <= policy.max_overflow
                self.building += 1
            else:
                assert isinstance(waiter.error, (PoolClosed, HandedBack))
        assert self.live.take_woken() == []

    def lent(self, slot: Slot) -> None:
        assert slot.out and slot.retired is None
        assert all(slot is not other for other in self.held), "one agent lent twice"
        self.held.append(slot)

    def leaves(self, slot: Slot) -> None:
        """``slot`` left the pool: a replaced base agent is rebuilt."""
        assert slot.retired is not None
        assert id(slot.agent) not in self.live.slots
        if slot.replaced:
            assert not slot.overflow, "an overflow agent replaced instead of dismissed"
            self.rebuilding += 1
        self.retired.append(slot)

    def expected_next_idle(self) -> Slot:
        assert self.options is not None
        return self.idle[-1] if self.options.strategy == "lifo" else self.idle[0]

    # -- lending -----------------------------------------------------------------------

    @rule(block=st.booleans())
    def lend(self, block: bool) -> None:
        policy = self.live
        room = policy.overflow + policy.building_overflow < policy.max_overflow
        try:
            plan = policy.lend(block)
        except PoolClosed:
            assert policy.closed
            return
        except HandedBack:
            assert policy.handing_back and not self.idle and not room
            self.exhausted += 1
            return
        if isinstance(plan, Slot):
            assert self.idle, "lent with no idle agent"
            assert plan is self.expected_next_idle()
            self.idle.remove(plan)
            self.lent(plan)
        elif plan == BUILD:
            assert not self.idle and room  # an idle agent always goes first
            self.building += 1
        elif plan == EXHAUSTED:
            assert not block and not self.idle and not room
            self.exhausted += 1
        else:
            assert block and not self.idle and not room
            self.exhausted += 1
            assert isinstance(plan, Waiter) and not plan.served
            self.queue.append(plan)

    @precondition(lambda self: self.building)
    @rule(succeeds=st.booleans(), interrupted=st.booleans())
    def finish_overflow_build(self, succeeds: bool, interrupted: bool) -> None:
        self.building -= 1
        if succeeds:
            slot = self.new_slot(overflow=True)
            if self.live.overflow_built(slot):
                self.lent(slot)
            else:
                assert self.live.closed
        else:
            # Failed: the caller waits instead (a plain lend without overflow, then).
            self.live.overflow_failed(interrupted)
            self.wake()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def vet_just_lent(self, data: Any) -> None:
        slot = data.draw(st.sampled_from(self.held))
        answer = self.live.vet(slot)
        options = self.options
        assert options is not None
        too_old = options.max_age is not None and self.clock() - slot.created >= options.max_age
        due = (options.health_check_interval is not None
               and self.clock() - slot.returned >= options.health_check_interval)
        if too_old:
            assert answer == f"max_age={options.max_age}s reached"
        elif due:
            assert answer == CHECK_HEALTH
        else:
            assert answer is None
        if answer is not None and data.draw(st.booleans()):  # unhealthy, or too old
            checkouts = self.live.checkouts
            self.held.remove(slot)
            self.live.refuse(slot, answer if answer != CHECK_HEALTH else "failed health check")
            assert self.live.checkouts == checkouts - 1  # it never reached its caller
            self.wake()
            self.leaves(slot)

    # -- taking back -------------------------------------------------------------------

    @precondition(lambda self: self.held)
    @rule(data=st.data(), broken=st.booleans(), in_two_steps=st.booleans())
    def take_back(self, data: Any, broken: bool, in_two_steps: bool) -> None:
        slot = data.draw(st.sampled_from(self.held))
        policy, options = self.live, self.options
        assert options is not None
        if broken:
            slot.agent.broken = RuntimeError("broke")
        expected = self.expected_fate(slot)
        oldest = self.queue[0] if self.queue else None
        self.held.remove(slot)
        if in_two_steps:  # as a pool that resets agents does: release, reset, put back
            assert policy.release(slot.agent) is slot
            assert policy.put_back(slot) is slot
        else:
            assert policy.take_back(slot.agent) is slot
        assert slot.retired == expected
        if expected is None:
            if options.health_check_interval is not None or options.overflow_ttl > 0:
                # Idle from now (health checks, overflow_ttl), hand-over or not.
                assert slot.returned == self.clock()
            if oldest is not None:
                assert oldest.slot is slot  # handed over to the oldest waiter
            else:
                self.idle.append(slot)
        self.wake()
        if expected is not None:
            self.leaves(slot)

    def expected_fate(self, slot: Slot) -> str | None:
        """What must become of ``slot`` when it comes back: the pool's rules."""
        policy, options = self.live, self.options
        assert options is not None
        base_alive = len(policy.slots) - policy.overflow + policy.replacing
        if policy.closed:
            return CLOSED
        if (policy.overflow > policy.max_overflow) if slot.overflow else base_alive > policy.size:
            return DISMISSED
        reason = None
        if slot.agent.broken is not None:
            reason = "broken: RuntimeError: broke"
        elif options.max_uses is not None and slot.uses >= options.max_uses:
            reason = f"max_uses={options.max_uses} reached"
        elif options.max_age is not None and self.clock() - slot.created >= options.max_age:
            reason = f"max_age={options.max_age}s reached"
        if reason is not None:
            return DISMISSED if slot.overflow else reason
        if not self.queue and slot.overflow and options.overflow_ttl <= 0:
            return DISMISSED
        return None

    @precondition(lambda self: self.retired or self.idle)
    @rule(data=st.data())
    def take_back_what_is_not_lent(self, data: Any) -> None:
        slot = data.draw(st.sampled_from(self.retired + self.idle))
        before = self.live.numbers()
        with pytest.raises(NotCheckedOut):
            self.live.take_back(slot.agent)
        with pytest.raises(NotCheckedOut):
            self.live.take_back(Thing(-1))
        assert self.live.numbers() == before

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def abandon(self, data: Any) -> None:
        slot = data.draw(st.sampled_from(self.held))
        closed = self.live.closed
        self.held.remove(slot)
        assert self.live.abandon(slot.agent, "call_timeout=1s exceeded") is slot
        assert slot.retired == (CLOSED if closed else DISMISSED if slot.overflow
                                else "call_timeout=1s exceeded")
        assert self.live.abandon(slot.agent, "again") is None  # not lent any more
        self.abandoned += 1
        self.wake()
        self.leaves(slot)

    # -- waiting -----------------------------------------------------------------------

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def waiter_times_out(self, data: Any) -> None:
        waiter = data.draw(st.sampled_from(self.queue))
        timeouts = self.live.timeouts
        assert self.live.give_up(waiter)
        assert self.live.timeouts == timeouts + 1
        self.queue.remove(waiter)
        assert not self.live.give_up(_served_waiter())  # served meanwhile: it stays served

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def waiter_interrupted(self, data: Any) -> None:
        waiter = data.draw(st.sampled_from(self.queue))
        assert self.live.withdraw(waiter) is None
        self.queue.remove(waiter)
        assert waiter not in self.live.waiters

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def served_waiter_interrupted_before_it_woke(self, data: Any) -> None:
        # A waiter handed an agent, interrupted before it could take it: the agent goes
        # back as a checkin would (to the next waiter, or the idle ones, or retired).
        slot = data.draw(st.sampled_from(self.held))
        waiter = Waiter()
        waiter.slot = slot
        expected = self.expected_fate(slot)
        oldest = self.queue[0] if self.queue else None
        self.held.remove(slot)
        assert self.live.withdraw(waiter) is slot
        assert slot.retired == expected
        if expected is None and oldest is None:
            self.idle.append(slot)
        self.wake()
        if expected is not None:
            self.leaves(slot)

    # -- building, time, resizing, closing ---------------------------------------------

    @precondition(lambda self: self.rebuilding)
    @rule()
    def rebuild_finishes(self) -> None:
        self.rebuilding -= 1
        slot = self.new_slot(overflow=False)
        policy = self.live
        wanted = not policy.closed and (
            len(policy.slots) - policy.overflow + policy.replacing - 1 < policy.size)
        oldest = self.queue[0] if self.queue else None
        assert policy.place(slot) is wanted
        if wanted and oldest is None:
            self.idle.append(slot)
        self.wake()
        if wanted and oldest is not None:
            assert oldest.slot is slot

    @precondition(lambda self: self.rebuilding and self.live.closed)
    @rule()
    def rebuild_stops(self) -> None:
        self.rebuilding -= 1
        self.live.rebuild_stopped()

    @rule(seconds=st.sampled_from([1.0, 2.5, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def idle_overflow_expires(self) -> None:
        options = self.options
        assert options is not None
        expected = [slot for slot in self.idle if slot.overflow
                    and self.clock() - slot.returned >= options.overflow_ttl]
        assert self.live.expired_overflow() == expected
        for slot in expected:
            assert slot.retired == DISMISSED
            self.idle.remove(slot)
            self.retired.append(slot)

    @rule(size=st.integers(1, 3), max_overflow=st.integers(0, 2))
    def resize(self, size: int, max_overflow: int) -> None:
        assert self.options is not None
        policy = self.live
        if policy.closed:
            with pytest.raises(PoolClosed):
                policy.resize(self.options)
            return
        if max_overflow < policy.max_overflow:
            self.max_overflow_lowered = True
        options = validate_options("machine", {
            **self.options.model_dump(), "size": size, "max_overflow": max_overflow})
        missing, surplus = policy.resize(options)
        self.options = options
        self.rebuilding += missing
        for slot in surplus:
            assert slot.retired == DISMISSED
            self.idle.remove(slot)
            self.retired.append(slot)
        base_alive = len(policy.slots) - policy.overflow
        assert base_alive + policy.replacing >= size  # never short of base agents
        # What is beyond the new bounds is out with callers: nothing surplus stays idle.
        if base_alive + policy.replacing > size:
            assert all(slot.overflow for slot in self.idle)
        if policy.overflow > max_overflow:
            assert not any(slot.overflow for slot in self.idle)

    @rule()
    def hand_back_then_resume(self) -> None:
        count = len(self.queue)
        assert self.live.hand_back() == count
        self.wake()
        assert self.queue == []
        if not self.live.closed:
            with pytest.raises(HandedBack):
                while True:  # until nothing is idle and no room is left
                    self.exhausted += 1  # counted by the lend that raises
                    plan = self.live.lend(block=True)
                    self.exhausted -= 1
                    if isinstance(plan, Slot):
                        self.idle.remove(plan)
                        self.lent(plan)
                    elif plan == BUILD:
                        self.building += 1
        self.live.handing_back = False

    @rule()
    def close(self) -> None:
        policy = self.live
        if policy.closed:
            return
        error = PoolClosed("closed", "machine")
        idle = policy.close(error)
        assert sorted(id(slot) for slot in idle) == sorted(id(slot) for slot in self.idle)
        for slot in idle:
            assert slot.retired == CLOSED
            self.retired.append(slot)
        self.idle = []
        self.wake()

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def slots_are_idle_or_held(self) -> None:
        if self.policy is None:
            return
        policy = self.policy
        assert list(policy.idle) == self.idle  # the order they came back in
        assert list(policy.waiters) == self.queue
        expected = {id(slot.agent) for slot in self.idle + self.held}
        assert set(policy.slots) == expected
        assert all(not slot.out for slot in self.idle)
        assert all(slot.out for slot in self.held)
        assert policy.overflow == sum(slot.overflow for slot in self.idle + self.held)

    @invariant()
    def nobody_waits_while_an_agent_idles(self) -> None:
        if self.policy is not None and self.policy.waiters:
            assert not self.policy.idle

    @invariant()
    def builds_match_their_reservations(self) -> None:
        if self.policy is None:
            return
        policy = self.policy
        assert policy.building_overflow == self.building
        assert policy.replacing == self.rebuilding
        if not self.max_overflow_lowered:
            assert policy.overflow + policy.building_overflow <= policy.max_overflow
        if not policy.shrinking and not policy.closed:
            assert len(policy.slots) - policy.overflow + policy.replacing <= policy.size

    @invariant()
    def numbers_add_up(self) -> None:
        if self.policy is None:
            return
        numbers = self.policy.numbers()
        counters = numbers["counters"]
        assert numbers["available"] == len(self.idle)
        assert numbers["checked_out"] == len(self.held)
        assert numbers["waiting"] == len(self.queue)
        assert counters["checkouts"] - counters["checkins"] == len(self.held) + self.abandoned
        assert counters["exhausted"] == self.exhausted
        room = numbers["overflow"] + self.policy.building_overflow < numbers["max_overflow"]
        assert numbers["state"] == ("ready" if self.idle else "overflow" if room else "full")


def test_room_left_by_a_surplus_overflow_agent_is_not_passed_to_a_waiter() -> None:
    # max_overflow lowered to 0 while an overflow agent is out and a caller waits: when
    # that agent comes back it is dismissed, and its room is gone with it: the waiter
    # must not be told to build another overflow agent.
    clock = FakeClock()
    policy = LendingPolicy("lowered", validate_options("lowered", {"max_overflow": 1, "size": 1}),
                           clock, Waiter)
    policy.start()
    assert policy.place(Slot(Thing(1), False, clock()))
    base = policy.lend(block=True)
    assert policy.lend(block=True) == BUILD
    overflow = Slot(Thing(2), True, clock())
    assert policy.overflow_built(overflow)
    waiter = policy.lend(block=True)
    assert isinstance(waiter, Waiter)

    policy.resize(validate_options("lowered", {"max_overflow": 0, "size": 1}))
    policy.take_back(overflow.agent)

    assert overflow.retired == DISMISSED
    assert not waiter.served and policy.take_woken() == []
    assert policy.building_overflow == 0
    assert isinstance(base, Slot)
    policy.take_back(base.agent)  # the base agent goes to it instead
    assert waiter.slot is base and policy.take_woken() == [waiter]


def _served_waiter() -> Waiter:
    waiter = Waiter()
    waiter.error = PoolClosed("closed")
    return waiter


LendingMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_lending_policy_state_machine = LendingMachine.TestCase
