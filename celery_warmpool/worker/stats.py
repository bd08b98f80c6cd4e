"""What a worker adds to its stats (``celery inspect stats``, Flower's worker page).

Flower shows each stats entry as one row of text, so each pool gets a row that reads at a
glance, ``warmpool.<pool>``::

    ready: 2 of 2 available, 0 checked out, 0 waiting, 0 overflow | 40 checkouts,
    0 timeouts, 0 replacements, 0 failures | prefork, 2 processes

and the ``warmpool`` entry keeps every pool's numbers as data, for machines (Flower's
``/api/workers``, ``inspect stats``).
"""

from __future__ import annotations

from typing import Any

from ..core.status import PoolStatus
from .runtime import WorkerRuntime

__all__ = ["PREFIX", "summary_line", "worker_stats"]

#: The stats key of a pool's row is this prefix and the pool's name.
PREFIX = "warmpool."
#: Fields of one process, or said by the key and the worker already: left out of the data.
_REDUNDANT = ("pool", "node", "pid", "process_index", "updated_at")


def summary_line(status: PoolStatus, execution: str | None) -> str:
    """One pool on one node, in words and numbers."""
    counters = status.counters
    line = (f"{status.state}: {status.available} of {status.alive} available, "
            f"{status.checked_out} checked out, {status.waiting} waiting, "
            f"{status.overflow} overflow | {counters.checkouts} checkouts, "
            f"{counters.timeouts} timeouts, {counters.replacements} replacements, "
            f"{counters.failures} failures")
    processes = len(status.processes)
    line += f" | {execution or 'no worker'}, {processes} process{'es' * (processes != 1)}"
    if status.last_error:
        line += f" | last error: {status.last_error}"
    return line


def worker_stats(runtime: WorkerRuntime) -> dict[str, Any]:
    """A row per pool (``warmpool.<pool>``), then the numbers (``warmpool``)."""
    execution = runtime.execution.name if runtime.execution else None
    statuses = runtime.node_statuses()
    entries: dict[str, Any] = {f"{PREFIX}{name}": summary_line(status, execution)
                               for name, status in sorted(statuses.items())}
    entries["warmpool"] = {name: _numbers(status, execution)
                           for name, status in sorted(statuses.items())}
    return entries


def _numbers(status: PoolStatus, execution: str | None) -> dict[str, Any]:
    data = status.model_dump(mode="json", exclude=set(_REDUNDANT))
    if data.get("last_error") is None:
        data.pop("last_error", None)
    data["processes"] = len(data.pop("processes", []))
    data["execution_pool"] = execution
    return data
