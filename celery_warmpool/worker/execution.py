"""What a pool's ``size`` means under each Celery execution pool, one object per pool.

- **prefork**: a child runs one task at a time, so it never needs two agents of one pool.
  Each child holds **one** agent of every hosted pool; a node's capacity is its number of
  children (``-c``). ``size`` should equal the concurrency, and overflow maps onto
  Celery's autoscaler (``--autoscale=size+max_overflow,size``).
- **threads**, **gevent**, **eventlet**: one process serves many tasks at once, so it
  holds ``size`` agents (plus up to ``max_overflow``) shared by its threads or greenlets.
- **solo**: one task at a time in the main process: one agent per pool.

A configuration that does not fit (size 8 under ``-c 2`` prefork, say) is served as above
and warned about at start. Every "which execution pool is this?" question in the package
is a question to the :class:`ExecutionModel` of the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..core.spec import PoolSpec

__all__ = ["EXECUTION_MODELS", "ExecutionModel", "execution_model_of"]


@dataclass(frozen=True)
class ExecutionModel:
    """How one Celery execution pool runs tasks, and so where agents live."""

    name: str
    #: Agents live in the execution pool's child processes (built at worker_process_init).
    in_children: bool = False
    #: A process runs one task at a time, so it holds one agent per pool.
    one_task_per_process: bool = False

    @property
    def in_main_process(self) -> bool:
        """Whether the worker's main process holds the agents."""
        return not self.in_children

    def process_spec(self, spec: PoolSpec, concurrency: int,
                     autoscale: tuple[int, int] | None = None) -> tuple[PoolSpec, list[str]]:
        """The spec one process builds, and warnings about a misfit with the worker."""
        if not self.one_task_per_process:
            return spec, self._misfits_shared(spec, concurrency)
        warnings = (self._misfits_prefork(spec, concurrency, autoscale) if self.in_children
                    else self._misfits_solo(spec))
        return spec.model_copy(update={"size": 1, "max_overflow": 0}), warnings

    def capacity(self, specs: Iterable[PoolSpec], concurrency: int) -> int:
        """How many pool calls one worker node runs at once."""
        if self.in_children:
            return concurrency
        if self.one_task_per_process:
            return 1
        return min(concurrency, sum(spec.size + spec.max_overflow for spec in specs)) or 1

    def pool_capacity(self, spec: PoolSpec, processes: int) -> int:
        """How many calls of one pool a node runs at once (``spec`` as one process builds it)."""
        if self.in_children:
            return processes
        return spec.size + spec.max_overflow

    @staticmethod
    def _misfits_prefork(spec: PoolSpec, processes: int,
                         autoscale: tuple[int, int] | None) -> list[str]:
        warnings = []
        if spec.size != processes:
            warnings.append(
                f"pool {spec.name!r}: size={spec.size} but prefork concurrency is {processes}: "
                f"each child holds one agent, so this node holds {processes} agents and runs "
                f"{processes} calls at once. Make size equal to the concurrency (-c).")
        if spec.max_overflow and autoscale is None:
            warnings.append(
                f"pool {spec.name!r}: max_overflow={spec.max_overflow} has no effect inside a "
                "prefork child; use --autoscale="
                f"{spec.size + spec.max_overflow},{spec.size} for overflow capacity.")
        return warnings

    @staticmethod
    def _misfits_solo(spec: PoolSpec) -> list[str]:
        if spec.size <= 1:
            return []
        return [f"pool {spec.name!r}: size={spec.size} under the solo pool, which runs one "
                "task at a time: one agent is built, the rest would sit idle."]

    def _misfits_shared(self, spec: PoolSpec, concurrency: int) -> list[str]:
        if concurrency >= spec.size:
            return []
        return [f"pool {spec.name!r}: size={spec.size} but only {concurrency} {self.name} "
                f"slots run tasks: {spec.size - concurrency} agents will sit idle. Raise -c "
                "or lower size."]


#: Every execution pool Celery ships, by the last part of its module name.
EXECUTION_MODELS: dict[str, ExecutionModel] = {
    "prefork": ExecutionModel("prefork", in_children=True, one_task_per_process=True),
    "solo": ExecutionModel("solo", one_task_per_process=True),
    "threads": ExecutionModel("threads"),
    "gevent": ExecutionModel("gevent"),
    "eventlet": ExecutionModel("eventlet"),
}
_ALIASES = {"thread": "threads"}
#: An execution pool the package does not know: treated like threads (agents in the
#: main process, shared), the safe assumption for anything that is not a fork.
CUSTOM = ExecutionModel("custom")


def execution_model_of(pool_cls: object) -> ExecutionModel:
    """The execution model of a worker's ``pool_cls`` (a class or an alias string)."""
    module = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    last = str(module).rsplit(".", 1)[-1].rsplit(":", 1)[0]
    return EXECUTION_MODELS.get(_ALIASES.get(last, last), CUSTOM)
