"""StatusBoard: children's statuses reach the parent through memory shared by fork."""

from __future__ import annotations

import os

from celery_warmpool.worker.status_board import _SEQUENCE, StatusBoard


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
