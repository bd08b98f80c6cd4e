"""The pool monitor: a rate-limited warning and telemetry when a pool runs out of agents."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from celery_warmpool import AgentPool, ConfigurationError, PoolExhausted, PoolSpec, telemetry

from .core_agents import CounterAgent, FakeClock, receiving

WARNING = "is exhausted"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pools() -> Iterator[list[AgentPool[Any]]]:
    made: list[AgentPool[Any]] = []
    yield made
    for pool in made:
        pool.close()


def monitored(pools: list[AgentPool[Any]], clock: FakeClock, **options: Any,
              ) -> AgentPool[Any]:
    options.setdefault("monitor_interval", 10.0)
    pool: AgentPool[Any] = AgentPool(CounterAgent, name="search", clock=clock, **options)
    pools.append(pool)
    return pool.start()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "celery_warmpool.core.monitor" and record.levelno == logging.WARNING]


def test_running_on_overflow_logs_a_warning_with_the_numbers(pools, clock, caplog):
    pool = monitored(pools, clock, size=1, max_overflow=2)
    base = pool.checkout()

    with receiving(telemetry.pool_pressure, sender=pool) as pressure:
        overflow = pool.checkout()

    assert warnings(caplog) == [
        "pool 'search' is exhausted and running on overflow: size=1 checked_out=2 overflow=1 "
        "max_overflow=2 waiting=0 (pressure events since the last warning: 1)"]
    [sent] = pressure.calls
    assert set(sent) == {"signal", "sender", "status", "events"}
    assert sent["sender"] is pool
    assert sent["events"] == 1
    assert (sent["status"].size, sent["status"].checked_out, sent["status"].overflow,
            sent["status"].available) == (1, 2, 1, 0)
    pool.checkin(overflow)
    pool.checkin(base)


def test_warns_at_most_once_per_interval(pools, clock, caplog):
    pool = monitored(pools, clock, size=1, max_overflow=1, monitor_interval=10.0)
    base = pool.checkout()

    with receiving(telemetry.pool_pressure, sender=pool) as pressure:
        for advance in (0.0, 4.0, 5.9):  # 0 s, 4 s, 9.9 s after the first warning
            clock.advance(advance)
            pool.checkin(pool.checkout())
        assert len(warnings(caplog)) == 1
        clock.advance(0.1)  # 10 s after it
        pool.checkin(pool.checkout())

    assert len(warnings(caplog)) == 2
    assert warnings(caplog)[1].endswith("(pressure events since the last warning: 3)")
    assert [call["events"] for call in pressure.calls] == [1, 3]
    pool.checkin(base)


def test_quiet_while_base_agents_suffice(pools, clock, caplog):
    pool = monitored(pools, clock, size=2, max_overflow=1)

    with receiving(telemetry.pool_pressure, sender=pool) as pressure:
        agents = [pool.checkout(), pool.checkout()]
        for agent in agents:
            pool.checkin(agent)

    assert warnings(caplog) == []
    assert pressure.calls == []


def test_reused_overflow_agent_while_base_agents_idle_is_not_pressure(pools, clock, caplog):
    pool = monitored(pools, clock, size=1, max_overflow=1, overflow_ttl=60)
    base = pool.checkout()
    overflow = pool.checkout()  # the pool ran out: one warning
    pool.checkin(base)
    pool.checkin(overflow)  # lingers (overflow_ttl); last in, so lifo hands it out first
    clock.advance(10.0)

    again = pool.checkout()

    assert again is overflow
    assert len(warnings(caplog)) == 1
    pool.checkin(again)


def test_a_waiting_checkout_warns_without_overflow(pools, clock, caplog):
    pool = monitored(pools, clock, size=1, max_overflow=0)
    held = pool.checkout()
    got: list[Any] = []

    with receiving(telemetry.pool_pressure, sender=pool) as pressure:
        waiter = threading.Thread(target=lambda: got.append(pool.checkout(timeout=10)))
        waiter.start()
        assert pressure.wait_for(1)
        pool.checkin(held)
        waiter.join(10)

    assert got == [held]
    assert warnings(caplog) == [
        "pool 'search' is exhausted: size=1 checked_out=1 overflow=0 max_overflow=0 "
        "waiting=1 (pressure events since the last warning: 1)"]
    pool.checkin(held)


def test_a_refused_checkout_warns(pools, clock, caplog):
    pool = monitored(pools, clock, size=1)
    held = pool.checkout()

    with pytest.raises(PoolExhausted):
        pool.checkout(block=False)

    assert len(warnings(caplog)) == 1
    pool.checkin(held)


def test_without_monitor_interval_nothing_listens(pools, clock, caplog):
    checkout_receivers = len(telemetry.agent_checkout.receivers)
    pool: AgentPool[Any] = AgentPool(CounterAgent, name="plain", size=1, max_overflow=1,
                                     clock=clock)
    pools.append(pool.start())

    base, overflow = pool.checkout(), pool.checkout()

    assert len(telemetry.agent_checkout.receivers) == checkout_receivers
    assert pool.hooks.agent_checkout == ()
    assert pool.hooks.pool_exhausted == ()
    assert warnings(caplog) == []
    pool.checkin(overflow)
    pool.checkin(base)


def test_the_monitor_listens_to_its_own_pool_only_until_it_closes(clock):
    checkout_receivers = len(telemetry.agent_checkout.receivers)
    exhausted_receivers = len(telemetry.pool_exhausted.receivers)
    pool: AgentPool[Any] = AgentPool(CounterAgent, name="closing", size=1, clock=clock,
                                     monitor_interval=5)
    other: AgentPool[Any] = AgentPool(CounterAgent, name="other", size=1, clock=clock)
    pool.start()
    assert pool.hooks.listeners(telemetry.agent_checkout) == 1
    assert pool.hooks.listeners(telemetry.pool_exhausted) == 1
    assert other.hooks.agent_checkout == ()  # another pool pays nothing for it
    assert len(telemetry.agent_checkout.receivers) == checkout_receivers

    pool.close()

    assert pool.hooks.listeners(telemetry.agent_checkout) == 0
    assert pool.hooks.listeners(telemetry.pool_exhausted) == 0
    assert len(telemetry.agent_checkout.receivers) == checkout_receivers
    assert len(telemetry.pool_exhausted.receivers) == exhausted_receivers


@pytest.mark.parametrize("interval", [0, -1, "often"])
def test_monitor_interval_must_be_a_positive_number(interval):
    with pytest.raises(ConfigurationError, match="pool 'search': invalid monitor_interval"):
        AgentPool(CounterAgent, name="search", monitor_interval=interval)


def test_monitor_interval_from_the_environment():
    spec = PoolSpec("search", CounterAgent).with_environment(
        {"WARMPOOL_SEARCH_MONITOR_INTERVAL": "30"})
    assert spec.monitor_interval == 30.0
    assert spec.options.monitor_interval == 30.0


@pytest.mark.integration
def test_worker_logs_the_warning_once_per_interval(start_worker, client):
    specs = [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1,
              "max_overflow": 1, "monitor_interval": 60}]
    worker = start_worker(specs, pool="threads", concurrency=2)
    _, warm = client(specs)
    work = {"type": "counter.work", "data": {"seconds": 0.5}}

    for _ in range(2):  # two rounds, each running two calls at once on one base agent
        callers = [threading.Thread(target=lambda: warm.call("counter", work))
                   for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
    assert warm.status("counter").counters.overflow_created == 2

    line = ("pool 'counter' is exhausted and running on overflow: size=1 checked_out=2 "
            "overflow=1 max_overflow=1 waiting=0 (pressure events since the last warning: 1)")
    assert worker.wait_for_log(line)
    assert worker.log().count(WARNING) == 1
