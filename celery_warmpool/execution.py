"""What a pool's ``size`` means under each Celery execution pool.

- **prefork**: a child runs one task at a time, so it never needs two agents of one pool.
  Each child holds **one** agent of every hosted pool; a node's capacity is its number of
  children (``-c``). ``size`` should equal the concurrency, and overflow maps onto
  Celery's autoscaler (``--autoscale=size+max_overflow,size``).
- **threads**, **gevent**, **eventlet**: one process serves many tasks at once, so it
  holds ``size`` agents (plus up to ``max_overflow``) shared by its threads or greenlets.
- **solo**: one task at a time in the main process: one agent per pool.

A configuration that does not fit (size 8 under ``-c 2`` prefork, say) is served as above
and warned about at start.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from .spec import PoolSpec

__all__ = ["ExecutionPool", "execution_pool_of", "node_capacity", "per_process_spec"]

ExecutionPool = Literal["prefork", "threads", "gevent", "eventlet", "solo", "custom"]

_BY_MODULE: dict[str, ExecutionPool] = {
    "prefork": "prefork", "thread": "threads", "threads": "threads", "gevent": "gevent",
    "eventlet": "eventlet", "solo": "solo",
}


def execution_pool_of(pool_cls: object) -> ExecutionPool:
    """Name the execution pool of a worker's ``pool_cls`` (a class or an alias string)."""
    module = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    last = str(module).rsplit(".", 1)[-1].rsplit(":", 1)[0]
    return _BY_MODULE.get(last, "custom")


def one_per_process(kind: ExecutionPool) -> bool:
    """Whether a process of this kind runs one task at a time (one agent per pool)."""
    return kind in ("prefork", "solo")


def per_process_spec(spec: PoolSpec, kind: ExecutionPool, concurrency: int,
                     autoscale: tuple[int, int] | None = None) -> tuple[PoolSpec, list[str]]:
    """The spec one process builds, and warnings about a misfit with the worker."""
    warnings: list[str] = []
    if one_per_process(kind):
        processes = concurrency if kind == "prefork" else 1
        if kind == "prefork" and spec.size != processes:
            warnings.append(
                f"pool {spec.name!r}: size={spec.size} but prefork concurrency is {processes}: "
                f"each child holds one agent, so this node holds {processes} agents and runs "
                f"{processes} calls at once. Make size equal to the concurrency (-c).")
        if kind == "solo" and spec.size > 1:
            warnings.append(
                f"pool {spec.name!r}: size={spec.size} under the solo pool, which runs one "
                "task at a time: one agent is built, the rest would sit idle.")
        if spec.max_overflow and kind == "prefork" and autoscale is None:
            warnings.append(
                f"pool {spec.name!r}: max_overflow={spec.max_overflow} has no effect inside a "
                "prefork child; use --autoscale="
                f"{spec.size + spec.max_overflow},{spec.size} for overflow capacity.")
        return spec.model_copy(update={"size": 1, "max_overflow": 0}), warnings
    if concurrency < spec.size:
        warnings.append(
            f"pool {spec.name!r}: size={spec.size} but only {concurrency} {kind} slots run "
            f"tasks: {spec.size - concurrency} agents will sit idle. Raise -c or lower size.")
    return spec, warnings


def node_capacity(specs: Iterable[PoolSpec], kind: ExecutionPool, concurrency: int) -> int:
    """How many pool calls one worker node runs at once."""
    if kind == "prefork":
        return concurrency
    if kind == "solo":
        return 1
    return min(concurrency, sum(spec.size + spec.max_overflow for spec in specs)) or 1
