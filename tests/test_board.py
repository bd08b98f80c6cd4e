"""StatusBoard: children's statuses reach the parent through memory shared by fork."""

from __future__ import annotations

import os

from celery_warmpool import AgentPool
from celery_warmpool.worker.status_board import _SEQUENCE, CHANGES, StatusBoard, StatusPublisher

from .core_agents import CounterAgent


def test_a_forked_child_writes_what_the_parent_reads() -> None:
    board = StatusBoard(slots=2, slot_size=4096)
    pid = os.fork()
    if pid == 0:  # the child
        board.write(1, {"pid": os.getpid(), "pools": {"search": {"available": 3}}})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert board.read(0) is None
    assert board.read(1) == {"pid": pid, "pools": {"search": {"available": 3}}}
    assert [report["pid"] for report in board.read_all()] == [pid]


def test_a_slot_whose_writer_died_mid_write_is_readable_after_the_next_write() -> None:
    board = StatusBoard(slots=1, slot_size=4096)
    board.write(0, {"generation": 1})
    _SEQUENCE.pack_into(board._memory, 0, 3)  # killed between its first and last store
    assert board.read(0) is None
    board.write(0, {"generation": 2})
    assert board.read(0) == {"generation": 2}


def test_a_cleared_slot_reads_as_never_written() -> None:
    board = StatusBoard(slots=1, slot_size=4096)
    board.write(0, {"generation": 1})
    board.clear(0)
    assert board.read(0) is None


def test_the_publisher_listens_to_the_pools_it_watches_and_to_no_other() -> None:
    before = [len(signal.receivers) for signal in CHANGES]
    publisher = StatusPublisher(StatusBoard(slots=1, slot_size=4096))
    with AgentPool(CounterAgent, name="watched", size=1) as watched, \
            AgentPool(CounterAgent, name="other", size=1) as other:
        publisher.watch(watched)

        other.checkin(other.checkout())
        assert not publisher._changed.is_set()
        watched.checkin(watched.checkout())
        assert publisher._changed.is_set()

        # Connected to the watched pool alone: no receiver of every pool, none on the other.
        assert [len(signal.receivers) for signal in CHANGES] == before
        assert [watched.hooks.listeners(signal) for signal in CHANGES] == [1] * len(CHANGES)
        assert [getattr(other.hooks, signal.key) for signal in CHANGES] == [()] * len(CHANGES)
