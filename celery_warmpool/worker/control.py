"""The commands every worker with warm pools answers, through Celery's broadcast.

- ``warmpool_status [pool]`` (inspect): per pool and per process, numbers and counters;
  ``celery -A proj inspect warmpool_status`` or
  ``app.control.broadcast("warmpool_status", arguments={"pool": None}, reply=True)``;
- ``warmpool_resize <pool> <size> [max_overflow]`` and ``warmpool_drain <pool> [resume]``
  (control): see :mod:`.scaling`; ``celery -A proj warmpool resize|drain`` sends them.

Importing this module registers them; :class:`WarmPool` imports it.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from . import scaling

__all__ = ["warmpool_drain", "warmpool_resize", "warmpool_status"]


@inspect_command(signature="[pool]", args=[("pool", str)])
def warmpool_status(state: Any, pool: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Warm agent pools on this node: per pool and per process, numbers and counters."""
    warm = getattr(state.consumer.app, "warmpool", None)
    if warm is None:
        return {}
    report: dict[str, Any] = warm.runtime.node_report(pool)
    return report


@control_command(signature="<pool> <size> [max_overflow]",
                 args=[("pool", str), ("size", int), ("max_overflow", int)])
def warmpool_resize(state: Any, pool: str, size: int, max_overflow: int | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Give a warm pool a new size on this node (threads: agents; prefork: children)."""
    warm = getattr(state.consumer.app, "warmpool", None)
    if warm is None:
        return {"error": "this worker has no warm pools"}
    return scaling.resize(warm.runtime, state.consumer, pool, int(size),
                          None if max_overflow is None else int(max_overflow))


@control_command(signature="<pool> [resume]", args=[("pool", str), ("resume", bool)])
def warmpool_drain(state: Any, pool: str, resume: bool = False,
                   **kwargs: Any) -> dict[str, Any]:
    """Stop (or resume) taking a warm pool's work on this node; running work finishes."""
    warm = getattr(state.consumer.app, "warmpool", None)
    if warm is None:
        return {"error": "this worker has no warm pools"}
    return scaling.drain(warm.runtime, pool, bool(resume))
