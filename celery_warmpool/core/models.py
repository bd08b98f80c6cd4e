"""The models one agent holds: loaded on first use, kept by recency, unloaded when evicted.

An agent of a multiplexed pool (``PoolSpec(max_models=N)``) holds up to ``N`` models, each
loaded by its own :meth:`Agent.load_model <.agent.Agent.load_model>` and released by its
:meth:`Agent.unload_model <.agent.Agent.unload_model>`. A :class:`ModelCache` keeps them
least recently used first: a model that needs room makes the least recently used one go
(unloaded *before* the new one loads, so that an agent never holds ``N + 1`` models, which
on a GPU may not fit). Each agent's models are its own objects, as its other resources
are: no two threads ever run one model object at once, and unloading one never pulls it
from under another agent's call.

Which agent of a pool a call for a model gets, and loading the model there, is the
pool's (see :mod:`.multiplexing`); a failed load is remembered per pool by
:class:`LoadFailures`, which makes later calls for that model wait out a back-off. Nothing
here locks or knows of threads: the pool reads and changes a cache under its lock, and
loads outside it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, ModelLoadFailed

__all__ = ["RETRY_CAP", "RETRY_FIRST", "HeldModel", "LoadFailures", "ModelCache",
           "check_model_hooks", "device_for", "load_failed", "model_in_use"]

logger = logging.getLogger(__name__)

#: Seconds a model whose load failed is not tried again, after its first failure in a row;
#: the wait doubles with each further failure, up to RETRY_CAP.
RETRY_FIRST = 1.0
RETRY_CAP = 60.0
#: The most models whose failures are remembered per pool: a stream of calls for models
#: that do not exist must not grow the record without bound (the oldest is forgotten).
FAILURES_KEPT = 4096


@dataclass(slots=True)
class HeldModel:
    """One model an agent holds, and how it has served."""

    model_id: str
    #: What ``load_model`` returned.
    model: Any
    #: Seconds its load took.
    load_seconds: float
    #: Unix time it was loaded.
    loaded_at: float
    #: ``time.monotonic()`` of its last use (its load, at first).
    last_used: float
    #: Calls that found it loaded.
    hits: int = 0


class ModelCache:
    """The models one agent holds, least recently used first (see the module).

    Arguments:
        capacity: the most models held at once (the pool's ``max_models``).
        load: loads one model by id and returns it (the agent's ``load_model``).
        unload: releases one model (the agent's ``unload_model``).
    """

    __slots__ = ("_entries", "_load", "_unload", "capacity", "loading")

    def __init__(self, capacity: int, load: Callable[[str], Any],
                 unload: Callable[[str, Any], None]) -> None:
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._entries: OrderedDict[str, HeldModel] = OrderedDict()
        #: The model being loaded now, if any (its pool marks it, so that other callers
        #: of that model wait for this load rather than start another).
        self.loading: str | None = None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ModelCache {self.held()} of {self.capacity}>"

    def held(self) -> list[str]:
        """The ids of the models held, least recently used first."""
        return list(self._entries)

    def entries(self) -> list[HeldModel]:
        """The models held, least recently used first."""
        return list(self._entries.values())

    def entry(self, model_id: str) -> HeldModel | None:
        """The record of ``model_id`` if it is held, else ``None`` (its recency unchanged)."""
        return self._entries.get(model_id)

    @property
    def full(self) -> bool:
        """Whether loading one more model would unload one first."""
        return len(self._entries) >= self.capacity

    def coldest(self) -> float:
        """When the least recently used model was last used (``-inf`` while there is room):
        the agent with the smallest value is the one where a load costs least."""
        if not self.full or not self._entries:
            return float("-inf")
        return next(iter(self._entries.values())).last_used

    def touch(self, model_id: str) -> HeldModel:
        """Mark ``model_id`` (held) used now, a hit; its record.

        Raises:
            KeyError: it is not held.
        """
        entry = self._entries[model_id]
        self._entries.move_to_end(model_id)
        entry.last_used = time.monotonic()
        entry.hits += 1
        return entry

    def use(self, model_id: str) -> Any:
        """The model ``model_id``, made most recently used; loaded first if not held.

        Raises:
            What ``load_model`` raises (see :meth:`load`).
        """
        entry = self._entries.get(model_id)
        if entry is None:
            return self.load(model_id)[0]
        self._entries.move_to_end(model_id)
        entry.last_used = time.monotonic()
        return entry.model

    def load(self, model_id: str) -> tuple[Any, list[str]]:
        """Load ``model_id`` as the most recently used model, making room first; return it
        and the ids of the models unloaded for it (least recently used first).

        Raises:
            What ``load_model`` raises (nothing is added; what was unloaded to make room
            stays unloaded).
        """
        evicted: list[str] = []
        while self._entries and len(self._entries) >= self.capacity:
            oldest, entry = self._entries.popitem(last=False)
            self._release(entry)
            evicted.append(oldest)
        started = time.perf_counter()
        model = self._load(model_id)
        now = time.monotonic()
        self._entries[model_id] = HeldModel(model_id, model, time.perf_counter() - started,
                                            time.time(), now)
        return model, evicted

    def unload(self, model_id: str) -> bool:
        """Unload ``model_id`` if it is held; whether it was."""
        entry = self._entries.pop(model_id, None)
        if entry is None:
            return False
        self._release(entry)
        return True

    def clear(self) -> None:
        """Unload every model (least recently used first): the agent is going."""
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            self._release(entry)

    def _release(self, entry: HeldModel) -> None:
        """``unload_model`` of ``entry``, its failure logged (the model goes anyway)."""
        try:
            self._unload(entry.model_id, entry.model)
        except Exception:
            logger.exception("unload_model(%r) failed; the model is dropped all the same",
                             entry.model_id)


class LoadFailures:
    """The models whose last load failed, each with its back-off (one record per pool).

    A model that failed ``n`` times in a row is not tried again until
    ``RETRY_FIRST * 2 ** (n - 1)`` seconds (at most :data:`RETRY_CAP`) after its last
    failure; a load that works forgets it.
    """

    __slots__ = ("_clock", "_failed")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: By model: failures in a row, the last one's cause, when it may be tried again.
        self._failed: OrderedDict[str, tuple[int, str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failed)

    def record(self, model_id: str, cause: str) -> float:
        """Count a failed load of ``model_id``; the seconds until it may be tried again."""
        failures = self._failed.pop(model_id, (0, "", 0.0))[0] + 1
        wait = min(RETRY_FIRST * 2.0 ** (failures - 1), RETRY_CAP)
        self._failed[model_id] = (failures, cause, self._clock() + wait)
        while len(self._failed) > FAILURES_KEPT:
            self._failed.popitem(last=False)
        return wait

    def backing_off(self, model_id: str) -> tuple[int, str, float] | None:
        """``(failures in a row, last cause, seconds left)`` while ``model_id`` must not be
        tried, else ``None`` (never failed, or its wait is over: try it)."""
        record = self._failed.get(model_id)
        if record is None:
            return None
        failures, cause, retry_at = record
        left = retry_at - self._clock()
        return (failures, cause, left) if left > 0 else None

    def forget(self, model_id: str) -> None:
        """``model_id`` loaded: its failures are over."""
        self._failed.pop(model_id, None)


def device_for(devices: tuple[str, ...], process_index: int, seat: int) -> str | None:
    """The device of an agent: ``devices[(process_index + seat) % len(devices)]``, or
    ``None`` without devices.

    Under prefork each child holds one agent (seat 0), so the child's index picks the
    device, and a replacement child (given the same index) takes the same one; in a
    threads process (index 0) each agent's seat does.
    """
    if not devices:
        return None
    return devices[(process_index + seat) % len(devices)]


def check_model_hooks(cls: type) -> None:
    """Refuse, when an agent class is defined, a ``load_model`` or ``unload_model`` that
    is a coroutine or generator function: each runs in the agent's own thread, as its
    actions do, and its return value is the model.

    Raises:
        ConfigurationError: one of them is.
    """
    for name in ("load_model", "unload_model"):
        hook = getattr(cls, name, None)
        if inspect.iscoroutinefunction(hook) or inspect.isgeneratorfunction(hook) or (
                inspect.isasyncgenfunction(hook)):
            raise ConfigurationError(
                f"{cls.__qualname__}.{name} must be a plain method: it runs in the agent's "
                "own thread, as actions do, and returns (load_model) the model itself; "
                "run async I/O inside it with asyncio.run()", field=name)


def load_failed(pool: str | None, model_id: str, exc: BaseException, where: str,
                retry_in: float = 0.0) -> ModelLoadFailed:
    """The error of the calls for ``model_id``, whose load raised ``exc`` (``where``: on
    which agent, or how often)."""
    cause = f"{type(exc).__name__}: {exc}"
    place = f"pool {pool!r}: " if pool else ""
    again = f"; it is tried again by a call after {retry_in:.1f}s" if retry_in else ""
    return ModelLoadFailed(f"{place}model {model_id!r} failed to load {where}: {cause}{again}",
                           model_id, cause, pool, retry_in)


def model_in_use(agent: Any, model_id: str | None) -> Any:
    """What ``agent`` (an :class:`~.agent.Agent`) holds as ``model_id``, loaded now if it
    does not hold it; ``None`` for no model.

    Raises:
        ConfigurationError: the agent holds no models (its pool has no ``max_models``).
        ModelLoadFailed: the model had to be loaded, and its load failed.
    """
    if model_id is None:
        return None
    cache: ModelCache | None = agent.models
    if cache is None:
        raise ConfigurationError(
            f"{agent!r} was given model {model_id!r} but holds no models: only the agents "
            "of a pool with max_models do", agent.pool_name, "max_models")
    try:
        return cache.use(model_id)
    except Exception as exc:
        raise load_failed(agent.pool_name, model_id, exc, f"on {agent!r}") from exc
