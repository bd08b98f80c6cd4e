"""How prefork children tell the worker's main process what their pools do.

Control commands run in the worker's main process, while prefork agents live in the
children. The board is anonymous shared memory made in the main process before it forks:
one fixed-size slot per child (by the child's pool index, reused by its replacement).
Each child rewrites its slot a few times a second; the main process reads every slot.
A slot is guarded by a sequence number (odd while being written), so a reader never
takes a half-written status. A slot not refreshed for :data:`STALE_AFTER` seconds is taken
as gone (its child died).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core import telemetry

__all__ = ["STALE_AFTER", "StatusBoard", "StatusPublisher"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("=QI")  # sequence number, payload length
_SEQUENCE = struct.Struct("=Q")
_LENGTH = struct.Struct("=I")
#: The shortest time between two writes of one slot, in seconds.
QUICKEST = 0.02
#: Seconds between two writes when nothing changes: a heartbeat.
HEARTBEAT = 0.25
#: Seconds after which a silent slot is taken as gone.
STALE_AFTER = 2.0
#: Telemetry that changes a pool's numbers: a child republishes its status on each.
CHANGES = (telemetry.agent_checkout, telemetry.agent_checkin, telemetry.agent_replaced,
           telemetry.agent_started, telemetry.agent_dismissed, telemetry.pool_exhausted,
           telemetry.checkout_timeout)


class StatusBoard:
    """Per-process status slots in memory shared across ``fork()``."""

    def __init__(self, slots: int, slot_size: int = 64 * 1024) -> None:
        """Make ``slots`` empty slots; call before the worker forks its children."""
        self.slots = slots
        self.slot_size = slot_size
        self._memory = mmap.mmap(-1, slots * slot_size)
        self._write_lock = threading.Lock()

    def write(self, index: int, payload: dict[str, Any]) -> None:
        """Publish ``payload`` (JSON-compatible) in slot ``index``."""
        if not 0 <= index < self.slots:
            logger.warning("status slot %d out of range (board has %d)", index, self.slots)
            return
        data = json.dumps(payload, separators=(",", ":")).encode()
        if len(data) > self.slot_size - _HEADER.size:
            logger.warning("status of process %d too large for its slot (%d bytes); "
                           "publishing a summary", index, len(data))
            data = json.dumps({**payload, "pools": {}, "truncated": True}).encode()
        offset = index * self.slot_size
        with self._write_lock:
            sequence = _SEQUENCE.unpack_from(self._memory, offset)[0]
            # Odd while writing. A writer killed mid-write left the number odd: the next
            # odd one above it keeps the slot readable for the process that takes over.
            writing = sequence + 1 + (sequence & 1)
            _SEQUENCE.pack_into(self._memory, offset, writing)
            _LENGTH.pack_into(self._memory, offset + _SEQUENCE.size, len(data))
            self._memory[offset + _HEADER.size:offset + _HEADER.size + len(data)] = data
            _SEQUENCE.pack_into(self._memory, offset, writing + 1)

    def read(self, index: int) -> dict[str, Any] | None:
        """The payload in slot ``index``, or ``None`` if it was never written."""
        offset = index * self.slot_size
        for _ in range(100):
            sequence, length = _HEADER.unpack_from(self._memory, offset)
            if sequence == 0:
                return None
            if sequence % 2 or not 0 < length <= self.slot_size - _HEADER.size:
                time.sleep(0.0005)
                continue
            data = bytes(self._memory[offset + _HEADER.size:offset + _HEADER.size + length])
            if _SEQUENCE.unpack_from(self._memory, offset)[0] != sequence:
                continue
            try:
                payload: dict[str, Any] = json.loads(data)
            except ValueError:
                continue
            return payload
        logger.warning("status slot %d kept changing while read; skipped", index)
        return None

    def read_all(self, max_age: float | None = None) -> list[dict[str, Any]]:
        """Every written slot, leaving out those not refreshed within ``max_age`` seconds."""
        now = time.time()
        found = []
        for index in range(self.slots):
            payload = self.read(index)
            if payload is None:
                continue
            if max_age is not None and now - payload.get("updated_at", 0) > max_age:
                continue
            found.append(payload)
        return found

    def clear(self, index: int) -> None:
        """Forget slot ``index`` (its process exited)."""
        offset = index * self.slot_size
        with self._write_lock:
            _HEADER.pack_into(self._memory, offset, 0, 0)



class StatusPublisher:
    """Writes one child's pool status to its slot: on every change, and as a heartbeat.

    Made in the main process before the fork; each child then calls :meth:`watch` with
    each of its pools (which hold its receivers: other pools pay nothing for them) and
    :meth:`start` with its slot.
    """

    def __init__(self, board: StatusBoard) -> None:
        self.board = board
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._index: int | None = None
        self._thread: threading.Thread | None = None

    def watch(self, pool: Any) -> None:
        """Republish whenever ``pool`` changes (a checkout, an agent built, ...)."""
        for event in CHANGES:
            event.connect(self._on_change, sender=pool, weak=False)

    def start(self, index: int, snapshot: Callable[[], dict[str, Any]],
              after_write: Callable[[], None] | None = None) -> None:
        """Publish ``snapshot()`` in slot ``index`` from a daemon thread until :meth:`stop`.

        ``after_write`` runs after each write (the metrics exporter's counters follow it).
        """
        # Fresh events: a fork may have copied the old ones mid-use.
        self._changed, self._stop = threading.Event(), threading.Event()
        self._index = index
        self._thread = threading.Thread(
            target=self._loop, args=(index, snapshot, after_write, self._stop),
            name=f"warmpool-status-{index}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and clear the slot (this process's pools are closed)."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            # A write in progress would land after the clear and look alive for a while.
            self._thread.join(1.0)
            self._thread = None
        if self._index is not None:
            self.board.clear(self._index)
            self._index = None

    def _on_change(self, sender: Any = None, **kwargs: Any) -> None:
        # Read first: a checkout and its checkin wake the publisher once, not twice.
        if not self._changed.is_set():
            self._changed.set()

    def _loop(self, index: int, snapshot: Callable[[], dict[str, Any]],
              after_write: Callable[[], None] | None, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.board.write(index, {**snapshot(), "updated_at": time.time(),
                                         "pid": os.getpid()})
                if after_write is not None:
                    after_write()
            except Exception:
                logger.exception("could not publish pool status of process %d", index)
            self._changed.wait(HEARTBEAT)
            self._changed.clear()
            stop.wait(QUICKEST)
