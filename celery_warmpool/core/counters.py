"""Counters: the running totals of the work a pool's agents do, on a path of their own.

A call is counted once it ends (a call, a failed call, a batch, a stream and its
chunks), and a failed warm-up once it fails; none of that takes the pool's lending lock,
so counting never makes a checkout or a checkin wait. The lending totals (checkouts,
checkins, timeouts and the like) are the lending policy's, counted with what they
count; a pool's status puts the two together.
"""

from __future__ import annotations

import threading
from typing import Final

__all__ = ["WORK_COUNTERS", "Counters"]

#: The totals kept here; the other fields of PoolCounters are the lending policy's.
WORK_COUNTERS: Final = (
    "failures", "calls", "call_failures", "batches", "batched", "dead_lettered",
    "streams_started", "streams_finished", "streams_cancelled", "chunks",
    "model_hits", "model_loads", "model_load_failures", "model_evictions")


class Counters:
    """Running totals of one pool's work, each changed under a small lock of its own."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(WORK_COUNTERS, 0)

    def __repr__(self) -> str:
        return f"<Counters {self.snapshot()}>"

    def count_call(self, failed: bool = False) -> None:
        """Count one call that ended (``failed``: with an error); the path of every call."""
        counts = self._counts
        with self._lock:
            counts["calls"] += 1
            if failed:
                counts["call_failures"] += 1

    def add(self, **amounts: int) -> None:
        """Add ``amounts`` to the totals (``batches=1, batched=8``).

        Raises:
            KeyError: a name is not one of :data:`WORK_COUNTERS`; nothing was added.
        """
        unknown = set(amounts) - self._counts.keys()
        if unknown:
            raise KeyError(f"no counter named {sorted(unknown)}; counters: {WORK_COUNTERS}")
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        """Every total now, by name."""
        with self._lock:
            return dict(self._counts)
