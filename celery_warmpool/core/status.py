"""PoolStatus: what a pool is doing, for one process or summed over many."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

__all__ = ["PoolCounters", "PoolLoad", "PoolState", "PoolStatus", "local_status"]

PoolState = Literal["ready", "overflow", "full"]


class PoolCounters(BaseModel):
    """Running totals since the pool started."""

    model_config = ConfigDict(frozen=True)

    checkouts: int = 0
    checkins: int = 0
    timeouts: int = 0
    exhausted: int = 0
    overflow_created: int = 0
    dismissed: int = 0
    replacements: int = 0
    failures: int = 0
    calls: int = 0
    call_failures: int = 0
    #: Batches run, and the signals they held (calls / batches: the mean batch size).
    batches: int = 0
    batched: int = 0
    #: Casts sent to the pool's dead-letter queue (see celery_warmpool.wire.dead_letters).
    dead_lettered: int = 0
    #: Streaming calls begun, ended with their final reply, and stopped because their
    #: reader went away; a stream that fails counts in ``call_failures`` as a call does.
    streams_started: int = 0
    streams_finished: int = 0
    streams_cancelled: int = 0
    #: Chunks the pool's streams produced.
    chunks: int = 0
    #: In a multiplexed pool: calls whose agent held their model already; models
    #: loaded (on first use, or ahead), loads that failed, and models unloaded to make
    #: room for another.
    model_hits: int = 0
    model_loads: int = 0
    model_load_failures: int = 0
    model_evictions: int = 0

    def __add__(self, other: PoolCounters) -> PoolCounters:
        return PoolCounters(**{
            name: getattr(self, name) + getattr(other, name) for name in type(self).model_fields
        })


class PoolLoad(BaseModel):
    """What one node holds of a pool's work, and how fast it works it off.

    ``reserved`` are messages of the pool's queue the node took from the broker and has
    not started, ``running`` those running on an agent; ``capacity`` is the calls of the
    pool the node runs at once once its agents are warm; ``drain_rate`` the calls it
    started per second, recently, while it had more waiting (so its throughput, not
    the load it was offered).
    """

    model_config = ConfigDict(frozen=True)

    reserved: int = 0
    running: int = 0
    capacity: int = 0
    drain_rate: float = 0.0


class PoolStatus(BaseModel):
    """A pool's numbers at one moment.

    ``state`` is ``ready`` when an agent is idle, ``overflow`` when none is idle but the
    next checkout may build an overflow agent, ``full`` when the next checkout waits.
    ``available + checked_out`` is the number of agents alive; ``replacing`` counts base
    agents being rebuilt in the background. ``size`` and ``max_overflow`` are per process;
    an aggregate sums them over its processes, listed in ``processes``.
    """

    model_config = ConfigDict(frozen=True)

    pool: str
    state: PoolState
    size: int
    max_overflow: int
    available: int
    overflow: int
    checked_out: int
    waiting: int
    replacing: int = 0
    #: Per node: the messages of the pool's queue it holds (running or reserved), and the
    #: most it may hold (its window). Empty in one process's status.
    reservations: dict[str, tuple[int, int]] = Field(default_factory=dict)
    #: Calls of the pool queued in the broker (every list of a priority queue counted),
    #: read when the aggregate was made; ``None`` in a node's own status.
    queued: int | None = None
    #: Per node: what it holds of the pool's work, its capacity and drain rate.
    loads: dict[str, PoolLoad] = Field(default_factory=dict)
    #: Nodes recorded as hosting the pool that did not answer (in an aggregate).
    not_answering: list[str] = Field(default_factory=list)
    counters: PoolCounters = Field(default_factory=PoolCounters)
    last_error: str | None = None
    #: Seconds the warm-up of the last agent built took (``PoolSpec.models`` loaded and
    #: ``warmup`` signals handled), per process; an aggregate shows its slowest process.
    #: ``None``: no warm-up.
    warmup_seconds: float | None = None
    node: str | None = None
    pid: int | None = None
    process_index: int | None = None
    updated_at: float | None = None
    processes: list[PoolStatus] = Field(default_factory=list)

    @property
    def taken(self) -> int:
        """Messages of the pool's queue held by the nodes (running or reserved)."""
        return sum(taken for taken, _ in self.reservations.values())

    @property
    def window(self) -> int:
        """The most messages of the pool's queue the nodes may hold."""
        return sum(window for _, window in self.reservations.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reserved(self) -> int:
        """Calls taken from the broker by the nodes and not yet running."""
        return sum(load.reserved for load in self.loads.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def running(self) -> int:
        """Calls running on an agent, on every node."""
        return sum(load.running for load in self.loads.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def capacity(self) -> int:
        """Calls the live nodes run at once, counting only nodes whose agents are warm."""
        return sum(load.capacity for load in self.loads.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def drain_rate(self) -> float:
        """Calls the nodes started per second, recently, while calls were waiting."""
        return sum(load.drain_rate for load in self.loads.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def backlog(self) -> int:
        """The calls the pool has to serve: queued + reserved + running."""
        return (self.queued or 0) + self.reserved + self.running

    @property
    def alive(self) -> int:
        """Agents alive now: idle plus checked out."""
        return self.available + self.checked_out

    @property
    def nodes(self) -> dict[str, PoolStatus]:
        """The per-node sums of an aggregate, by node name."""
        by_node: dict[str, list[PoolStatus]] = {}
        for process in self.processes or [self]:
            by_node.setdefault(process.node or "", []).append(process)
        return {node: PoolStatus.combine(self.pool, parts, node=node or None).model_copy(
                    update={"reservations": {name: reserved for name, reserved
                                             in self.reservations.items() if name == node},
                            "loads": {name: load for name, load in self.loads.items()
                                      if name == node}})
                for node, parts in by_node.items()}

    @classmethod
    def combine(cls, pool: str, parts: Iterable[PoolStatus], *,
                node: str | None = None) -> PoolStatus:
        """Sum per-process statuses of one pool into one, keeping them in ``processes``."""
        parts = list(parts)
        leaves = [leaf for part in parts for leaf in (part.processes or [part])]
        counters = PoolCounters()
        for leaf in leaves:
            counters = counters + leaf.counters
        total = {name: sum(getattr(leaf, name) for leaf in leaves) for name in (
            "size", "max_overflow", "available", "overflow", "checked_out", "waiting",
            "replacing")}
        reservations = {node_name: reserved for part in parts
                        for node_name, reserved in part.reservations.items()}
        loads = {node_name: load for part in parts for node_name, load in part.loads.items()}
        errors = [leaf.last_error for leaf in leaves if leaf.last_error]
        warmups = [leaf.warmup_seconds for leaf in leaves if leaf.warmup_seconds is not None]
        return cls(
            pool=pool, state=_combined_state(leaves), counters=counters,
            last_error=errors[-1] if errors else None, node=node, processes=leaves,
            reservations=reservations, loads=loads,
            warmup_seconds=max(warmups, default=None), **total)


def _combined_state(leaves: list[PoolStatus]) -> PoolState:
    states = {leaf.state for leaf in leaves}
    if "ready" in states:
        return "ready"
    if "overflow" in states:
        return "overflow"
    return "full"


def local_status(pool: str, node: str | None, lending: Mapping[str, Any],
                 work: Mapping[str, int], last_error: str | None,
                 warmup_seconds: float | None = None) -> PoolStatus:
    """One pool's status in this process, from numbers read under its locks: ``lending``
    the lending policy's (its ``counters`` included), ``work`` the work counters.

    Built after the locks are released: the pool's checkouts never wait for pydantic.
    """
    # Validated, counters from a plain dict: pydantic's compiled validation is about twice
    # as fast as model_construct, which also calls every default factory through
    # inspect.signature (and leaves garbage cycles a prefork child pays for in memory).
    return PoolStatus.model_validate({
        **lending, "counters": {**work, **lending["counters"]}, "pool": pool, "node": node,
        "last_error": last_error, "warmup_seconds": warmup_seconds,
        "updated_at": time.time()})
