"""Telemetry: every signal fires with the documented keyword arguments."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from celery_warmpool import ActionFailed, AgentPool, CheckoutTimeout, Signal, telemetry
from celery_warmpool.core.telemetry import TelemetrySignal

from .core_agents import Boom, TrackedAgent, Tracker, receiving, tracked_pool

ALL_SIGNALS = [getattr(telemetry, name) for name in telemetry.__all__
               if isinstance(getattr(telemetry, name), TelemetrySignal)
               and name != "TelemetrySignal"]

Pool = AgentPool[TrackedAgent]


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    tracker = Tracker()
    yield tracker
    tracker.gate.set()


@pytest.fixture
def pool(tracker: Tracker) -> Iterator[Pool]:
    pool = tracked_pool(tracker, size=1, max_overflow=1, discard_on=(Boom,)).start()
    yield pool
    pool.close()


def keys(call: dict[str, Any]) -> set[str]:
    return set(call)


def test_no_signal_takes_an_argument_named_signal() -> None:
    # Celery's dispatcher passes its own ``signal=``: one of ours would break receivers.
    assert len(ALL_SIGNALS) == 14
    for signal in ALL_SIGNALS:
        assert "signal" not in signal.providing_args, signal.name
        assert "sender" not in signal.providing_args, signal.name


def test_agent_started_at_start(tracker: Tracker) -> None:
    pool = tracked_pool(tracker, size=2)

    with receiving(telemetry.agent_started, sender=pool) as started:
        pool.start()
    pool.close()

    assert len(started.calls) == 2
    for call in started.calls:
        assert keys(call) == {"signal", "sender", "agent", "overflow", "duration"}
        assert call["signal"] is telemetry.agent_started
        assert call["sender"] is pool
        assert call["overflow"] is False
        assert call["duration"] >= 0
    assert {call["agent"] for call in started.calls} == set(tracker.built)


def test_agent_setup_failed_says_attempt_and_back_off(tracker: Tracker) -> None:
    tracker.fail_first = 1
    pool = tracked_pool(tracker, size=1)

    with receiving(telemetry.agent_setup_failed, sender=pool) as failed:
        pool.start()
    pool.close()

    [call] = failed.calls
    assert keys(call) == {"signal", "sender", "exception", "attempt", "retry_in"}
    assert isinstance(call["exception"], Boom)
    assert (call["attempt"], call["retry_in"]) == (1, 0.1)


def test_checkout_and_checkin(pool: Pool) -> None:
    with receiving(telemetry.agent_checkout, sender=pool) as out, \
            receiving(telemetry.agent_checkin, sender=pool) as back:
        agent = pool.checkout()
        extra = pool.checkout()
        pool.checkin(agent)
        pool.checkin(extra)

    assert [keys(call) for call in out.calls] == [
        {"signal", "sender", "agent", "wait", "overflow"}] * 2
    assert [(call["agent"], call["overflow"]) for call in out.calls] == [
        (agent, False), (extra, True)]
    # Nobody waited: the base agent was idle and the overflow agent's build is instant.
    assert all(0 <= call["wait"] < 0.05 for call in out.calls)
    assert [keys(call) for call in back.calls] == [{"signal", "sender", "agent", "held"}] * 2
    assert [call["agent"] for call in back.calls] == [agent, extra]
    # Each was held from its checkout to its checkin: the first one longer.
    first, second = (call["held"] for call in back.calls)
    assert first >= second > 0


def test_checkout_after_waiting_reports_the_wait(pool: Pool) -> None:
    held = [pool.checkout(), pool.checkout()]
    got: list[TrackedAgent] = []

    with receiving(telemetry.pool_exhausted, sender=pool) as exhausted, \
            receiving(telemetry.agent_checkout, sender=pool) as out:
        waiter = threading.Thread(target=lambda: got.append(pool.checkout(timeout=10)))
        waiter.start()
        assert exhausted.wait_for(1)
        pool.checkin(held[0])
        waiter.join(10)

    assert got == [held[0]]
    [call] = out.calls
    assert call["agent"] is held[0]
    assert call["wait"] > 0
    assert [(call["blocking"], call["waiting"]) for call in exhausted.calls] == [(True, 1)]


def test_pool_exhausted_on_non_blocking_checkout(pool: Pool) -> None:
    pool.checkout()
    pool.checkout()

    with receiving(telemetry.pool_exhausted, sender=pool) as exhausted:
        with pytest.raises(pool.Exhausted):
            pool.checkout(block=False)
        with pytest.raises(CheckoutTimeout):
            pool.checkout(timeout=0)

    assert [keys(call) for call in exhausted.calls] == [
        {"signal", "sender", "blocking", "waiting"}] * 2
    # The refused checkout queued nobody; the one with timeout=0 queued itself.
    assert [(call["blocking"], call["waiting"]) for call in exhausted.calls] == [
        (False, 0), (True, 1)]


def test_call_start_and_stop(pool: Pool) -> None:
    signal = Signal.new("counter.increment", {"by": 2})

    with receiving(telemetry.call_start) as started, \
            receiving(telemetry.call_stop) as stopped:
        reply = pool.call(signal)

    [start] = started.calls
    assert keys(start) == {"signal", "sender", "agent", "event", "action"}
    assert start["sender"] is start["agent"]
    assert start["agent"].id == reply.agent_id
    assert (start["event"], start["action"]) == (signal, "increment")
    [stop] = stopped.calls
    assert keys(stop) == {"signal", "sender", "agent", "event", "action", "reply", "duration"}
    assert (stop["event"], stop["action"], stop["reply"]) == (signal, "increment", reply)
    assert stop["duration"] == reply.duration


def test_call_exception(pool: Pool) -> None:
    signal = Signal.new("counter.fail")

    with receiving(telemetry.call_exception) as failed, \
            receiving(telemetry.call_stop) as stopped, \
            pytest.raises(ActionFailed) as caught:
        pool.call(signal)

    assert stopped.calls == []
    [call] = failed.calls
    assert keys(call) == {"signal", "sender", "agent", "event", "action", "exception",
                          "duration"}
    assert (call["event"], call["action"]) == (signal, "fail")
    assert isinstance(call["exception"], Boom)
    assert caught.value.__cause__ is call["exception"]
    assert call["duration"] >= 0


def test_agent_replaced(pool: Pool, tracker: Tracker) -> None:
    with receiving(telemetry.agent_replaced, sender=pool) as replaced, \
            receiving(telemetry.agent_started, sender=pool) as started:
        with pytest.raises(Boom), pool.agent() as agent:
            raise Boom("the client is gone")
        assert started.wait_for(1)

    [call] = replaced.calls
    assert keys(call) == {"signal", "sender", "agent", "reason"}
    assert (call["agent"], call["reason"]) == (agent, "broken: Boom: the client is gone")
    assert started.calls[0]["agent"] is tracker.built[1]


def test_agent_dismissed(pool: Pool) -> None:
    pool.checkout()
    extra = pool.checkout()

    with receiving(telemetry.agent_dismissed, sender=pool) as dismissed:
        pool.checkin(extra)

    [call] = dismissed.calls
    assert keys(call) == {"signal", "sender", "agent", "idle"}
    assert (call["agent"], call["idle"]) == (extra, 0.0)


def test_receiver_that_raises_does_not_break_the_pool(pool: Pool) -> None:
    def broken_receiver(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    telemetry.agent_checkout.connect(broken_receiver, weak=False)
    try:
        agent = pool.checkout()
        pool.checkin(agent)
    finally:
        telemetry.agent_checkout.disconnect(broken_receiver)

    assert pool.status().counters.checkouts == 1
    assert pool.status().available == 1


def test_receivers_are_disconnected_after_the_block() -> None:
    with receiving(telemetry.agent_checkout):
        assert telemetry.agent_checkout.receivers

    assert not telemetry.agent_checkout.receivers


# -- listening to one pool ---------------------------------------------------------------


def test_every_pool_signal_has_its_place_in_a_pools_hooks() -> None:
    keys_of_pool_signals = {signal.key for signal in telemetry.POOL_SIGNALS}
    assert keys_of_pool_signals == set(telemetry.PoolHooks.__annotations__)
    assert {signal for signal in ALL_SIGNALS if signal.per_pool} == set(telemetry.POOL_SIGNALS)
    assert len(telemetry.POOL_SIGNALS) == 9


def test_a_receiver_of_one_pool_is_kept_by_that_pool_and_costs_the_others_nothing(
        tracker: Tracker) -> None:
    watched = tracked_pool(tracker, size=1).start()
    other = tracked_pool(tracker, size=1).start()
    everyone = len(telemetry.agent_checkout.receivers)
    try:
        with receiving(telemetry.agent_checkout, sender=watched) as out:
            assert len(telemetry.agent_checkout.receivers) == everyone  # not the signal's
            assert watched.hooks.listeners(telemetry.agent_checkout) == 1
            assert other.hooks.agent_checkout == ()  # one attribute test, nothing to call
            other.checkin(other.checkout())
            agent = watched.checkout()
            watched.checkin(agent)
        assert [call["agent"] for call in out.calls] == [agent]
        assert [call["sender"] for call in out.calls] == [watched]
        assert watched.hooks.agent_checkout == ()  # disconnected after the block
    finally:
        watched.close()
        other.close()


def test_a_receiver_of_every_pool_reaches_pools_made_before_and_after_it(
        tracker: Tracker) -> None:
    before = tracked_pool(tracker, size=1).start()
    with receiving(telemetry.agent_checkin) as back:
        after = tracked_pool(tracker, size=1).start()
        assert before.hooks.agent_checkin and after.hooks.agent_checkin
        for pool in (before, after):
            pool.checkin(pool.checkout())
    assert [call["sender"] for call in back.calls] == [before, after]
    assert before.hooks.agent_checkin == () and after.hooks.agent_checkin == ()
    before.close()
    after.close()


def test_a_pools_own_receivers_hear_it_however_they_were_connected(pool: Pool) -> None:
    heard: list[str] = []

    def by_hooks(**kwargs: Any) -> None:
        heard.append("hooks")

    def by_signal(**kwargs: Any) -> None:
        heard.append("signal")

    pool.hooks.connect(telemetry.agent_checkin, by_hooks)
    telemetry.agent_checkin.connect(by_signal, sender=pool)
    pool.checkin(pool.checkout())
    telemetry.agent_checkin.send(pool, agent=None, held=0.0)  # sent by hand, as to any sender
    assert heard == ["hooks", "signal", "hooks", "signal"]

    pool.hooks.disconnect(telemetry.agent_checkin, by_hooks)
    telemetry.agent_checkin.disconnect(by_signal, sender=pool)
    pool.checkin(pool.checkout())
    assert len(heard) == 4


def test_a_weak_receiver_of_one_pool_goes_when_it_is_collected(pool: Pool) -> None:
    def receiver(**kwargs: Any) -> None:
        pass

    telemetry.agent_checkout.connect(receiver, sender=pool)
    assert pool.hooks.listeners(telemetry.agent_checkout) == 1
    del receiver
    gc.collect()
    assert pool.hooks.listeners(telemetry.agent_checkout) == 0
    assert pool.hooks.agent_checkout == ()
