"""Checkout wait and call duration histograms, counted in the process that does the work.

Under prefork the agents, and so the timings, live in the children while ``/metrics`` is
served by the worker's main process. Each process counts observations in the same fixed
buckets; children publish their counts on the status board with their pool status (see
:meth:`PoolHost.snapshot`), and the main process adds them up when it is scraped. Fixed
buckets are what make that sum exact.

Recording is off until :meth:`TimingRecorder.enable` connects its telemetry receivers;
the metrics exporter does so in the worker's main process before it forks, so every
child records from its first checkout.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from . import telemetry

__all__ = ["BUCKETS", "Histogram", "TimingRecorder", "merged", "recorder"]

#: Upper bounds (seconds) of the histogram buckets; a last, unbounded bucket follows.
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: What is timed: the wait for an agent, and an agent handling a signal.
CHECKOUT_WAIT = "checkout_wait"
CALL_DURATION = "call_duration"


class Histogram:
    """Observation counts per bucket (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, counts: Iterable[int] | None = None, total: float = 0.0) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(BUCKETS) + 1)
        if len(self.counts) != len(BUCKETS) + 1:
            raise ValueError(f"a histogram has {len(BUCKETS) + 1} buckets, "
                             f"not {len(self.counts)}")
        self.sum = total

    @property
    def count(self) -> int:
        """How many observations were made."""
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        """Count one observation (a bucket holds values up to and including its bound)."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations up to it)`` per bucket, the last bound infinite."""
        running = 0
        found = []
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            found.append((bound, running))
        return found

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram([a + b for a, b in zip(self.counts, other.counts, strict=True)],
                         self.sum + other.sum)

    def to_data(self) -> dict[str, Any]:
        """JSON-compatible form, for the status board."""
        return {"counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Histogram:
        """Read back what :meth:`to_data` wrote."""
        return cls(data["counts"], float(data["sum"]))


class TimingRecorder:
    """This process's histograms, per pool: checkout waits and call durations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, dict[str, Histogram]] = {}
        self._enabled = False

    @property
    def enabled(self) -> bool:
        """Whether telemetry is being recorded."""
        return self._enabled

    def enable(self) -> None:
        """Start recording every pool's checkouts and calls in this process (and forks)."""
        if self._enabled:
            return
        telemetry.agent_checkout.connect(self._on_checkout, weak=False)
        telemetry.call_stop.connect(self._on_call, weak=False)
        telemetry.call_exception.connect(self._on_call, weak=False)
        self._enabled = True

    def disable(self) -> None:
        """Stop recording; what was counted is kept."""
        if not self._enabled:
            return
        telemetry.agent_checkout.disconnect(self._on_checkout)
        telemetry.call_stop.disconnect(self._on_call)
        telemetry.call_exception.disconnect(self._on_call)
        self._enabled = False

    def observe(self, pool: str, timing: str, seconds: float) -> None:
        """Count one observation of ``timing`` (``checkout_wait``, ``call_duration``)."""
        with self._lock:
            histograms = self._pools.setdefault(pool, {})
            histograms.setdefault(timing, Histogram()).observe(seconds)

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every histogram as JSON-compatible data: ``{pool: {timing: data}}``."""
        with self._lock:
            return {pool: {timing: histogram.to_data()
                           for timing, histogram in histograms.items()}
                    for pool, histograms in self._pools.items()}

    def clear(self) -> None:
        """Forget every observation (a new process starts from zero)."""
        # A fresh lock too: a fork may have copied the old one while another thread held it.
        self._lock = threading.Lock()
        self._pools = {}

    def _on_checkout(self, sender: Any = None, wait: float = 0.0, **kwargs: Any) -> None:
        name = getattr(sender, "name", None)
        if name is not None:
            self.observe(name, CHECKOUT_WAIT, wait)

    def _on_call(self, sender: Any = None, duration: float = 0.0, **kwargs: Any) -> None:
        # Call events are sent by the agent, which knows its pool once a pool built it.
        pool = getattr(sender, "pool_name", None)
        if pool is not None:
            self.observe(pool, CALL_DURATION, duration)


def merged(snapshots: Iterable[dict[str, dict[str, dict[str, Any]]]],
           ) -> dict[str, dict[str, Histogram]]:
    """Add up :meth:`TimingRecorder.snapshot` data of many processes, per pool and timing."""
    total: dict[str, dict[str, Histogram]] = {}
    for snapshot in snapshots:
        for pool, histograms in snapshot.items():
            into = total.setdefault(pool, {})
            for timing, data in histograms.items():
                into[timing] = into.get(timing, Histogram()) + Histogram.from_data(data)
    return total


#: The recorder of this process.
recorder = TimingRecorder()
os.register_at_fork(after_in_child=recorder.clear)
