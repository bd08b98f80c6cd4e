"""Changing what a node gives a pool while it serves: resize, drain, hand back.

- **Resize** (``warmpool_resize``): under threads, gevent and eventlet the pool in the main
  process grows (new agents built warm before they count) or shrinks (surplus idle agents
  close now, checked-out ones when they come back). Under prefork every child holds one
  agent of each pool, so the node's capacity is its number of children: the execution
  pool grows or shrinks (new children warm up before they take work; a busy child is
  stopped once it is idle). The pool's reservation window follows either way.
- **Drain** (``warmpool_drain``): the node stops taking the pool's messages, hands the calls
  waiting for an agent back to the broker (other nodes serve them), and lets running work
  finish; ``warmpool status`` shows when nothing is held any more. ``resume`` undoes it.
- **Warm shutdown** hands waiting calls back the same way, so that a node that is stopped
  does not keep work other nodes could do now.

Every answer is a dict for the control reply: ``{"ok": ...}`` or ``{"error": why}``; an
invalid request changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigurationError, WarmPoolError
from ..core.spec import validate_options

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

__all__ = ["drain", "hand_back_all", "resize"]

logger = logging.getLogger(__name__)

#: Seconds between two tries to stop a busy prefork child after a shrink.
SHRINK_RETRY = 0.5


def resize(runtime: WorkerRuntime, consumer: Any, pool: str, size: int,
           max_overflow: int | None = None) -> dict[str, Any]:
    """Give ``pool`` ``size`` agents (and ``max_overflow``) on this node."""
    spec = runtime.process_specs.get(pool)
    if spec is None:
        return {"error": f"pool {pool!r} is not hosted on {runtime.node} (hosted: "
                         f"{', '.join(sorted(runtime.process_specs)) or 'none'})"}
    try:
        validate_options(pool, {"size": size, "max_overflow": max_overflow or 0})
    except ConfigurationError as exc:
        return {"error": str(exc)}
    assert runtime.execution is not None
    if runtime.execution.in_children:
        answer = _resize_children(runtime, consumer, size, max_overflow)
    else:
        answer = _resize_agents(runtime, pool, size, max_overflow)
    if "ok" in answer and runtime.consumers is not None:
        runtime.consumers.reconcile_all()
    return answer


def _resize_agents(runtime: WorkerRuntime, pool: str, size: int,
                   max_overflow: int | None) -> dict[str, Any]:
    try:
        runtime.local_pool(pool).resize(size, max_overflow)
    except WarmPoolError as exc:
        return {"error": str(exc)}
    spec = runtime.process_specs[pool]
    runtime.process_specs[pool] = spec.model_copy(update={
        "size": size, "max_overflow": spec.max_overflow if max_overflow is None
        else max_overflow})
    logger.warning("warm pools: pool %r resized on %s to size=%d", pool, runtime.node, size)
    return {"ok": f"pool {pool!r} resized to {size} agents", "size": size,
            "max_overflow": runtime.process_specs[pool].max_overflow}


def _resize_children(runtime: WorkerRuntime, consumer: Any, size: int,
                     max_overflow: int | None) -> dict[str, Any]:
    if max_overflow:
        return {"error": "under prefork a child holds one agent of each pool: overflow is "
                         "the autoscaler's (--autoscale=max,min), not a pool option"}
    if getattr(consumer.controller, "autoscaler", None) is not None:
        return {"error": "this node autoscales its children (--autoscale): change its "
                         "bounds with `celery control autoscale` instead"}
    board = runtime.board
    if board is not None and size > board.slots:
        return {"error": f"a prefork node can grow to {board.slots} children at most "
                         "(its status board's slots)"}
    processes = int(consumer.pool.num_processes)
    if size > processes:
        consumer.pool.grow(size - processes)
    elif size < processes:
        _shrink(consumer, size)
    logger.warning("warm pools: %s resized to %d children (one agent of each pool each)",
                   runtime.node, size)
    return {"ok": f"{runtime.node} resized to {size} children, one agent of each pool "
                  "each", "size": size, "max_overflow": 0}


def _shrink(consumer: Any, size: int) -> None:
    """Stop idle children until ``size`` remain; busy ones once they are idle.

    A stopped child stays in billiard's list until it is reaped, and billiard would count
    it as idle again: a second round waits until the first one's children are gone.
    """
    children = getattr(consumer.pool, "_pool", None)
    stopping = any(getattr(child, "_controlled_termination", False)
                   for child in getattr(children, "_pool", ()))
    surplus = int(consumer.pool.num_processes) - size
    if surplus <= 0:
        return
    if not stopping:
        with contextlib.suppress(ValueError):  # too few idle children: the rest later
            consumer.pool.shrink(surplus)
        if int(consumer.pool.num_processes) <= size:
            return
    consumer.timer.call_after(SHRINK_RETRY, _shrink, (consumer, size))


def drain(runtime: WorkerRuntime, pool: str, resume: bool = False) -> dict[str, Any]:
    """Stop (or, with ``resume``, restart) taking ``pool``'s messages on this node."""
    consumers = runtime.consumers
    queue = consumers.queue_of(pool) if consumers is not None else None
    if queue is None:
        return {"error": f"pool {pool!r} is not hosted on {runtime.node}"}
    queue.draining = not resume
    handed_back = 0
    if runtime.pools is not None and pool in runtime.pools.pools:
        local = runtime.pools.pools[pool]
        if resume:
            local.resume()
        else:
            handed_back = local.hand_back()
    consumers.reconcile_all()
    taken, _ = consumers.reservations()[pool]
    if resume:
        logger.warning("warm pools: pool %r takes work again on %s", pool, runtime.node)
        return {"ok": f"pool {pool!r} takes work again on {runtime.node}", "taken": taken}
    logger.warning("warm pools: draining pool %r on %s (%d calls handed back, %d held)",
                   pool, runtime.node, handed_back, taken)
    return {"ok": f"pool {pool!r} is draining on {runtime.node}", "taken": taken,
            "handed_back": handed_back}


def hand_back_all(runtime: WorkerRuntime) -> int:
    """Hand the calls waiting in this process's pools back (the node is shutting down)."""
    pools = runtime.pools
    if pools is None:
        return 0
    handed_back = sum(pool.hand_back() for pool in pools.pools.values())
    if handed_back:
        logger.warning("warm pools: %d waiting calls handed back to the broker for other "
                       "nodes", handed_back)
    return handed_back
