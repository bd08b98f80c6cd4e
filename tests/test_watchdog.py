"""Watchdog: overdue work is reported once, finished work never."""

from __future__ import annotations

import threading

from celery_warmpool.worker.watchdog import TICK, Watchdog


def test_work_done_in_time_is_never_reported() -> None:
    watchdog = Watchdog()
    fired = threading.Event()
    token = watchdog.watch(5.0, fired.set)
    assert watchdog.done(token) is True
    assert not fired.wait(3 * TICK)


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
    assert not threading.Event().wait(3 * TICK)
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
