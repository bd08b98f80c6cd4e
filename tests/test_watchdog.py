"""Watchdog: overdue work is reported once, finished work never."""

from __future__ import annotations

import threading

from celery_warmpool.worker.watchdog import Watchdog

#: A moment, past which a watchdog would have acted on a deadline that had passed.
MOMENT = 0.06


def test_work_done_in_time_is_never_reported() -> None:
    watchdog = Watchdog()
    fired = threading.Event()
    token = watchdog.watch(5.0, fired.set)
    assert watchdog.done(token) is True
    assert not fired.wait(MOMENT)


def test_overdue_work_is_reported_once_and_done_says_so() -> None:
    watchdog = Watchdog()
    fired: list[int] = []
    reported = threading.Event()

    def on_expire() -> None:
        fired.append(1)
        reported.set()

    token = watchdog.watch(0.0, on_expire)
    assert reported.wait(2.0)
    assert watchdog.done(token) is False
    assert not threading.Event().wait(MOMENT)
    assert fired == [1]


def test_many_watches_each_settle_exactly_once() -> None:
    watchdog = Watchdog()
    fired: list[int] = []
    lock = threading.Lock()
    all_fired = threading.Event()

    def expire(index: int) -> None:
        with lock:
            fired.append(index)
            if len(fired) == 50:
                all_fired.set()

    tokens = [watchdog.watch(0.0 if index % 2 else 60.0, lambda i=index: expire(i))
              for index in range(100)]
    assert all_fired.wait(2.0)
    finished = [watchdog.done(token) for token in tokens]
    assert finished == [index % 2 == 0 for index in range(100)]
    assert sorted(fired) == list(range(1, 100, 2))


def test_a_callback_that_waits_delays_no_other_decision() -> None:
    # As when storing one call's CallTimeout waits for a restarting result store: another
    # call's deadline must still be decided on time, not once its work has ended.
    watchdog = Watchdog()
    release, blocking = threading.Event(), threading.Event()

    def wait_for_the_store() -> None:
        blocking.set()
        release.wait(10.0)

    second_reported = threading.Event()
    try:
        watchdog.watch(0.0, wait_for_the_store)
        assert blocking.wait(2.0)
        token = watchdog.watch(0.05, second_reported.set)
        assert not threading.Event().wait(0.5)  # the second call's work ends only now
        assert watchdog.done(token) is False  # too late: it was decided at its deadline
    finally:
        release.set()
    assert second_reported.wait(2.0)


def test_a_nearer_deadline_wakes_a_watchdog_sleeping_until_a_later_one() -> None:
    watchdog = Watchdog()
    watchdog.watch(60.0, lambda: None)  # the thread now sleeps for a minute
    near = threading.Event()
    watchdog.watch(0.05, near.set)
    assert near.wait(1.0)


def test_the_watchdog_does_not_tick_while_nothing_is_due() -> None:
    # A clock that counts its readings: a sleeping watchdog reads it only when woken.
    import time

    readings = []

    def clock() -> float:
        readings.append(1)
        return time.monotonic()

    watchdog = Watchdog(clock=clock)
    token = watchdog.watch(30.0, lambda: None)
    threading.Event().wait(0.5)
    assert len(readings) <= 3  # the watch, the thread's first look (no look per tick)
    assert watchdog.done(token) is True


def test_work_that_ends_in_time_never_wakes_the_watchdog() -> None:
    import time

    readings = []

    def clock() -> float:
        readings.append(1)
        return time.monotonic()

    watchdog = Watchdog(clock=clock)
    watchdog.watch(5.0, lambda: None)  # the thread is up, asleep until then
    threading.Event().wait(0.2)
    before = len(readings)
    for _ in range(1000):
        assert watchdog.done(watchdog.watch(5.0, lambda: None)) is True
    threading.Event().wait(0.2)
    # One reading per watch (its deadline); none by the thread, which slept through.
    assert len(readings) - before == 1000
    assert len(watchdog._heap) <= 2 * 64  # finished work cleared out of the heap
