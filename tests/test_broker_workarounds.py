"""Workarounds for what a broker restart does to a worker, on kombu's real event loop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.asynchronous import Hub

from celery_warmpool.worker.broker_workarounds import keep_partial_result_reads


class ResultPipes:
    """Stands for Celery's ``AsynPool``: a result pipe per child, read in the event loop,
    whose readers it registers anew each time the consumer (re)starts its loop."""

    def __init__(self, fds: list[int]) -> None:
        self._fileno_to_outq: dict[int, Any] = {fd: object() for fd in fds}

    def register_with_event_loop(self, hub: Hub) -> None:
        for fd in self._fileno_to_outq:
            hub.add_reader(fd, self.handle_result_event, fd)

    def handle_result_event(self, fd: int) -> None:
        """Would start reading a new message from ``fd``."""


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """The reading ends of two pipes (their writing ends are kept open meanwhile)."""
    pairs = [os.pipe(), os.pipe()]
    yield [read for read, _ in pairs]
    for pair in pairs:
        for fd in pair:
            os.close(fd)


def half_read() -> Iterator[None]:
    """A reader that has read part of a message and waits for the rest."""
    yield


def test_a_half_read_result_is_read_on_after_the_loop_is_reset(pipes):
    hub, pool = Hub(), ResultPipes(pipes)
    keep_partial_result_reads(hub, pool)
    pool.register_with_event_loop(hub)
    reading = half_read()
    hub.add_reader(pipes[0], reading)

    hub.reset()  # what Celery does on a broker connection error
    assert hub.readers == {}
    pool.register_with_event_loop(hub)  # what it does once reconnected

    assert hub.readers[pipes[0]] == (reading, ())
    assert hub.readers[pipes[1]] == (pool.handle_result_event, (pipes[1],))
    hub.close()


def test_the_half_read_result_of_a_child_gone_meanwhile_is_dropped(pipes):
    hub, pool = Hub(), ResultPipes(pipes)
    keep_partial_result_reads(hub, pool)
    keep_partial_result_reads(hub, pool)  # applied on every reconnection: wraps once
    pool.register_with_event_loop(hub)
    hub.add_reader(pipes[0], half_read())

    hub.reset()
    del pool._fileno_to_outq[pipes[0]]
    pool.register_with_event_loop(hub)

    assert set(hub.readers) == {pipes[1]}
    hub.close()


def test_a_pool_without_result_pipes_is_left_alone():
    hub = Hub()
    reset = hub.reset
    keep_partial_result_reads(hub, None)  # threads, solo: no prefork pool
    assert hub.reset == reset
    hub.close()
