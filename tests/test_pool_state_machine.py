"""AgentPool against a model: random checkouts and checkins keep every invariant."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from celery_warmpool import AgentPool, NotCheckedOut, PoolExhausted

from .core_agents import TrackedAgent, Tracker, status_numbers, tracked_pool


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
