"""AgentPool: warm start, checkout order, bounds, waiters, replacement, recycling, close.

Modelled on SQLAlchemy's ``test/engine/test_pool.py``: exact orders, 40 threads against a
bounded pool, timeout races, no double checkin, mocked clocks for everything timed.
Threads are coordinated with barriers, events and telemetry, never with sleeps.
"""

from __future__ import annotations

import gc
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_warmpool import (
    ActionFailed,
    AgentPool,
    CallTimeout,
    CheckoutTimeout,
    InvalidSignal,
    NotCheckedOut,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolSpec,
    PoolStartError,
    PoolStatus,
    Signal,
    telemetry,
)
from celery_warmpool.core.cancellation import NEVER
from celery_warmpool.core.pool import START_ATTEMPTS

from .core_agents import (
    Boom,
    CounterAgent,
    FakeClock,
    TrackedAgent,
    Tracker,
    receiving,
    status_numbers,
    tracked_pool,
)

Pool = AgentPool[TrackedAgent]


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    tracker = Tracker()
    yield tracker
    tracker.gate.set()  # let any setup still waiting finish, so its thread ends


@pytest.fixture
def make_pool(tracker: Tracker) -> Iterator[Callable[..., Pool]]:
    """Build and start a pool of tracked agents; every pool is closed after the test."""
    made: list[Pool] = []

    def make(start: bool = True, **options: Any) -> Pool:
        pool = tracked_pool(tracker, **options)
        made.append(pool)
        return pool.start() if start else pool

    yield make
    for pool in made:
        pool.close()


def run_threads(count: int, target: Callable[[int], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(index,), name=f"worker-{index}")
               for index in range(count)]
    for thread in threads:
        thread.start()
    return threads


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive(), f"{thread.name} is stuck"


# -- start -------------------------------------------------------------------------------


def test_start_builds_size_warm_agents(make_pool: Callable[..., Pool],
                                       tracker: Tracker) -> None:
    pool = make_pool(size=3)

    assert sorted(tracker.setups) == ["agent-0", "agent-1", "agent-2"]
    assert status_numbers(pool) == {
        "pool": "test", "state": "ready", "size": 3, "max_overflow": 0, "available": 3,
        "overflow": 0, "checked_out": 0, "waiting": 0, "replacing": 0,
        "counters": dict.fromkeys(pool.status().counters.model_dump(), 0),
        "last_error": None, "node": None, "pid": None, "process_index": None,
        "processes": [], "reservations": {}, "not_answering": [], "warmup_seconds": None,
        "loads": {}, "queued": None, "reserved": 0, "running": 0, "backlog": 0,
        "capacity": 0, "drain_rate": 0,
    }


def test_start_twice_builds_nothing_more(make_pool: Callable[..., Pool],
                                         tracker: Tracker) -> None:
    pool = make_pool(size=2)

    assert pool.start() is pool
    assert len(tracker.setups) == 2


def test_context_manager_starts_and_closes(tracker: Tracker) -> None:
    with tracked_pool(tracker, size=2) as pool:
        assert pool.status().available == 2

    assert pool.closed
    assert sorted(tracker.teardowns) == ["agent-0", "agent-1"]


def test_start_fails_with_cause_when_every_setup_fails(make_pool: Callable[..., Pool],
                                                       tracker: Tracker) -> None:
    tracker.fail_from = 0

    with pytest.raises(PoolStartError) as caught:
        make_pool(size=2)

    error = caught.value
    assert re.fullmatch(
        r"pool 'test' could not start: every agent failed setup 3 times; "
        r"last error: Boom: setup of agent-\d failed", str(error))
    assert error.pool == "test"
    assert error.cause is not None and error.cause.startswith("Boom: setup of agent-")
    assert isinstance(error.__cause__, Boom)
    assert len(tracker.setups) == 2 * START_ATTEMPTS
    # Every agent whose setup failed was torn down, in case setup opened something.
    assert sorted(tracker.teardowns) == sorted(tracker.setups)


def test_pool_that_failed_to_start_is_closed(make_pool: Callable[..., Pool],
                                             tracker: Tracker) -> None:
    tracker.fail_from = 0
    pool = make_pool(start=False, size=1)

    with pytest.raises(PoolStartError):
        pool.start()

    assert pool.closed
    with pytest.raises(PoolClosed):
        pool.checkout()


