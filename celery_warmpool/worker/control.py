"""The ``warmpool_status`` inspect command, answered by every worker with warm pools.

``celery -A proj inspect warmpool_status [pool]`` or
``app.control.broadcast("warmpool_status", arguments={"pool": None}, reply=True)``.
Importing this module registers the command; :class:`WarmPool` imports it.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

__all__ = ["warmpool_status"]


@inspect_command(signature="[pool]", args=[("pool", str)])
def warmpool_status(state: Any, pool: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Warm agent pools on this node: per pool and per process, numbers and counters."""
    warm = getattr(state.consumer.app, "warmpool", None)
    if warm is None:
        return {}
    report: dict[str, Any] = warm.runtime.node_report(pool)
    return report
