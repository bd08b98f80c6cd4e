"""Resizing a running pool, and handing its waiting callers back (no Celery)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celery_warmpool import AgentPool, ConfigurationError, HandedBack, telemetry

from .core_agents import Tracker, receiving, tracked_pool


@pytest.fixture
def tracker():
    tracker = Tracker()
    yield tracker
    tracker.gate.set()


def wait_for(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_growing_builds_new_agents_warm_before_they_count(tracker):
    pool = tracked_pool(tracker, size=2).start()
    with receiving(telemetry.agent_started, sender=pool) as started:
        pool.resize(size=4)
        assert pool.status().size == 4  # the target shows at once
        wait_for(lambda: pool.status().alive == 4)
    assert len(started.calls) == 2
    assert sorted(tracker.setups) == sorted(agent.id for agent in tracker.built)  # all warm
    assert pool.status().replacing == 0
    pool.close()


def test_shrinking_closes_idle_agents_now_and_busy_ones_when_they_come_back(tracker):
    pool = tracked_pool(tracker, size=4).start()
    busy = [pool.checkout(), pool.checkout(), pool.checkout()]
    pool.resize(size=1)
    status = pool.status()
    assert (status.size, status.available, status.checked_out) == (1, 0, 3)
    assert len(tracker.teardowns) == 1  # the idle one
    pool.checkin(busy[0])
    pool.checkin(busy[1])
    assert len(tracker.teardowns) == 3  # surplus, closed on its way back
    pool.checkin(busy[2])
    status = pool.status()
    assert (status.available, status.checked_out, status.replacing) == (1, 0, 0)
    assert status.counters.replacements == 0  # surplus is dismissed, not replaced
    pool.close()


def test_an_invalid_size_is_refused_and_changes_nothing(tracker):
    pool = tracked_pool(tracker, size=2).start()
    with pytest.raises(ConfigurationError, match="invalid size"):
        pool.resize(size=0)
    with pytest.raises(ConfigurationError, match="invalid max_overflow"):
        pool.resize(max_overflow=-1)
    status = pool.status()
    assert (status.size, status.max_overflow, status.alive) == (2, 0, 2)
    pool.close()


def test_shrinking_overflow_dismisses_idle_overflow_agents(tracker):
    pool = tracked_pool(tracker, size=1, max_overflow=2, overflow_ttl=60).start()
    agents = [pool.checkout() for _ in range(3)]
    for agent in agents:
        pool.checkin(agent)
    assert pool.status().overflow == 2
    pool.resize(max_overflow=0)
    status = pool.status()
    assert (status.overflow, status.max_overflow, status.available) == (0, 0, 1)
    pool.close()


def test_handing_back_wakes_every_waiter_and_refuses_new_waits(tracker):
    pool = tracked_pool(tracker, size=1).start()
    held = pool.checkout()
    outcomes: list[Any] = []
    waiters = [threading.Thread(target=lambda: outcomes.append(_outcome(pool)))
               for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    wait_for(lambda: pool.status().waiting == 2)

    assert pool.hand_back() == 2
    for waiter in waiters:
        waiter.join(5)
    assert [type(outcome) for outcome in outcomes] == [HandedBack, HandedBack]
    with pytest.raises(HandedBack):
        pool.checkout(timeout=5)  # would wait: refused at once
    pool.checkin(held)
    assert pool.checkout(timeout=1) is held  # an idle agent is still lent
    pool.resume()
    pool.close()


def _outcome(pool: AgentPool[Any]) -> Any:
    try:
        return pool.checkout(timeout=10)
    except Exception as exc:
        return exc