def test_checkout_before_start_fails_instead_of_waiting_forever(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(start=False, size=1, max_overflow=1)

    with pytest.raises(PoolError) as caught:
        pool.checkout(timeout=None)

    assert str(caught.value) == "pool 'test' is not started: call start() first"
    assert tracker.built == []


def test_transient_setup_failure_is_retried_and_pool_starts(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    tracker.fail_first = 1
    pool = make_pool(start=False, size=2)

    with receiving(telemetry.agent_setup_failed, sender=pool) as failed:
        pool.start()

    status = pool.status()
    assert status.available == 2
    assert status.replacing == 0
    assert status.counters.failures == 1
    assert status.last_error is not None
    assert re.fullmatch(r"Boom: setup of agent-\d failed", status.last_error)
    assert len(tracker.setups) == 3
    assert len(tracker.teardowns) == 1
    assert [(call["attempt"], call["retry_in"]) for call in failed.calls] == [(1, 0.1)]


def test_one_agent_failing_for_good_does_not_hold_start_to_its_timeout(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    tracker.fail_from = 1  # the first setup works, every later one fails
    pool = make_pool(start=False, size=2, start_timeout=30)
    stopwatch = threading.Event()
    timer = threading.Timer(15, stopwatch.set)
    timer.start()

    pool.start()  # after START_ATTEMPTS failures of the second agent, not 30 s

    timer.cancel()
    assert not stopwatch.is_set()
    status = pool.status()
    assert status.available == 1
    assert status.replacing == 1
    assert status.counters.failures >= START_ATTEMPTS
    agent = pool.checkout(block=False)
    assert agent.id in tracker.setups[:1]


def test_start_timeout_without_a_warm_agent_is_a_start_error(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    tracker.ungated = 0  # every setup waits for the gate

    with pytest.raises(PoolStartError) as caught:
        make_pool(size=2, start_timeout=0.05)

    assert str(caught.value) == (
        "pool 'test' could not start: no agent was warm within start_timeout=0.05s; "
        "last error: none")
    assert caught.value.cause is None


def test_close_while_starting_ends_start_with_an_error(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    tracker.ungated = 0
    pool = make_pool(start=False, size=2)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            pool.start()
        except PoolStartError as exc:
            errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    assert tracker.gated.wait(10)
    pool.close()
    join_all([starter])

    assert [str(error) for error in errors] == [
        "pool 'test' could not start: it was closed while starting; last error: none"]
    # An agent that finishes warming up after the close is torn down, never served.
    tracker.gate.set()
    assert tracker.wait_until(lambda: len(tracker.teardowns) == len(tracker.setups) >= 1)
    assert sorted(tracker.teardowns) == sorted(tracker.setups)
    assert pool.status().available == 0


# -- order -------------------------------------------------------------------------------


def test_lifo_hands_out_the_most_recently_returned_agent(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=3, strategy="lifo")
    first, second, third = (pool.checkout() for _ in range(3))
    for agent in (second, third, first):
        pool.checkin(agent)

    order = [pool.checkout() for _ in range(3)]

    assert order == [first, third, second]


def test_lifo_keeps_reusing_one_agent_when_used_one_at_a_time(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=3, strategy="lifo")
    used = []
    for _ in range(5):
        agent = pool.checkout()
        used.append(agent)
        pool.checkin(agent)

    assert used == [used[0]] * 5


def test_fifo_hands_out_the_least_recently_returned_agent(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=3, strategy="fifo")
    first, second, third = (pool.checkout() for _ in range(3))
    for agent in (second, third, first):
        pool.checkin(agent)

    order = [pool.checkout() for _ in range(3)]

    assert order == [second, third, first]


def test_fifo_round_robins_when_used_one_at_a_time(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=3, strategy="fifo")
    used = []
    for _ in range(6):
        agent = pool.checkout()
        used.append(agent)
        pool.checkin(agent)

    assert len(set(used[:3])) == 3
    assert used[3:] == used[:3]


# -- bounds and waiting ------------------------------------------------------------------


def test_forty_threads_never_hold_more_than_size_plus_overflow(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=4, max_overflow=2)
    lock = threading.Lock()
    held = {"now": 0, "max": 0}
    agents_held: set[str] = set()
    release = threading.Event()
    failures: list[BaseException] = []

    def hold(agent: TrackedAgent) -> None:
        with lock:
            assert agent.id not in agents_held, f"{agent.id} handed out twice"
            agents_held.add(agent.id)
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])

    def give_back(agent: TrackedAgent) -> None:
        with lock:
            agents_held.discard(agent.id)
            held["now"] -= 1
        pool.checkin(agent)

    def worker(index: int) -> None:
        try:
            agent = pool.checkout(timeout=20)
            hold(agent)
            release.wait(20)
            give_back(agent)
            for _ in range(5):  # then churn, to race checkouts against checkins
                agent = pool.checkout(timeout=20)
                hold(agent)
                give_back(agent)
        except BaseException as exc:
            failures.append(exc)

    with receiving(telemetry.pool_exhausted, sender=pool) as exhausted:
        threads = run_threads(40, worker)
        # 6 hold an agent and wait for release; the other 34 are queued.
        assert exhausted.wait_for(34)
        assert pool.status().checked_out == 6
        assert pool.status().waiting == 34
        release.set()
        join_all(threads)

    assert failures == []
    assert held == {"now": 0, "max": 6}
    status = pool.status()
    assert (status.available, status.checked_out, status.overflow, status.waiting) == (
        4, 0, 0, 0)
    assert status.counters.checkouts == 40 * 6
    assert status.counters.checkins == 40 * 6
    assert status.counters.timeouts == 0
    # Only overflow agents were ever closed, each once, and none is left.
    assert status.counters.dismissed == status.counters.overflow_created >= 2
    assert len(tracker.teardowns) == len(set(tracker.teardowns)) == status.counters.dismissed
    assert not set(tracker.teardowns) & {agent.id for agent in tracker.built[:4]}


def test_timeout_race_loses_no_hand_off(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=2)
    timeout = 0.02
    got: list[str] = []
    timed_out: list[CheckoutTimeout] = []
    lock = threading.Lock()
    first_timeout = threading.Event()

    def waiter(index: int) -> None:
        try:
            agent = pool.checkout(timeout=timeout)
        except CheckoutTimeout as exc:
            with lock:
                timed_out.append(exc)
            first_timeout.set()
            return
        with lock:
            got.append(agent.id)
        pool.checkin(agent)

    for _ in range(10):
        held = [pool.checkout(), pool.checkout()]
        first_timeout.clear()
        with receiving(telemetry.pool_exhausted, sender=pool) as exhausted:
            threads = run_threads(10, waiter)
            assert exhausted.wait_for(10)
            # Give the agents back just as the waiters start timing out: some take them,
            # the rest time out; none may time out holding one.
            assert first_timeout.wait(10)
            for agent in held:
                pool.checkin(agent)
            join_all(threads)

        status = pool.status()
        assert (status.available, status.checked_out, status.waiting) == (2, 0, 0)

    assert len(got) + len(timed_out) == 100
    assert len(timed_out) >= 10
    assert all(error.waited >= timeout for error in timed_out)
    counters = pool.status().counters
    assert counters.timeouts == len(timed_out)
    assert counters.checkouts == counters.checkins == 20 + len(got)


def test_waiters_are_served_first_come_first_served(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    held = pool.checkout()
    served: list[int] = []

    def waiter(index: int) -> None:
        agent = pool.checkout(timeout=20)
        served.append(index)
        pool.checkin(agent)

    threads = []
    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        for index in range(6):
            threads += run_threads(1, lambda _, index=index: waiter(index))
            assert queued.wait_for(index + 1)  # queued before the next one comes
    assert pool.status().waiting == 6

    pool.checkin(held)
    join_all(threads)

    assert served == [0, 1, 2, 3, 4, 5]


def test_non_blocking_checkout_of_exhausted_pool_raises(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    pool.checkout()
    before = status_numbers(pool)

    with pytest.raises(PoolExhausted) as caught:
        pool.checkout(block=False)

    error = caught.value
    assert str(error) == (
        "pool 'test' is exhausted: all 1 agents and 0 overflow agents are checked out")
    assert (error.pool, error.size, error.max_overflow) == ("test", 1, 0)
    after = status_numbers(pool)
    assert after["counters"]["exhausted"] == 1
    after["counters"]["exhausted"] = 0
    assert after == before


def test_checkout_timeout_says_how_long_it_waited_and_the_bounds(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1, max_overflow=1)
    pool.checkout()
    pool.checkout()

    with pytest.raises(CheckoutTimeout) as caught:
        pool.checkout(timeout=0.05)

    error = caught.value
    assert re.fullmatch(
        r"pool 'test': no agent free after waiting 0\.\d{3}s \(timeout 0\.05s; "
        r"size 1, max_overflow 1, all checked out\)", str(error))
    assert error.waited >= 0.05
    assert f"{error.waited:.3f}s" in str(error)
    assert (error.pool, error.size, error.max_overflow) == ("test", 1, 1)
    assert isinstance(error, TimeoutError)
    status = pool.status()
    assert (status.waiting, status.counters.timeouts, status.counters.exhausted) == (0, 1, 1)
    rebuilt = CheckoutTimeout(*error.args)
    assert (str(rebuilt), rebuilt.waited, rebuilt.size) == (str(error), error.waited, 1)


def test_zero_timeout_fails_at_once(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    pool.checkout()

    with pytest.raises(CheckoutTimeout):
        pool.checkout(timeout=0)


# -- overflow ----------------------------------------------------------------------------


def test_overflow_agent_is_built_only_when_all_are_out_and_room_remains(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=2, max_overflow=1)
    base = [pool.checkout(), pool.checkout()]

    assert len(tracker.built) == 2
    assert (pool.status().state, pool.status().overflow) == ("overflow", 0)

    extra = pool.checkout(block=False)

    assert extra not in base
    assert extra is tracker.built[2]
    status = pool.status()
    assert (status.state, status.overflow, status.checked_out, status.available) == (
        "full", 1, 3, 0)
    assert status.counters.overflow_created == 1
    with pytest.raises(PoolExhausted):
        pool.checkout(block=False)


def test_overflow_agent_is_dismissed_not_base_agent(make_pool: Callable[..., Pool],
                                                    tracker: Tracker) -> None:
    pool = make_pool(size=2, max_overflow=1)
    first, second = pool.checkout(), pool.checkout()
    extra = pool.checkout()

    pool.checkin(first)  # a base agent comes back while the overflow one is out: kept
    assert tracker.teardowns == []
    assert (pool.status().available, pool.status().overflow) == (1, 1)

    pool.checkin(extra)
    pool.checkin(second)

    assert tracker.teardowns == [extra.id]
    status = pool.status()
    assert (status.available, status.overflow, status.checked_out) == (2, 0, 0)
    assert status.counters.dismissed == 1
    assert {pool.checkout(), pool.checkout()} == {first, second}


def test_overflow_agent_goes_to_a_waiter_before_it_is_dismissed(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=1, max_overflow=1)
    pool.checkout()
    extra = pool.checkout()
    got: list[TrackedAgent] = []

    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        thread = run_threads(1, lambda _: got.append(pool.checkout(timeout=20)))
        assert queued.wait_for(1)
    pool.checkin(extra)
    join_all(thread)

    assert got == [extra]
    assert tracker.teardowns == []


def test_idle_overflow_agent_lingers_for_overflow_ttl(make_pool: Callable[..., Pool],
                                                      tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, max_overflow=1, overflow_ttl=30, clock=clock)
    base = pool.checkout()
    extra = pool.checkout()
    pool.checkin(extra)
    pool.checkin(base)

    assert (pool.status().available, pool.status().overflow) == (2, 1)
    clock.advance(29.9)
    assert pool.dismiss_idle_overflow() == 0
    assert tracker.teardowns == []

    with receiving(telemetry.agent_dismissed, sender=pool) as dismissed:
        clock.advance(0.1)
        # The pool's own background sweep may get there first: either way, once.
        pool.dismiss_idle_overflow()
        assert dismissed.wait_for(1)

    assert tracker.teardowns == [extra.id]
    assert [(call["agent"], call["idle"]) for call in dismissed.calls] == [(extra, 30.0)]
    status = pool.status()
    assert (status.available, status.overflow, status.counters.dismissed) == (1, 0, 1)
    assert pool.checkout() is base


def test_overflow_room_freed_while_waiting_goes_to_the_first_waiter(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=1, max_overflow=1)
    pool.checkout()  # the base agent stays out throughout
    extra = pool.checkout()
    got: list[TrackedAgent] = []

    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        thread = run_threads(1, lambda _: got.append(pool.checkout(timeout=20)))
        assert queued.wait_for(1)
    extra.broken = Boom("worn out")
    pool.checkin(extra)  # dismissed: its room must not stay unused while someone waits
    join_all(thread)

    assert len(got) == 1
    assert got[0] is tracker.built[2]
    status = pool.status()
    assert (status.checked_out, status.overflow, status.waiting) == (2, 1, 0)
    assert tracker.teardowns == [extra.id]


def test_failed_overflow_setup_makes_the_caller_wait_instead(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    tracker.fail_from = 1
    pool = make_pool(size=1, max_overflow=1)
    base = pool.checkout()
    got: list[TrackedAgent] = []

    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        thread = run_threads(1, lambda _: got.append(pool.checkout(timeout=20)))
        assert queued.wait_for(1)
    pool.checkin(base)
    join_all(thread)

    assert got == [base]
    assert pool.status().counters.failures == 1
    assert pool.status().overflow == 0


# -- replacement and recycling -----------------------------------------------------------


def test_discard_on_exception_replaces_agent_in_background_without_blocking(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=2, discard_on=(Boom,))
    tracker.ungated = 2  # the replacement's setup waits for the gate

    with receiving(telemetry.agent_started, sender=pool) as started:
        with pytest.raises(Boom), pool.agent() as broken:
            raise Boom("the client is gone")
        assert tracker.gated.wait(10)

        # The broken agent is torn down; its replacement is still warming up, and the
        # other agent is served meanwhile.
        assert tracker.teardowns == [broken.id]
        status = pool.status()
        assert (status.available, status.replacing, status.checked_out) == (1, 1, 0)
        other = pool.checkout(block=False)
        assert other is not broken
        pool.checkin(other)

        tracker.gate.set()
        assert started.wait_for(1)

    replacement = started.calls[0]["agent"]
    assert replacement is tracker.built[2]
    status = pool.status()
    assert (status.available, status.replacing) == (2, 0)
    assert status.counters.replacements == 1
    assert {pool.checkout(), pool.checkout()} == {other, replacement}


def test_other_exceptions_leave_the_agent_in_the_pool(make_pool: Callable[..., Pool],
                                                      tracker: Tracker) -> None:
    pool = make_pool(size=1, discard_on=(Boom,))

    with pytest.raises(KeyError), pool.agent() as agent:
        raise KeyError("not the agent's fault")

    assert tracker.teardowns == []
    assert pool.checkout() is agent


def test_action_failing_with_discard_on_cause_replaces_agent(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=1, discard_on=(Boom,))

    with receiving(telemetry.agent_started, sender=pool) as started:
        with pytest.raises(ActionFailed):
            pool.call(Signal.new("counter.fail"))
        assert started.wait_for(1)

    assert tracker.teardowns == ["agent-0"]
    assert pool.checkout() is tracker.built[1]
    counters = pool.status().counters
    assert (counters.calls, counters.call_failures, counters.replacements) == (1, 1, 1)


def test_failed_health_check_replaces_agent(make_pool: Callable[..., Pool],
                                            tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, health_check_interval=10, clock=clock)
    first = pool.checkout()
    pool.checkin(first)
    clock.advance(9.9)
    assert pool.checkout() is first  # idle less than the interval: not checked
    pool.checkin(first)
    assert tracker.health_checks == []

    tracker.unhealthy.add(first.id)
    clock.advance(10)
    second = pool.checkout(timeout=10)  # waits for the replacement

    assert second is tracker.built[1]
    assert tracker.health_checks == [first.id]
    assert tracker.teardowns == [first.id]
    counters = pool.status().counters
    assert (counters.replacements, counters.checkouts) == (1, 3)


def test_healthy_agent_idle_past_interval_is_checked_and_kept(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, health_check_interval=10, clock=clock)
    agent = pool.checkout()
    pool.checkin(agent)
    clock.advance(10)

    assert pool.checkout() is agent
    assert tracker.health_checks == [agent.id]
    assert tracker.teardowns == []


def test_agent_handed_from_caller_to_caller_is_not_health_checked(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, health_check_interval=10, clock=clock)
    agent = pool.checkout()
    got: list[TrackedAgent] = []

    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        thread = run_threads(1, lambda _: got.append(pool.checkout(timeout=20)))
        assert queued.wait_for(1)
    clock.advance(60)  # busy all along: never idle, so nothing to check
    pool.checkin(agent)
    join_all(thread)

    assert got == [agent]
    assert tracker.health_checks == []


def test_health_check_raising_counts_as_unhealthy(make_pool: Callable[..., Pool],
                                                  tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, health_check_interval=0, clock=clock)
    agent = pool.checkout()
    pool.checkin(agent)

    def explode() -> bool:
        raise ConnectionError("gone")

    agent.check_health = explode  # type: ignore[method-assign]

    assert pool.checkout(timeout=10) is tracker.built[1]
    assert tracker.teardowns == [agent.id]


def test_max_uses_recycles_agent(make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=1, max_uses=2)

    with receiving(telemetry.agent_replaced, sender=pool) as replaced:
        for _ in range(2):
            agent = pool.checkout()
            pool.checkin(agent)
        assert replaced.wait_for(1)

    assert replaced.calls[0]["reason"] == "max_uses=2 reached"
    assert pool.checkout(timeout=10) is tracker.built[1]
    assert tracker.teardowns == [agent.id]


def test_max_age_recycles_agent_at_checkout(make_pool: Callable[..., Pool],
                                            tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, max_age=60, clock=clock)
    agent = pool.checkout()
    pool.checkin(agent)
    clock.advance(59.9)
    assert pool.checkout() is agent
    pool.checkin(agent)

    clock.advance(0.1)

    assert pool.checkout(timeout=10) is tracker.built[1]
    assert tracker.teardowns == [agent.id]
    assert pool.status().counters.replacements == 1


def test_max_age_recycles_agent_at_checkin(make_pool: Callable[..., Pool],
                                           tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, max_age=60, clock=clock)

    with receiving(telemetry.agent_replaced, sender=pool) as replaced:
        agent = pool.checkout()
        clock.advance(60)
        pool.checkin(agent)
        assert replaced.wait_for(1)

    assert replaced.calls[0]["reason"] == "max_age=60.0s reached"
    assert pool.checkout(timeout=10) is tracker.built[1]


def test_overflow_agent_failing_health_check_is_dismissed_not_replaced(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    clock = FakeClock()
    pool = make_pool(size=1, max_overflow=1, overflow_ttl=100, health_check_interval=5,
                     clock=clock)
    base = pool.checkout()
    extra = pool.checkout()
    pool.checkin(extra)
    tracker.unhealthy.add(extra.id)
    clock.advance(5)

    # The unhealthy overflow agent is dismissed; the caller gets a fresh overflow agent.
    assert pool.checkout() is tracker.built[2]
    assert tracker.teardowns == [extra.id]
    counters = pool.status().counters
    assert (counters.dismissed, counters.replacements) == (1, 0)
    pool.checkin(base)


# -- checkin rules -----------------------------------------------------------------------


def test_double_checkin_raises_and_changes_nothing(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=2)
    agent = pool.checkout()
    pool.checkin(agent)
    before = status_numbers(pool)

    with pytest.raises(NotCheckedOut) as caught:
        pool.checkin(agent)

    assert str(caught.value) == (
        f"pool 'test': {agent!r} is not checked out from this pool (already checked in, "
        "or never handed out by it)")
    assert status_numbers(pool) == before


def test_checkin_of_foreign_agent_raises_and_changes_nothing(
        make_pool: Callable[..., Pool]) -> None:
    pool, other = make_pool(size=1), make_pool(size=1)
    held = pool.checkout()
    foreign = other.checkout()
    before = status_numbers(pool)

    for stranger in (foreign, CounterAgent()):
        with pytest.raises(NotCheckedOut):
            pool.checkin(stranger)  # type: ignore[arg-type]

    assert status_numbers(pool) == before
    pool.checkin(held)
    other.checkin(foreign)


def test_double_checkin_with_reset_on_checkin_raises(make_pool: Callable[..., Pool],
                                                     tracker: Tracker) -> None:
    pool = make_pool(size=1, reset_on_checkin=True)
    agent = pool.checkout()
    pool.checkin(agent)
    before = status_numbers(pool)

    with pytest.raises(NotCheckedOut):
        pool.checkin(agent)

    assert status_numbers(pool) == before
    assert tracker.resets == [agent.id]


def test_reset_on_checkin_restores_state_and_keeps_resources(
        make_pool: Callable[..., Pool], tracker: Tracker) -> None:
    pool = make_pool(size=1, reset_on_checkin=True)
    agent = pool.checkout()
    client = agent.state.client
    agent.handle(Signal.new("counter.increment", {"by": 4}))
    pool.checkin(agent)

    again = pool.checkout()

    assert again is agent
    assert tracker.resets == [agent.id]
    assert again.public_state() == {"count": 0, "history": []}
    assert again.state.client is client


def test_without_reset_on_checkin_state_carries_over(make_pool: Callable[..., Pool],
                                                     tracker: Tracker) -> None:
    pool = make_pool(size=1)
    pool.call(Signal.new("counter.increment", {"by": 4}))

    reply = pool.call(Signal.new("counter.increment"))

    assert reply.state == {"count": 5, "history": [4, 5]}
    assert tracker.resets == []


# -- status ------------------------------------------------------------------------------


def test_status_state_and_numbers_follow_checkouts(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=2, max_overflow=1)
    seen = []
    held = []
    for _ in range(3):
        status = pool.status()
        seen.append((status.state, status.available, status.checked_out, status.overflow,
                     status.alive))
        held.append(pool.checkout())
    status = pool.status()
    seen.append((status.state, status.available, status.checked_out, status.overflow,
                 status.alive))

    assert seen == [
        ("ready", 2, 0, 0, 2),
        ("ready", 1, 1, 0, 2),
        ("overflow", 0, 2, 0, 2),
        ("full", 0, 3, 1, 3),
    ]


def test_status_is_a_whole_status_and_leaves_no_garbage(make_pool: Callable[..., Pool]) -> None:
    # A prefork child's publisher reads it up to 50 times a second: garbage cycles there
    # (model_construct calling default factories through inspect) cost every child memory.
    pool = make_pool(size=1)
    pool.checkin(pool.checkout())
    status = pool.status()
    assert status == PoolStatus.model_validate(status.model_dump())  # every field set
    assert status.counters.checkouts == status.counters.checkins == 1
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            pool.status().model_dump(mode="json")
        assert gc.collect() == 0
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


# -- calls and transactions --------------------------------------------------------------


def test_call_handles_signal_on_a_pooled_agent(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1, node="node-a")

    reply = pool.call(Signal.new("counter.increment", {"by": 2}))

    assert (reply.pool, reply.agent_id, reply.node) == ("test", "agent-0", "node-a")
    assert reply.state == {"count": 2, "history": [2]}
    status = pool.status()
    assert (status.available, status.counters.calls, status.counters.call_failures) == (
        1, 1, 0)


def test_transaction_applies_all_signals_on_one_agent(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=2)

    replies = pool.transaction([Signal.new("counter.increment"),
                                Signal.new("counter.increment", {"by": 2})])

    assert [reply.state["count"] for reply in replies] == [1, 3]
    assert replies[0].agent_id == replies[1].agent_id


def test_transaction_rolls_back_state_on_failure(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    pool.call(Signal.new("counter.increment", {"by": 10}))

    with pytest.raises(ActionFailed):
        pool.transaction([Signal.new("counter.increment"), Signal.new("counter.increment"),
                          Signal.new("counter.fail")])

    agent = pool.checkout()
    assert agent.public_state() == {"count": 10, "history": [10]}
    counters = pool.status().counters
    assert (counters.calls, counters.call_failures) == (4, 1)


def test_transaction_validates_every_signal_before_running_any(
        make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)

    with pytest.raises(InvalidSignal, match="invalid signal"):
        pool.transaction([Signal.new("counter.increment"), {"source": "/no-type"}])

    assert pool.checkout().public_state() == {"count": 0, "history": []}


def test_call_timeout_abandons_and_replaces_the_agent(make_pool: Callable[..., Pool],
                                                      tracker: Tracker) -> None:
    pool = make_pool(size=1)
    proceed = threading.Event()
    agent = pool.checkout()
    pool.checkin(agent)
    original_handle = agent.handle

    def slow_handle(signal: Any, cancellation: Any = NEVER) -> Any:
        proceed.wait(10)
        return original_handle(signal, cancellation)

    agent.handle = slow_handle  # type: ignore[method-assign]

    with receiving(telemetry.agent_started, sender=pool) as started:
        with pytest.raises(CallTimeout) as caught:
            pool.call(Signal.new("counter.increment"), call_timeout=0.05)
        assert started.wait_for(1)

    assert str(caught.value) == (
        "pool 'test': counter.increment took longer than call_timeout=0.05s; agent "
        "agent-0 is being replaced")
    assert pool.checkout(block=False) is tracker.built[1]
    assert tracker.teardowns == []  # the overrunning work is still going on
    proceed.set()
    # Once the work ends, the abandoned agent is torn down; its state change is moot.
    assert tracker.wait_until(lambda: tracker.teardowns == [agent.id])
    assert pool.status().counters.replacements == 1


# -- close -------------------------------------------------------------------------------


def test_close_tears_down_each_agent_exactly_once(make_pool: Callable[..., Pool],
                                                  tracker: Tracker) -> None:
    pool = make_pool(size=3, max_overflow=1)
    agents = [pool.checkout() for _ in range(4)]
    held, extra = agents[0], agents[3]
    pool.checkin(agents[1])
    pool.checkin(agents[2])

    pool.close()
    assert sorted(tracker.teardowns) == sorted(
        agent.id for agent in tracker.built if agent not in (held, extra))

    pool.checkin(held)
    pool.checkin(extra)
    pool.close()

    assert sorted(tracker.teardowns) == sorted(agent.id for agent in tracker.built)
    assert len(tracker.teardowns) == 4


def test_checkout_after_close_raises(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    pool.close()

    with pytest.raises(PoolClosed) as caught:
        pool.checkout()

    assert str(caught.value) == "pool 'test' is closed"
    with pytest.raises(PoolClosed):
        pool.start()


def test_waiters_get_pool_closed_on_close(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(size=1)
    pool.checkout()
    errors: list[BaseException] = []

    def waiter(index: int) -> None:
        try:
            pool.checkout(timeout=20)
        except PoolClosed as exc:
            errors.append(exc)

    with receiving(telemetry.pool_exhausted, sender=pool) as queued:
        threads = run_threads(3, waiter)
        assert queued.wait_for(3)
    pool.close()
    join_all(threads)

    assert [str(error) for error in errors] == ["pool 'test' was closed"] * 3
    assert pool.status().waiting == 0


# -- from a spec -------------------------------------------------------------------------


def test_pool_from_spec_gives_each_agent_its_own_initial_state() -> None:
    spec = PoolSpec("counters", CounterAgent, size=2, initial_state={"history": [1]},
                    strategy="fifo")

    with AgentPool.from_spec(spec, node="node-a") as pool:
        first, second = pool.checkout(), pool.checkout()
        first.state.history.append(2)

        assert second.state.history == [1]
        assert spec.initial_state == {"history": [1]}
        assert (first.pool_name, first.node) == ("counters", "node-a")
        assert pool.options.strategy == "fifo"


def test_an_interrupted_waiter_gives_back_the_agent_handed_to_it() -> None:
    import ctypes

    class Interrupt(BaseException):
        """Stands for a hard time limit or Ctrl-C arriving while a caller waits."""

    pool = AgentPool(CounterAgent, name="interrupted", size=1).start()
    try:
        held = pool.checkout()
        waiting = threading.Event()
        outcome: list[str] = []

        def wait_for_agent() -> None:
            waiting.set()
            try:
                pool.checkout(timeout=5)
            except Interrupt:
                outcome.append("interrupted")

        thread = threading.Thread(target=wait_for_agent)
        thread.start()
        waiting.wait()
        while pool.status().waiting != 1:
            time.sleep(0.001)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(Interrupt))
        pool.checkin(held)  # handed to the waiter, which is interrupted as it wakes
        thread.join(5)
        assert outcome == ["interrupted"]
        status = pool.status()
        assert (status.available, status.checked_out, status.waiting) == (1, 0, 0)
        assert pool.checkout(timeout=1) is held
    finally:
        pool.close()
