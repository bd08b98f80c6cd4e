"""StatusBoard: how prefork children tell the worker's main process what their pools do.

Control commands run in the worker's main process, while prefork agents live in the
children. The board is anonymous shared memory made in the main process before it forks:
one fixed-size slot per child (by the child's pool index, reused by its replacement).
Each child rewrites its slot a few times a second; the main process reads every slot.
A slot is guarded by a sequence number (odd while being written), so a reader never
takes a half-written status.
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

__all__ = ["StatusBoard"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("=QI")  # sequence number, payload length
_SEQUENCE = struct.Struct("=Q")
_LENGTH = struct.Struct("=I")
#: The shortest time between two writes of one slot, in seconds.
QUICKEST = 0.02


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

    def publish_forever(self, index: int, snapshot: Callable[[], dict[str, Any]],
                        stop: threading.Event, changed: threading.Event | None = None,
                        interval: float = 0.25) -> threading.Thread:
        """Start a daemon thread writing ``snapshot()`` to slot ``index``.

        It writes every ``interval`` seconds (a heartbeat: silent slots are taken as gone),
        and promptly, at most every ``QUICKEST`` seconds, when ``changed`` is set.
        """
        changed = changed or threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.write(index, {**snapshot(), "updated_at": time.time(),
                                       "pid": os.getpid()})
                except Exception:
                    logger.exception("could not publish pool status of process %d", index)
                changed.wait(interval)
                changed.clear()
                stop.wait(QUICKEST)

        thread = threading.Thread(target=loop, name=f"warmpool-status-{index}", daemon=True)
        thread.start()
        return thread
